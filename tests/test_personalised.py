"""Personalised FL: Ditto, FedPer-style personal layers, local fine-tuning after federation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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

from fedpeft.strategies.fedper import personal_keys

from strategy_fakes import HEAD, MemoryStore, adapter, make, run_round

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


# --- FedPer ----------------------------------------------------------------------------------------------
def test_fedper_selects_keys_by_substring_and_by_last_layers():
    keys = list(adapter(2, seed=0))  # layers 0 (q, v) and 1 (q), and a head
    assert personal_keys(keys, [], 1) == {k for k in keys if ".layers.1." in k}
    assert personal_keys(keys, ["score"], 0) == {HEAD}
    assert personal_keys(keys, ["v_proj"], 1) == {k for k in keys if ".layers.1." in k or "v_proj" in k}


def test_fedper_keeps_personal_tensors_on_the_client_and_averages_the_rest():
    fedper = make("fedper", personal_modules=["score"], personal_last_layers=1)
    g = adapter(2, seed=0)
    store = MemoryStore()
    sizes = {0: 10, 1: 30}
    plans, updates, agg = run_round(fedper, 1, [0, 1], g, store, sizes)
    personal = personal_keys(list(g), ["score"], 1)
    for plan, up in zip(plans, updates):
        assert set(plan.downlink) == set(up.tensors) == set(g) - personal  # personal keys never travel
        kept = store.get(plan.client_id, "fedper_personal")
        assert set(kept) - {"__num_examples__"} == personal
    for k in g:
        if k in personal:
            assert torch.equal(agg.global_state[k], g[k])  # not aggregated
        else:
            torch.testing.assert_close(agg.global_state[k], 0.25 * updates[0].tensors[k] + 0.75 * updates[1].tensors[k])
    # Round 2: a client starts from its own personal tensors, merged on the client from its store.
    plans2 = fedper.configure_round(2, [1], agg.global_state, store)
    fedper.attach_client_hooks(2, plans2[0], store)
    for k in personal:
        assert torch.equal(plans2[0].init_state[k], store.get(1, "fedper_personal")[k])
    # An upload carrying a personal tensor is refused (the engine drops that client).
    bad = ClientUpdate(0, {**updates[0].tensors, HEAD: g[HEAD]}, 10)
    with pytest.raises(ValueError, match="personal layers stay on the client"):
        fedper.check_update(g, bad)


def test_fedper_options_must_select_a_strict_part():
    with pytest.raises(Exception, match="needs a personal part"):
        make("fedper", personal_last_layers=0)
    fedper = make("fedper", personal_modules=["lora_"], personal_last_layers=0)
    with pytest.raises(ValueError, match="select every adapter tensor"):
        fedper.configure_round(1, [0], adapter(2, seed=0, head=False), MemoryStore())


# --- local fine-tuning after federation, and the report ----------------------------------------------------
def test_finetune_is_sgd_on_the_clients_own_data_from_the_given_adapter():
    lr = 0.05
    cfg = load_config(TINY, ["training.optimizer=sgd", "training.max_grad_norm=null", "evaluation.finetune_steps=1"])
    data = load_experiment_data(cfg)
    _, model = load_experiment_model(cfg, data, device=torch.device("cpu"))
    client_data = prepare_client_data(cfg, data, tiny_tokenizer())
    start = _randomised(get_adapter_state(model), seed=4)
    set_adapter_state(model, start)
    params = adapter_parameters(model)
    batch = next(client_data.batches(client_data.examples(2), derive_seed(cfg.seed, "finetune", 2)))
    model.train()
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    runner = ClientRunner(model, build_experiment_strategy(cfg), cfg, client_data, MemoryStore())
    tuned, mean_loss = runner.finetune(2, start, steps=1, lr=lr)
    assert mean_loss == pytest.approx(float(loss.detach()), rel=1e-5)
    for k in start:
        torch.testing.assert_close(tuned[k], start[k] - lr * grads[k], rtol=1e-4, atol=1e-6)
    assert runner.store.data == {}  # nothing kept


def test_ditto_run_reports_personal_and_finetuned_spread_beside_the_global_model(tmp_path):
    reward = Path(__file__).resolve().parents[1] / "configs" / "alignment" / "reward_tiny.yaml"
    summary = run_experiment(reward, ["method.name=ditto", "federation.rounds=2", "evaluation.every_rounds=0",
                                      "evaluation.before_training=false", "evaluation.finetune_steps=2"],
                             run_dir=tmp_path / "run")
    evals = {e.get("split", "global"): e for e in _events(summary.run_dir, "eval")}
    assert set(evals) == {"global", "personal", "finetuned"}
    for split in ("personal", "finetuned"):
        scores = list(evals[split]["per_client"].values())
        assert evals[split]["headline"] == "pairwise_accuracy"
        assert evals[split]["metrics"][f"{split}/mean"] == pytest.approx(sum(scores) / len(scores))
        assert evals[split]["metrics"][f"{split}/std"] == pytest.approx(float(torch.tensor(scores).std(unbiased=False)))
    # Ditto's personal jobs upload nothing; its global jobs upload the whole adapter.
    train = _events(summary.run_dir, "client_train")
    assert {e["job"] for e in train} == {"global", "personal"}
    assert all(e["uplink_bytes"] == 0 for e in train if e["job"] == "personal")
    report = (summary.run_dir / "report" / "report.md").read_text()
    section = report[report.index("## Personalised evaluation"):report.index("## Costs")]
    assert f"| global model (round 2) | {evals['global']['metrics']['pairwise_accuracy']:.4g} |" in section
    assert "personal: each client's own adapter" in section and "finetuned: local fine-tuning" in section


def test_fedper_run_keeps_the_reward_head_on_the_clients(tmp_path):
    reward = Path(__file__).resolve().parents[1] / "configs" / "alignment" / "reward_tiny.yaml"
    summary = run_experiment(reward, ["method.name=fedper", "method.options.personal_modules=[score]",
                                      "method.options.personal_last_layers=0", "federation.rounds=2",
                                      "evaluation.every_rounds=0", "evaluation.before_training=false"],
                             run_dir=tmp_path / "run")
    start = _events(summary.run_dir, "run_start")[0]
    saved = load_file(str(summary.run_dir / "final" / "adapter_model.safetensors"))
    head = sum(v.numel() * v.element_size() for k, v in saved.items() if "score" in k)
    assert head > 0
    for e in _events(summary.run_dir, "client_train"):
        assert e["uplink_bytes"] == start["adapter_bytes"] - head  # everything but the personal head
    assert "personal/mean" in summary.final_metrics
