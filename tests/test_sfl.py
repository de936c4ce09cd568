"""Method 'sfl' through the engine: the trunk average is the weighted-mean equation, a split run with no
defence is the plain FedIT run, crossings are metered per client and round, bad cuts are named."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from fedpeft.adapters import get_adapter_state
from fedpeft.models.peft_wrap import wrap_lora
from fedpeft.models.registry import tiny_bert, tiny_llama
from fedpeft.strategies import build_strategy
from fedpeft.strategies.base import ClientUpdate
from fedpeft.strategies.registry import MethodOptionsError
from fedpeft.strategies.sfl import CLIENT_PARTS_NAME, TRUNK_NAME
from helpers import reference_run, run_events

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _strategy(model, **options):
    method = SimpleNamespace(name="sfl", options={"seed": 0, "num_clients": 4, **options},
                             server_optimizer=SimpleNamespace(name="none", lr=None, beta1=None, beta2=None, tau=None))
    strategy = build_strategy(method)
    strategy.prepare_model(model)
    return strategy


def _model(kind="decoder", layers=4):
    if kind == "decoder":
        model, _ = tiny_llama(layers=layers)
        cfg, head = SimpleNamespace(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"], rslora=False), "causal_lm"
    else:
        model, _ = tiny_bert(layers=layers)
        cfg, head = SimpleNamespace(r=2, alpha=4, dropout=0.0, target_modules=["query", "value"], rslora=False), "classification"
    return wrap_lora(model, cfg, seed=0, head=head)


def _random_like(state, seed):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) for k, v in state.items()}


@pytest.mark.parametrize("aggregate_client_parts", [True, False])
def test_trunk_average_is_the_sample_weighted_mean(aggregate_client_parts):
    model = _model("encoder", layers=4)
    strategy = _strategy(model, cut="1-3", aggregate_client_parts=aggregate_client_parts)
    global_state = _random_like(get_adapter_state(model), 0)
    plan = strategy.configure_client(1, 0, global_state, None)
    trunk = [k for k in global_state if ".layer.1." in k or ".layer.2." in k]
    client = [k for k in global_state if k not in trunk]
    assert sorted(plan.upload) == sorted(trunk + (client if aggregate_client_parts else []))
    sizes = [3, 5, 12]
    uploads = [_random_like({k: global_state[k] for k in plan.upload}, 10 + i) for i in range(3)]
    updates = [ClientUpdate(client_id=i, tensors=t, num_examples=n) for i, (t, n) in enumerate(zip(uploads, sizes))]
    new = strategy.aggregate(1, global_state, updates).global_state
    for key in plan.upload:  # theta <- sum_k n_k theta_k / sum_k n_k
        expected = sum(n * t[key] for n, t in zip(sizes, uploads)) / sum(sizes)
        assert torch.allclose(new[key], expected, atol=1e-6), key
    for key in set(global_state) - set(plan.upload):
        assert torch.equal(new[key], global_state[key]), key


def test_per_client_trunk_and_client_parts_come_from_the_store():
    model = _model("decoder", layers=4)
    strategy = _strategy(model, cut="1-3", trunk="per_client", aggregate_client_parts=False, lora_parts=["trunk", "top"])
    global_state = get_adapter_state(model)
    trunk = [k for k in global_state if ".layers.1." in k or ".layers.2." in k]
    kept_trunk = _random_like({k: global_state[k] for k in trunk}, 3)
    kept_parts = _random_like({k: v for k, v in global_state.items() if k not in trunk}, 4)
    store = {(2, TRUNK_NAME): kept_trunk, (2, CLIENT_PARTS_NAME): kept_parts}
    store_api = SimpleNamespace(get=lambda cid, name: store.get((cid, name)))
    plan = strategy.configure_client(1, 2, global_state, store_api)
    assert sorted(plan.downlink) == sorted(trunk)  # client parts are not sent: the client keeps its own
    for key in trunk:
        assert torch.equal(plan.downlink[key], kept_trunk[key])
    assert all(".layers.0." not in k for k in plan.trainable)  # bottom not in lora_parts
    strategy.attach_client_hooks(1, plan, store_api)
    for key, value in kept_parts.items():
        assert torch.equal(plan.init_state[key], value)
    other = strategy.configure_client(1, 0, global_state, store_api)  # no kept trunk yet: the global one
    for key in trunk:
        assert torch.equal(other.downlink[key], global_state[key])


def test_bad_options_name_the_setting():
    model = _model("decoder", layers=2)
    for options, text in [({"cut": "3"}, "method.options.cut: '3' is not a cut"),
                          ({"cut": "2-1"}, "method.options.cut: '2-1' has a >= b"),
                          ({"cut": "0-1", "lora_parts": []}, "method.options.lora_parts"),
                          ({"cut": "0-1", "base": "scaffold"}, "method.options.base"),
                          ({"cut": "0-1", "activation_noise": -1}, "method.options.activation_noise"),
                          ({"cut": "0-1", "lora_parts": ["top"], "aggregate_client_parts": False}, "nothing to upload")]:
        with pytest.raises(MethodOptionsError, match=text):
            _strategy(model, **options)
    with pytest.raises(ValueError, match="method.options.cut: '1-3' is outside the model's layers: it has 2 blocks"):
        _strategy(model, cut="1-3")


def _run(run_dir, *overrides):
    """The run's events; in this process (tiny.yaml fixes model.threads, so the arithmetic is a child's)."""
    reference_run(TINY, ["federation.rounds=2", "evaluation.every_rounds=0", "evaluation.before_training=false",
                         *overrides], run_dir)
    return run_events(run_dir)


def test_split_run_without_defence_is_the_plain_fedit_run(tmp_path):
    split_events = _run(tmp_path / "sfl", "method.name=sfl", "method.options.cut=1-2")
    plain_events = _run(tmp_path / "fedit", "method.name=fedit")
    split, plain = load_file(str(tmp_path / "sfl/final/adapter_model.safetensors")), \
        load_file(str(tmp_path / "fedit/final/adapter_model.safetensors"))
    assert split.keys() == plain.keys()
    for key in split:
        assert torch.allclose(split[key], plain[key], rtol=1e-5, atol=1e-6), key
    losses = lambda events: [e["loss"] for e in events if e["event"] == "client_train"]
    assert losses(split_events) == pytest.approx(losses(plain_events), rel=1e-5)
    # Every crossing is metered per client and round: with a 64-wide float32 model each of the four
    # crossings of a micro-batch is batch * seq * 64 * 4 bytes, so the four totals are equal and divisible.
    for agg in (e for e in split_events if e["event"] == "aggregate"):
        assert agg["split_crossing_bytes"] == sum(c["crossing_bytes"] for c in agg["split_clients"].values()) > 0
        for row in agg["split_clients"].values():
            assert row["act_up"] == row["act_down"] == row["grad_up"] == row["grad_down"]
            assert row["act_up"] % (4 * 64 * 4) == 0  # batch_size 4, hidden 64, float32
            assert row["crossing_bytes"] == 4 * row["act_up"] and row["bytes_per_step"] == row["crossing_bytes"] / 2
            assert len(row["step_bytes"]) == 2 and sum(row["step_bytes"]) == row["crossing_bytes"]
            assert row["wire_bytes"] == row["crossing_bytes"] + row["client_adapter_bytes"]


@pytest.mark.parametrize("path", sorted((TINY.parent / "split").glob("*.yaml")), ids=lambda p: p.stem)
def test_split_configs_validate_offline(path, monkeypatch):
    from fedpeft.config import load_config
    from fedpeft.models import registry
    from fedpeft.strategies import build_experiment_strategy

    monkeypatch.setattr(registry, "load_base_model", lambda *a, **k: pytest.fail("no model may load"))
    strategy = build_experiment_strategy(load_config(path))
    assert strategy.name == "sfl"


def test_defence_options_reach_the_cut():
    model = _model("decoder", layers=2)
    strategy = _strategy(model, cut="1-2", activation_noise=0.25, dchi_epsilon=50.0, nopeek_alpha=0.1)
    d = strategy.split.defences
    assert (d.activation_sigma, d.dchi_epsilon, d.nopeek_alpha) == (0.25, 50.0, 0.1)
    plan = strategy.configure_client(1, 0, get_adapter_state(model), None)
    strategy.attach_client_hooks(1, plan, None)
    gen = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(5, 200, (3, 6), generator=gen), "attention_mask": torch.ones(3, 6, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    model.train()
    model(**batch).loss.backward()
    result = SimpleNamespace(num_examples=3, steps=1, mean_loss=0.0)
    update = strategy.client_update(1, plan, get_adapter_state(model), result, None)
    assert update.metrics["split/act_up_bytes"] == 3 * 6 * 64 * 4 and 0 < update.metrics["split/nopeek_loss"] <= 0.1


def test_report_section_compares_split_bytes_with_plain_fl(tmp_path):
    from fedpeft.split.report import split_byte_rows, split_report_section

    events = [{"event": "run_start", "adapter_bytes": 1000},
              {"event": "aggregate", "round": 1, "split_clients": {"0": {}, "3": {}}, "split_crossing_bytes": 500,
               "split_client_adapter_bytes": 300, "split_wire_bytes": 800},
              {"event": "aggregate", "round": 2, "clients": [1]}]  # not a split round: no row
    rows = split_byte_rows(events)
    assert rows == [{"round": 1, "clients": 2, "crossing_bytes": 500, "client_adapter_bytes": 300,
                     "wire_bytes": 800, "plain_fl_bytes": 2 * 1000 * 2}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")
    text = "\n".join(split_report_section(tmp_path, tmp_path))
    assert "| 1 | 2 | 0.001 | 0.000 | 0.001 | 0.004 | 0.20 |" in text


def test_encoder_classifier_trains_split_with_private_client_parts(tmp_path):
    """tiny-bert with its classifier head in the top part: the client parts (head included) stay with each
    client, only the trunk is uploaded and averaged."""
    from fedpeft.federation.engine import run_experiment

    overrides = ["model.name=tiny-bert", "model.head=classification", "peft.target_modules=[query,value]",
                 "data.tasks=[sentiment,parity]", "data.train_examples_per_task=20", "data.eval_examples_per_task=4",
                 "federation.num_clients=2", "federation.clients_per_round=2", "federation.rounds=2",
                 "federation.local_steps=2", "federation.batch_size=4", "training.max_seq_len=48",
                 "evaluation.before_training=false", "output.progress=false", "output.report=false",
                 "method.name=sfl", "method.options.cut=1-2", "method.options.aggregate_client_parts=false"]
    run_experiment(str(TINY), overrides, run_dir=tmp_path / "run")
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    aggs = [e for e in events if e["event"] == "aggregate"]
    assert len(aggs) == 2 and all(row["client_adapter_bytes"] == 0 for a in aggs for row in a["split_clients"].values())
    assert any(e["event"] == "eval" and "accuracy" in e["metrics"] for e in events)
    kept = list((tmp_path / "run" / "client_store").glob("*/sfl_client_parts*"))
    assert len(kept) >= 2
    parts = load_file(str(kept[0]))
    assert any("classifier" in k for k in parts) and any(".layer.0." in k for k in parts)
    assert not any(".layer.1." in k for k in parts)  # the trunk is the server's


def test_saved_crossings_are_what_crossed_for_the_true_inputs(tmp_path):
    """save_crossings: the first micro-batches of every job, with the inputs they came from; the first
    micro-batch of round 1 crossed before any step, so its act_up is the initial bottom's map of its inputs."""
    from safetensors import safe_open

    from fedpeft.federation.engine import run_experiment
    from fedpeft.split.parts import bottom_forward

    run_experiment(str(TINY), ["federation.rounds=1", "evaluation.every_rounds=0", "evaluation.before_training=false",
                               "output.report=false", "method.name=sfl", "method.options.cut=1-2",
                               "method.options.save_crossings=1"], run_dir=tmp_path / "run")
    files = sorted((tmp_path / "run" / "split_crossings" / "round_0001").glob("*.safetensors"))
    assert len(files) == 2  # clients_per_round
    with safe_open(str(files[0]), "pt") as f:
        meta, saved = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    assert meta["cut"] == "1-2" and meta["activation_sigma"] == "0.0"
    assert sorted(saved) == sorted(f"0/{k}" for k in ("act_up", "act_down", "grad_up", "grad_down", "input_ids",
                                                        "attention_mask", "labels"))
    ids, mask = saved["0/input_ids"], saved["0/attention_mask"]
    assert saved["0/act_up"].shape == (*ids.shape, 64) == saved["0/grad_up"].shape
    model, _ = tiny_llama()
    wrapped = wrap_lora(model, SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"],
                                               rslora=False), seed=0)
    wrapped.eval()
    with torch.no_grad():
        h = bottom_forward(wrapped, "1-2", input_ids=ids, attention_mask=mask)
    assert torch.allclose(h, saved["0/act_up"], atol=1e-5)
