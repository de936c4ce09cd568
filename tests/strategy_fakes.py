"""Pure-tensor fakes for strategy tests: adapter states of tiny LoRA modules, an in-memory client
store, and a miniature engine round (load plan, fake SGD with the plan's hooks, client_update)."""

from __future__ import annotations

import copy

import torch

from fedpeft.adapters import lora_pairs
from fedpeft.config import MethodConfig, ServerOptimizerConfig
from fedpeft.strategies import build_strategy
from fedpeft.strategies.base import ClientUpdate, TrainResult

PREFIX = "base_model.model.model.layers.{}.self_attn.{}"
MODULES = {PREFIX.format(0, "q_proj"): (6, 5), PREFIX.format(0, "v_proj"): (3, 5), PREFIX.format(1, "q_proj"): (6, 5)}
"""module name -> (d_out, d_in)"""
ALPHA = 8.0
HEAD = "base_model.model.score.modules_to_save.default.weight"
"""A non-LoRA adapter key (a classifier's head, peft's ``modules_to_save``): every fake adapter holds one,
so every strategy test also exercises the keys that are not LoRA factors."""
HEAD_SHAPE = (2, 5)


def a_key(module: str) -> str:
    return f"{module}.lora_A.default.weight"


def b_key(module: str) -> str:
    return f"{module}.lora_B.default.weight"


def adapter(r: int, seed: int, zero_b: bool = False, head: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module, (d_out, d_in) in MODULES.items():
        out[a_key(module)] = torch.randn(r, d_in, generator=g)
        out[b_key(module)] = torch.zeros(d_out, r) if zero_b else torch.randn(d_out, r, generator=g)
    if head:
        out[HEAD] = torch.randn(HEAD_SHAPE, generator=g)
    return out


def base_weights(seed: int = 99) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(d_out, d_in, generator=g) for m, (d_out, d_in) in MODULES.items()}


def model_weights(w0, global_state, scaling: float, base_delta=None) -> dict[str, torch.Tensor]:
    """W0 (+ base_delta) + s * B @ A per module: the model the engine would evaluate."""
    out = {}
    for module, (ak, bk) in lora_pairs(global_state).items():
        w = w0[module].clone().double()
        if base_delta and module in base_delta:
            w += base_delta[module].double()
        out[module] = w + scaling * global_state[bk].double() @ global_state[ak].double()
    return out


def exact_average(w0, client_states, weights, scalings) -> dict[str, torch.Tensor]:
    """W0 + sum_k p_k s_k B_k A_k with each client's (possibly sliced) factors."""
    out = {m: w.clone().double() for m, w in w0.items()}
    for state, p, s in zip(client_states, weights, scalings):
        for module, (ak, bk) in lora_pairs(state).items():
            out[module] += p * s * state[bk].double() @ state[ak].double()
    return out


class MemoryStore:
    """The ClientStore interface (get/put of tensor dicts), in memory; values are copied like a disk would."""

    def __init__(self) -> None:
        self.data: dict[tuple[int, str], dict[str, torch.Tensor]] = {}

    def get(self, client_id, name):
        value = self.data.get((client_id, name))
        return None if value is None else {k: v.clone() for k, v in value.items()}

    def put(self, client_id, name, state):
        self.data[(client_id, name)] = {k: v.detach().clone() for k, v in state.items()}

    def copy(self) -> "MemoryStore":
        return copy.deepcopy(self)


def make(name: str, server_optimizer: str = "none", **options):
    options.setdefault("lora_alpha", ALPHA)
    return build_strategy(MethodConfig(name=name, options=options,
                                       server_optimizer=ServerOptimizerConfig(name=server_optimizer, lr=0.5)))


def update(client_id: int, tensors, n: int) -> ClientUpdate:
    return ClientUpdate(client_id=client_id, tensors=tensors, num_examples=n)


def run_round(strategy, round_idx, clients, global_state, store, sizes, steps=3, lr=0.1, noise_seed=0):
    """What the engine does for one round, with fake gradients: the global loaded, then the plan's
    init_state; only plan.trainable trains; extra_loss is back-propagated and grad_transform applied
    before each SGD step. Returns (plans, updates, aggregate result)."""
    plans = strategy.configure_round(round_idx, clients, global_state, store)
    updates = []
    for plan in plans:
        strategy.attach_client_hooks(round_idx, plan, store)  # client side, before loading
        state = {k: v.clone() for k, v in global_state.items()}
        state.update({k: v.clone() for k, v in (plan.init_state if plan.init_state is not None else plan.downlink).items()})
        trainable = plan.trainable if plan.trainable is not None else list(state)
        params = {k: torch.nn.Parameter(state[k].clone()) for k in trainable}
        g = torch.Generator().manual_seed(noise_seed * 100003 + round_idx * 1009 + plan.client_id)
        for _ in range(steps):
            for k in sorted(params):
                params[k].grad = torch.randn(params[k].shape, generator=g)
            if plan.extra_loss is not None:
                plan.extra_loss(params).backward()
            if plan.grad_transform is not None:
                plan.grad_transform(params)
            with torch.no_grad():
                for p in params.values():
                    p -= lr * p.grad
        trained = dict(state)
        trained.update({k: p.detach().clone() for k, p in params.items()})
        result = TrainResult(steps=steps, examples_seen=steps * 4, num_examples=sizes[plan.client_id],
                             mean_loss=1.0, last_loss=1.0, lr=lr, seconds=0.0)
        up = strategy.client_update(round_idx, plan, trained, result, store)
        strategy.check_update(global_state, up)
        strategy.commit_private(up, store)  # what the engine does once the update is accepted
        updates.append(up)
    agg = strategy.aggregate(round_idx, global_state, updates) if plans else None
    return plans, updates, agg
