"""Method math against the papers (issue 13): each expected value is computed here, independently of the
strategy code, from the method's equations."""

from __future__ import annotations

import pytest
import torch

from fedpeft.strategies.base import TrainResult
from strategy_fakes import HEAD, MODULES, MemoryStore, a_key, adapter, b_key, make

R = 4


def result(n=10, steps=3, lr=0.1):
    return TrainResult(steps=steps, examples_seen=0, num_examples=n, mean_loss=1.0, last_loss=1.0, lr=lr, seconds=0.0)


# --- a classification head (non-LoRA adapter key) learns under every averaging method --------------------
HEAD_METHODS = {
    "fedit": {}, "fedprox": {}, "scaffold": {"num_clients": 2, "local_optimizer": "sgd"}, "ffa_lora": {},
    "fedsa_lora": {"num_clients": 2}, "flora": {"client_ranks": [4, 2]}, "flexlora": {"client_ranks": [4, 2]},
    "fedex_lora": {}, "zero_padding": {"client_ranks": [4, 2]}, "hetlora": {"client_ranks": [4, 2]},
    "fedls": {}, "fedgpl": {"train_mode": "fed", "fed_alg": "fedavg"},
}


@pytest.mark.parametrize("name", sorted(HEAD_METHODS))
def test_a_head_trained_to_1_and_2_by_two_equal_clients_becomes_1_5(name):
    """Issue 13, finding 1: clients train the head to 1.0 and 2.0 (equal n); the model every client and
    the evaluation then use must hold their average 1.5 (before: flora/flexlora 0, ffa_lora never trained,
    fedsa_lora reset every round)."""
    strategy = make(name, **HEAD_METHODS[name])
    glob = strategy.init_global(adapter(R, seed=1))
    store = MemoryStore()
    plans = strategy.configure_round(1, [0, 1], glob, store)
    updates = []
    for plan, value in zip(plans, (1.0, 2.0)):
        strategy.attach_client_hooks(1, plan, store)
        assert plan.trainable is None or HEAD in plan.trainable, f"{name} does not train the head"
        start = {**glob, **(plan.init_state if plan.init_state is not None else plan.downlink)}
        trained = {k: v.clone() for k, v in start.items()}
        trained[HEAD] = torch.full_like(glob[HEAD], value)
        up = strategy.client_update(1, plan, trained, result(n=10, steps=3, lr=0.1), store)
        strategy.check_update(glob, up)
        strategy.commit_private(up, store)
        updates.append(up)
    new = strategy.aggregate(1, glob, updates).global_state
    expected = torch.full_like(glob[HEAD], 1.5)
    torch.testing.assert_close(new[HEAD], expected)
    torch.testing.assert_close(strategy.evaluation_state(new, store)[HEAD], expected)
    for cid in (0, 1):
        personal = strategy.personal_state(cid, new, store)
        if personal is not None:
            torch.testing.assert_close(personal[HEAD], expected)
    # the next round starts every client from the learned head
    plan = strategy.configure_round(2, [0], new, store)[0]
    strategy.attach_client_hooks(2, plan, store)
    start = {**new, **(plan.init_state if plan.init_state is not None else plan.downlink)}
    torch.testing.assert_close(start[HEAD], expected)


def test_ffa_lora_prepare_model_leaves_a_head_trainable():
    model = torch.nn.Module()
    model.q_proj = torch.nn.Module()
    model.q_proj.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(5, R, bias=False)})
    model.score = torch.nn.Module()
    model.score.modules_to_save = torch.nn.ModuleDict({"default": torch.nn.Linear(5, 2)})
    make("ffa_lora").prepare_model(model)
    assert not model.q_proj.lora_A["default"].weight.requires_grad
    assert model.score.modules_to_save["default"].weight.requires_grad


# --- FedLS: the seed's momentum, unit and presets ------------------------------------------------------------
def _fedls_round(strategy, round_idx, glob, keys, delta):
    """One aggregate where every client uploads ``keys`` moved by ``delta`` (the mask follows the uploads)."""
    tensors = {k: glob[k] + delta for k in keys}
    ups = [update(c, {k: v.clone() for k, v in tensors.items()}, 10) for c in (0, 1)]
    return strategy.aggregate(round_idx, glob, ups).global_state


def update(cid, tensors, n):
    from fedpeft.strategies.base import ClientUpdate

    return ClientUpdate(client_id=cid, tensors=tensors, num_examples=n)


