"""Personalised FL: Ditto, FedPer-style personal layers, local fine-tuning after federation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedpeft.adapters import adapter_parameters, get_adapter_state, set_adapter_state
from fedpeft.config import load_config
from fedpeft.data.dataset import load_experiment_data
from fedpeft.federation.client import ClientRunner, prepare_client_data
from fedpeft.federation.engine import run_experiment
from fedpeft.models.peft_wrap import load_experiment_model
from fedpeft.models.registry import tiny_tokenizer
from fedpeft.seeding import derive_seed
from fedpeft.strategies import build_experiment_strategy
from fedpeft.strategies.base import ClientUpdate
from fedpeft.strategies.ditto import PERSONAL_NAME

from strategy_fakes import MemoryStore, adapter, make

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]


def _randomised(state, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) * scale for k, v in state.items()}


# --- Ditto -----------------------------------------------------------------------------------------------
def test_ditto_personal_step_follows_its_equation():
    """One SGD step of the personal job: v' = v - η (∇F_k(v) + λ (v - w)), with ∇F_k(v) computed here
    from the model's own loss on the same batch."""
    lam, lr = 0.7, 0.05
    cfg = load_config(TINY, ["method.name=ditto", f"method.options.lam={lam}", "training.optimizer=sgd",
                             "training.max_grad_norm=null", "federation.local_steps=1"])
    data = load_experiment_data(cfg)
    _, model = load_experiment_model(cfg, data, device=torch.device("cpu"))
    client_data = prepare_client_data(cfg, data, tiny_tokenizer())
    strategy = build_experiment_strategy(cfg)
    store = MemoryStore()
    w = _randomised(get_adapter_state(model), seed=1)
    v = _randomised(w, seed=2)
    store.put(0, PERSONAL_NAME, v)
    plans = strategy.configure_round(1, [0], w, store)
    assert [p.job for p in plans] == ["global", "personal"] and plans[1].downlink == {}

    # ∇F_k(v) on the batch the personal job draws, independently of the trainer.
    set_adapter_state(model, v)
    params = adapter_parameters(model)
    batch = next(client_data.batches(client_data.examples(0), derive_seed(cfg.seed, "batches", 1, 0, "personal")))
    model.train()
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    expected = {k: v[k] - lr * (grads[k] + lam * (v[k] - w[k])) for k in v}

    runner = ClientRunner(model, strategy, cfg, client_data, store)
    local = runner.train(1, plans[1], w, lr)
    personal = local.update.private[PERSONAL_NAME]
    assert local.update.tensors == {}  # nothing personal is uploaded
    for k in expected:
        torch.testing.assert_close(personal[k], expected[k], rtol=1e-4, atol=1e-6)
    assert max(float((personal[k] - v[k]).abs().max()) for k in v) > 1e-4  # it moved


def test_ditto_aggregates_only_the_global_jobs():
    ditto = make("ditto")
    g = adapter(2, seed=0)
    a, b = adapter(2, seed=1), adapter(2, seed=2)
    updates = [ClientUpdate(0, a, 10, job="global"), ClientUpdate(0, {}, 10, job="personal"),
               ClientUpdate(1, b, 30, job="global"), ClientUpdate(1, {}, 30, job="personal")]
    result = ditto.aggregate(1, g, updates).global_state
    for k in g:
        torch.testing.assert_close(result[k], 0.25 * a[k] + 0.75 * b[k])
