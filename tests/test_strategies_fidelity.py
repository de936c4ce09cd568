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