def test_fedls_default_left_out_buffer_decays_as_in_the_seed():
    """Issue 13, finding 3a: Delta = 1 once, then the module is left out 5 rounds. Seed code: D = avg - global
    = 0 for a left-out key, so b <- 0.8 b and theta moves sum_t 0.1 * 0.8^t = 0.336 (buffer 0.8^5 = 0.328);
    the old default fed the last Delta every round (moves 0.5, buffer stays 1)."""
    strategy = make("fedls", variant="left_out_momentum")
    glob = {k: v for k, v in adapter(R, seed=1).items() if k != HEAD}
    out_module = next(iter(MODULES))
    left_out = [a_key(out_module), b_key(out_module)]
    kept = [k for k in glob if k not in left_out]
    glob = _fedls_round(strategy, 1, glob, list(glob), 1.0)
    start = {k: v.clone() for k, v in glob.items()}
    for t in range(2, 7):
        glob = _fedls_round(strategy, t, glob, kept, 0.0)
    beta, mu = 0.1, 0.8
    moved = sum(beta * mu**t for t in range(5))
    assert moved == pytest.approx(0.33616)
    for k in left_out:
        torch.testing.assert_close(glob[k] - start[k], torch.full_like(start[k], moved))
        torch.testing.assert_close(strategy.buffer[k], torch.full_like(start[k], mu**5))


def test_fedls_no_momentum_preset_is_the_seeds():
    strategy = make("fedls", variant="no_momentum")
    assert (strategy.rho, strategy.min_prob, strategy.max_prob) == (0.5, 0.4, 0.9)
    assert (make("fedls").rho, make("fedls").max_prob) == (1.0, 0.99)
    assert make("fedls", variant="no_momentum", rho=0.9).rho == 0.9  # an explicit option wins


def test_fedls_mask_unit_key_samples_a_and_b_independently():
    glob = adapter(R, seed=1)
    strategy = make("fedls", mask_unit="key", min_prob=0.5, max_prob=0.5, seed=3)
    assert make("fedls").mask_unit == "module"
    strategy.stats = {k: (1.0, 1.0) for k in glob}  # statistics for every key: sampling starts
    split = False
    for t in range(2, 12):
        mask = strategy.round_mask(t, glob)
        assert set(mask) == set(glob)  # one draw per state-dict key
        split |= any(mask[a_key(m)] != mask[b_key(m)] for m in MODULES)
    assert split
    module_mask = make("fedls", min_prob=0.5, max_prob=0.5, seed=3)
    module_mask.stats = {m: (1.0, 1.0) for m in list(MODULES) + [HEAD]}
    assert set(module_mask.round_mask(2, glob)) == set(MODULES) | {HEAD}
    with pytest.raises(ValueError, match="mask_unit"):
        make("fedls", mask_unit="layer")


# --- byte counts: what each method sends, by formula --------------------------------------------------------
WIDE = "base_model.model.model.layers.0.mlp.up_proj"


@pytest.mark.parametrize("num_clients", [1, 2, 3])
def test_fedex_lora_broadcasts_the_rank_k_minus_1_residual_and_counts_it(num_clients):
    """Issue 13, finding 4: R = sum p_k B_k A_k - B_avg A_avg has rank <= (K - 1) r; the broadcast carries
    min((K - 1) r (d_out + d_in), d_out d_in) float32 numbers (before: (K + 1) r (d_out + d_in)), and
    applying it gives the exact average of the client products."""
    from fedpeft.strategies.lora_math import base_delta_from_broadcast

    d_out, d_in, r, alpha = 40, 30, 2, 8.0
    s = alpha / r
    g = torch.Generator().manual_seed(5)
    clients = [{f"{WIDE}.lora_A.default.weight": torch.randn(r, d_in, generator=g),
                f"{WIDE}.lora_B.default.weight": torch.randn(d_out, r, generator=g)} for _ in range(num_clients)]
    sizes = [10, 30, 20][:num_clients]
    p = [n / sum(sizes) for n in sizes]
    strategy = make("fedex_lora", lora_alpha=alpha)
    glob = strategy.init_global({k: torch.zeros_like(v) for k, v in clients[0].items()})
    agg = strategy.aggregate(1, glob, [update(k, c, n) for k, (c, n) in enumerate(zip(clients, sizes))])
    a_avg = sum(pk * c[f"{WIDE}.lora_A.default.weight"].double() for pk, c in zip(p, clients))
    b_avg = sum(pk * c[f"{WIDE}.lora_B.default.weight"].double() for pk, c in zip(p, clients))
    exact = sum(pk * c[f"{WIDE}.lora_B.default.weight"].double() @ c[f"{WIDE}.lora_A.default.weight"].double()
                for pk, c in zip(p, clients))
    residual = s * (exact - b_avg @ a_avg)
    expected_bytes = 4 * min((num_clients - 1) * r * (d_out + d_in), d_out * d_in)
    assert agg.metrics["broadcast_bytes_per_client"] == expected_bytes
    assert sum(t.numel() * t.element_size() for t in agg.broadcast.values()) == expected_bytes
    rebuilt = base_delta_from_broadcast(agg.broadcast).get(WIDE, torch.zeros(d_out, d_in))
    torch.testing.assert_close(rebuilt.double(), residual, atol=1e-5, rtol=1e-5)
    applied = agg.base_delta.get(WIDE, torch.zeros(d_out, d_in)) if agg.base_delta else torch.zeros(d_out, d_in)
    torch.testing.assert_close(applied.double(), residual, atol=1e-5, rtol=1e-5)


def _adapter_bytes(state, keep=lambda k: True):
    return sum(v.numel() * 4 for k, v in state.items() if keep(k))


