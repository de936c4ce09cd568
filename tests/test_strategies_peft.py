"""The aggregation conventions against a real PEFT LoRA layer: the model's forward after the engine's
steps (base_delta added in place, global adapter loaded) equals x (W0 + sum_k p_k s_k B_k A_k)^T."""

from __future__ import annotations

import pytest
import torch

from fedpeft.adapters import get_adapter_state, set_adapter_state
from fedpeft.models.peft_wrap import add_to_base_weight, lora_modules
from fedpeft.strategies.lora_math import lora_scaling, slice_to_rank
from strategy_fakes import make, update

peft = pytest.importorskip("peft")
R, ALPHA = 4, 8.0


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(5, 6, bias=False)
        self.v_proj = torch.nn.Linear(5, 3, bias=False)

    def forward(self, x):
        return torch.cat([self.q_proj(x), self.v_proj(x)], dim=-1)


def wrapped():
    torch.manual_seed(0)
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return peft.get_peft_model(Tiny(), config)


def random_clients(template, ranks, seed):
    g = torch.Generator().manual_seed(seed)
    return [slice_to_rank({k: torch.randn(v.shape, generator=g) for k, v in template.items()}, r) for r in ranks]


def expected_output(model, w0, clients, weights, scalings, x):
    outs = []
    for name, layer in lora_modules(model).items():
        w = w0[name].clone()
        for c, p, s in zip(clients, weights, scalings):
            w += p * s * c[f"{name}.lora_B.default.weight"] @ c[f"{name}.lora_A.default.weight"]
        outs.append(x @ w.T)
    return torch.cat(outs, dim=-1)


@pytest.mark.parametrize("name,ranks", [("flora", [4, 2, 1]), ("fedex_lora", [4, 4, 4]), ("ffa_lora", [4, 4, 4])])
def test_engine_view_of_exact_methods_matches_the_equation(name, ranks):
    model = wrapped()
    w0 = {n: layer.get_base_layer().weight.detach().clone() for n, layer in lora_modules(model).items()}
    initial = get_adapter_state(model)
    options = {"r": R, "client_ranks": ranks} if name == "flora" else {"r": R}
    strategy = make(name, **options)
    glob = strategy.init_global(initial)
    clients = random_clients(initial, ranks, seed=1)
    if name == "ffa_lora":  # A frozen: clients share the global A
        clients = [{k: (glob[k] if ".lora_A." in k else v) for k, v in c.items()} for c in clients]
        uploads = [{k: v for k, v in c.items() if ".lora_B." in k} for c in clients]
    else:
        uploads = clients
    sizes = [5, 15, 30]
    result = strategy.aggregate(1, glob, [update(k, u, n) for k, (u, n) in enumerate(zip(uploads, sizes))])
    if result.base_delta:
        add_to_base_weight(model, result.base_delta)
    set_adapter_state(model, result.global_state)
    x = torch.randn(7, 5)
    with torch.no_grad():
        got = model(x)
    s = lora_scaling(ALPHA, R)
    want = expected_output(model, w0, clients, [n / sum(sizes) for n in sizes], [s] * 3, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
