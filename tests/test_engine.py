"""The engine end to end on the tiny model: outputs, peft compatibility, failing clients, byte counts."""


import pytest
import torch

from fedpeft.adapters import get_adapter_state, set_adapter_state, state_bytes
from fedpeft.config import load_config
from fedpeft.federation.engine import Engine, run_experiment
from fedpeft.strategies import STRATEGIES
from fedpeft.strategies.fedit import FedIT
from helpers import run_events


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("engine") / "run"
    summary = run_experiment("configs/tiny.yaml", ["federation.rounds=2"], run_dir=run_dir)
    return summary


def test_run_dir_contents(finished_run):
    run_dir = finished_run.run_dir
    for name in ("config.yaml", "metrics.jsonl", "final/adapter_model.safetensors", "final/adapter_config.json",
                 "checkpoints/LATEST"):
        assert (run_dir / name).exists(), name
    assert [e["round"] for e in run_events(run_dir, "round_end")] == [1, 2]
    assert [e["round"] for e in run_events(run_dir, "eval")] == [0, 2]
    assert len(run_events(run_dir, "client_train")) == 4  # 2 rounds x 2 clients


def test_bytes_are_exact_for_fedit(finished_run):
    run_dir = finished_run.run_dir
    adapter_bytes = run_events(run_dir, "run_start")[0]["adapter_bytes"]
    # tiny config: r=4 on q_proj (64x64) and v_proj (64->32 with 2 kv heads of 16) in 2 layers, fp32
    expected = 2 * 4 * 4 * ((64 + 64) + (64 + 32))
    assert adapter_bytes == expected
    for e in run_events(run_dir, "client_train"):
        assert e["uplink_bytes"] == adapter_bytes and e["downlink_bytes"] == adapter_bytes
    assert finished_run.uplink_bytes == 4 * adapter_bytes


def test_final_adapter_loads_with_peft_and_matches(finished_run):
    from peft import PeftModel

    from fedpeft.models.registry import load_base_model

    base = load_base_model("tiny-llama", seed=0)
    model = PeftModel.from_pretrained(base.model, str(finished_run.final_adapter_dir))
    from safetensors.torch import load_file

    ckpt = load_file(str(finished_run.run_dir / "checkpoints" / "round_0002" / "global.safetensors"))
    loaded = get_adapter_state(model)
    assert loaded.keys() == ckpt.keys()
    for k in ckpt:
        assert torch.equal(loaded[k], ckpt[k]), k
    assert any(torch.count_nonzero(v) > 0 for k, v in loaded.items() if "lora_B" in k)  # it trained


class ExplodingFedIT(FedIT):
    """Client 0 sends NaN, client 1 a wrongly shaped tensor; others behave."""

    name = "exploding"

    def client_update(self, round_idx, plan, trained, result, store):
        update = super().client_update(round_idx, plan, trained, result, store)
        key = next(iter(update.tensors))
        if plan.client_id == 0:
            update.tensors[key] = torch.full_like(update.tensors[key], float("nan"))
        elif plan.client_id == 1:
            update.tensors[key] = torch.zeros(3, 3)
        return update


def test_bad_client_updates_are_rejected_and_logged(tmp_path, monkeypatch):
    monkeypatch.setitem(STRATEGIES, "exploding", ExplodingFedIT)
    cfg = load_config("configs/tiny.yaml", ["method.name=exploding", "federation.clients_per_round=4",
                                            "federation.rounds=1", "evaluation.before_training=false"])
    summary = Engine(cfg, tmp_path / "run").run()
    failed = run_events(summary.run_dir, "client_failed")
    assert {e["client"] for e in failed} == {0, 1}
    assert any("NaN" in e["error"] for e in failed) and any("shape" in e["error"] for e in failed)
    agg = run_events(summary.run_dir, "aggregate")[0]
    assert sorted(agg["clients"]) == [2, 3]
    from safetensors.torch import load_file

    final = load_file(str(summary.final_adapter_dir / "adapter_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values())


def test_bad_data_fails_before_model_load(tmp_path, monkeypatch):
    import fedpeft.models.registry as registry_module

    def boom(*a, **k):
        raise AssertionError("model must not be loaded")

    monkeypatch.setattr(registry_module, "load_base_model", boom)
    cfg = load_config("configs/tiny.yaml", ["data.tasks=[arithmetic, nosuchtask]"])
    with pytest.raises(ValueError, match="unknown generated task 'nosuchtask'"):
        Engine(cfg, tmp_path / "run").run()


def test_uplink_compression_bytes_and_effect(tmp_path, finished_run):
    """int8 on the wire: exactly numel + 4 bytes per tensor, and a final adapter close to the fp32 run's."""
    summary = run_experiment("configs/tiny.yaml", ["federation.rounds=2", "federation.uplink_compression=int8"],
                             run_dir=tmp_path / "int8")
    from safetensors.torch import load_file

    plain = load_file(str(finished_run.final_adapter_dir / "adapter_model.safetensors"))
    numel = sum(v.numel() for v in plain.values())
    for e in run_events(summary.run_dir, "client_train"):
        assert e["uplink_bytes"] == numel + 4 * len(plain)
        assert e["uplink_bytes_raw"] == 4 * numel
    got = load_file(str(summary.final_adapter_dir / "adapter_model.safetensors"))
    worst = max(float((got[k] - plain[k]).abs().max()) for k in plain)
    scale = max(float(v.abs().max()) for v in plain.values())
    assert 0 < worst < 0.05 * scale


def test_unknown_method_fails_before_model_load(tmp_path, monkeypatch):
    import fedpeft.models.registry as registry_module

    monkeypatch.setattr(registry_module, "load_base_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    with pytest.raises(ValueError, match=r"method.name: unknown method 'fedavgx'.*valid methods: .*fedit"):
        Engine(load_config("configs/tiny.yaml", ["method.name=fedavgx"]), tmp_path / "run").run()  # the config refuses it


def test_personal_evaluation_scores_each_clients_own_adapter_and_can_be_capped(tmp_path):
    """FedSA-LoRA: one score per client with its own B on the records of the tasks it holds; mean and
    spread over clients; ``evaluation.personal_max_clients`` takes a seeded sample of clients."""
    base = ["method.name=fedsa_lora", "federation.num_clients=4", "federation.clients_per_round=4",
            "federation.rounds=1", "evaluation.before_training=false", "output.report=false"]
    full = run_experiment("configs/tiny.yaml", base, run_dir=tmp_path / "all")
    [event] = [e for e in run_events(full.run_dir, "eval") if e.get("split") == "personal"]
    scores = {int(k): v for k, v in event["per_client"].items()}
    assert sorted(scores) == [0, 1, 2, 3] and event["clients_total"] == 4
    assert full.final_metrics["personal/mean"] == pytest.approx(sum(scores.values()) / 4)
    assert full.final_metrics["personal/max"] == max(scores.values())
    capped = run_experiment("configs/tiny.yaml", base + ["evaluation.personal_max_clients=2"], run_dir=tmp_path / "cap")
    [event2] = [e for e in run_events(capped.run_dir, "eval") if e.get("split") == "personal"]
    sample = {int(k): v for k, v in event2["per_client"].items()}
    assert len(sample) == 2 and event2["clients_sampled"] == 2 and event2["clients_total"] == 4
    assert all(scores[c] == v for c, v in sample.items())  # the same clients' same scores, just fewer of them