def test_scaffold_sends_model_and_control_both_ways():
    """SCAFFOLD: down = adapter + server control c, up = adapter + control delta: 2 x the adapter each way."""
    from strategy_fakes import run_round

    strategy = make("scaffold", num_clients=4, local_optimizer="sgd")
    glob = strategy.init_global(adapter(R, seed=1))
    plans, updates, _ = run_round(strategy, 1, [0, 1], glob, MemoryStore(), {0: 10, 1: 30})
    full = _adapter_bytes(glob)
    for plan, up in zip(plans, updates):
        assert _adapter_bytes(plan.downlink) + _adapter_bytes(plan.control) == 2 * full
        assert _adapter_bytes(up.tensors) + _adapter_bytes(up.control) == 2 * full


def test_fedsa_lora_sends_a_and_the_head_only():
    """FedSA-LoRA: sum over modules of r d_in (A) plus the head, down and up; B never travels."""
    from strategy_fakes import HEAD_SHAPE, run_round

    strategy = make("fedsa_lora", num_clients=2)
    glob = strategy.init_global(adapter(R, seed=1))
    plans, updates, _ = run_round(strategy, 1, [0, 1], glob, MemoryStore(), {0: 10, 1: 30})
    expected = 4 * (sum(R * d_in for _, d_in in MODULES.values()) + HEAD_SHAPE[0] * HEAD_SHAPE[1])
    for plan, up in zip(plans, updates):
        assert _adapter_bytes(plan.downlink) == expected == _adapter_bytes(up.tensors)


@pytest.mark.parametrize("name", ["hetlora", "zero_padding"])
def test_heterogeneous_rank_bytes_are_the_client_rank_slice(name):
    """HetLoRA / zero-padding: a rank-r_k client sends and receives sum_m r_k (d_in + d_out) + the head."""
    from strategy_fakes import HEAD_SHAPE, run_round

    ranks = [4, 1, 3]
    strategy = make(name, client_ranks=ranks)
    glob = strategy.init_global(adapter(R, seed=1))
    plans, updates, _ = run_round(strategy, 1, [0, 1, 2], glob, MemoryStore(), {0: 10, 1: 30, 2: 20})
    for plan, up in zip(plans, updates):
        rk = ranks[plan.client_id]
        expected = 4 * (sum(rk * (d_in + d_out) for d_out, d_in in MODULES.values()) + HEAD_SHAPE[0] * HEAD_SHAPE[1])
        assert _adapter_bytes(plan.downlink) == expected == _adapter_bytes(up.tensors)


# --- merges into bfloat16 base weights (FLoRA, FedEx-LoRA) ----------------------------------------------------
def _bf16_lora_model():
    from peft import LoraConfig, get_peft_model

    from fedpeft.models.peft_wrap import lora_modules

    net = torch.nn.Sequential()
    net.add_module("q", torch.nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        net.q.weight.fill_(1.0)
    model = get_peft_model(net, LoraConfig(r=2, lora_alpha=4, target_modules=["q"]))
    name = next(iter(lora_modules(model)))
    model.base_model.model.q.base_layer.weight.data = model.base_model.model.q.base_layer.weight.data.to(torch.bfloat16)
    return model, name


def test_small_merges_accumulate_in_a_bfloat16_base_weight():
    """Issue 13, finding 9: ten merges of 0.003 into W0 = 1 (bf16 spacing at 1 is 2^-7 = 0.0078): added
    straight, each is rounded away (W stays 1.0); with the float32 master W is the bf16 nearest to 1.03."""
    from fedpeft.models.peft_wrap import add_to_base_weight, base_weights, lora_modules, master_from_saved, set_base_weights

    plain, name = _bf16_lora_model()
    kept, _ = _bf16_lora_model()
    master: dict[str, torch.Tensor] = {}
    delta = torch.full((3, 4), 0.003)
    for _ in range(10):
        add_to_base_weight(plain, {name: delta})
        add_to_base_weight(kept, {name: delta}, master=master)
    weight = lambda m: lora_modules(m)[name].get_base_layer().weight  # noqa: E731
    assert torch.equal(weight(plain), torch.ones(3, 4, dtype=torch.bfloat16))  # the lost merges (before)
    expected = torch.full((3, 4), 1.0 + 10 * 0.003).to(torch.bfloat16)
    assert float(expected[0, 0]) == 1.03125
    assert torch.equal(weight(kept), expected)
    torch.testing.assert_close(master[name], torch.full((3, 4), 1.03), rtol=0, atol=1e-6)
    # a checkpoint saves the master; a resumed run continues the exact sum
    saved = base_weights(kept, [name], master)
    assert saved[name].dtype == torch.float32
    resumed, _ = _bf16_lora_model()
    set_base_weights(resumed, saved)
    resumed_master = master_from_saved(resumed, saved)
    for model, m in ((kept, master), (resumed, resumed_master)):
        for _ in range(10):
            add_to_base_weight(model, {name: delta}, master=m)
    assert torch.equal(weight(resumed), weight(kept))
    assert torch.equal(weight(kept), torch.full((3, 4), 1.06).to(torch.bfloat16))
