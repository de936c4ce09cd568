"""A newcomer's own data: headerless files, inferred labels, a separate evaluation file, the records
preview, the seeded evaluation sample, the per-round log line and the noise warning."""

from __future__ import annotations

import csv
import json
import logging
import math

import pytest

from fedpeft.config import build_config
from fedpeft.data.dataset import load_experiment_data, sample_evaluation
from fedpeft.data.sources import DataError, load_local
from fedpeft.data.tasks import get_task

TOPICS = ["World", "Sports", "Business", "Sci/Tech"]


def _write_tsv(path, rows):
    path.write_text("".join(f"{label}\t{text}\n" for label, text in rows))
    return path


def _topic_rows(n, offset=0):
    return [(TOPICS[i % 4], f"headline number {i + offset} about {TOPICS[i % 4].lower()}") for i in range(n)]


def _config(train, **data):
    return build_config({"data": {"source": str(train), "fieldnames": ["label", "text"], "task": "classification",
                                  "partition": {"by": "label"}, **data}})


def test_headerless_tsv_with_fieldnames_keeps_its_first_row(tmp_path):
    path = _write_tsv(tmp_path / "ag.tsv", [("Sci/Tech", "first row, not a header"), ("World", "second"), ("Sports", "third")])
    with path.open() as handle:  # what the file holds, read independently of fedpeft
        lines = [line for line in csv.reader(handle, delimiter="\t")]
    records = load_local(path, fieldnames=["label", "text"])
    assert [[r["label"], r["text"]] for r in records] == lines
    assert len(load_local(path)) == len(lines) - 1  # without field names the first row is the header
    # A file that does have a header, read with field names, is refused rather than turned into a record.
    _write_tsv(tmp_path / "with_header.tsv", [("label", "text"), ("World", "x")])
    with pytest.raises(DataError, match="repeats data.fieldnames"):
        load_local(tmp_path / "with_header.tsv", fieldnames=["label", "text"])


def test_headerless_file_through_the_config_loses_no_record(tmp_path):
    rows = _topic_rows(40)
    train = _write_tsv(tmp_path / "ag.tsv", rows)
    data = load_experiment_data(_config(train, eval_examples_per_task=8))
    texts = sorted(r["text"] for r in data.train + data.evaluation)
    assert texts == sorted(text for _, text in rows)  # train + hold-out = every line, the first included


def test_four_labels_are_inferred_sorted_and_lower_cased(tmp_path):
    train = _write_tsv(tmp_path / "ag.tsv", _topic_rows(40))
    data = load_experiment_data(_config(train))
    task = data.tasks["ag"]
    assert task.label_words == {label: label.lower() for label in sorted(TOPICS)}
    assert data.info["label_sets"] == {"ag": task.label_words} and data.info["labels_inferred"] == ["ag"]
    assert data.classes() == sorted(label.lower() for label in TOPICS)
    assert {r["output"] for r in data.train} == {label.lower() for label in TOPICS}
    # The instruction names this data's labels, not SST-2's sentiment.
    instruction = data.train[0]["instruction"]
    assert "sentiment" not in instruction and all(label.lower() in instruction for label in TOPICS)
    # Integer labels sort as numbers; given label_words win over inference.
    numbers = get_task("classification")
    numbers.fit_labels([{"text": "x", "label": v} for v in (10, 2, 1, 2)])
    assert list(numbers.label_words) == ["1", "2", "10"]
    given = get_task("classification", label_words={"World": "politics", "Sports": "sport"})
    assert given.fit_labels([{"text": "x", "label": "World"}]) == {"World": "politics", "Sports": "sport"}
    with pytest.raises(DataError, match="only the value"):
        get_task("classification").fit_labels([{"text": "x", "label": "World"}] * 3)


def test_eval_source_file_is_the_evaluation_set(tmp_path):
    train_rows, test_rows = _topic_rows(40), _topic_rows(12, offset=1000)
    train = _write_tsv(tmp_path / "ag_train.tsv", train_rows)
    test = _write_tsv(tmp_path / "ag_test.tsv", test_rows)
    data = load_experiment_data(_config(train, eval_source=str(test)))
    assert [r["text"] for r in data.evaluation] == [text for _, text in test_rows]  # that file, in its order
    assert sorted(r["text"] for r in data.train) == sorted(text for _, text in train_rows)  # nothing held out
    assert {r["task"] for r in data.evaluation} == {"ag_train"}  # the training task's name: tables line up
    assert data.info["eval_source"] == str(test)
    # Records that carry their own task keep it.
    tagged = tmp_path / "tagged.jsonl"
    tagged.write_text("".join(json.dumps({"task": "ag_train", "text": t, "label": lab}) + "\n" for lab, t in test_rows))
    assert [r["task"] for r in load_experiment_data(_config(train, eval_source=str(tagged))).evaluation] == ["ag_train"] * 12


def test_evaluation_labels_outside_the_training_set_are_refused(tmp_path):
    train = _write_tsv(tmp_path / "ag_train.tsv", _topic_rows(40))
    test = _write_tsv(tmp_path / "ag_test.tsv", [("World", "a"), ("Health", "b"), ("Travel", "c"), ("Health", "d")])
    with pytest.raises(DataError) as err:
        load_experiment_data(_config(train, eval_source=str(test)))
    message = str(err.value)
    assert "['Health', 'Travel']" in message and "ag_test.tsv" in message and "training label set" in message


def test_hub_eval_source_needs_a_split(tmp_path):
    train = _write_tsv(tmp_path / "ag.tsv", _topic_rows(40))
    with pytest.raises(DataError, match="set data.eval_split"):
        load_experiment_data(_config(train, eval_source="someone/ag_news"))


def test_the_head_reads_the_text_alone_unless_configured(tmp_path):
    from fedpeft.data.encoding import classification_text

    train = _write_tsv(tmp_path / "ag.tsv", _topic_rows(40))
    record = load_experiment_data(_config(train)).train[0]
    assert classification_text(record) == record["text"]
    cfg = _config(train, task_options={"head_instruction": True})
    record = load_experiment_data(cfg).train[0]
    assert classification_text(record) == f"{record['instruction']}\nSentence: {record['text']}"


def test_evaluation_cap_is_one_seeded_sample_per_group():
    records = [{"task": t, "i": i} for t in ("a", "b") for i in range(10)] + [{"task": "c", "i": 0}]
    first = sample_evaluation(records, 3, seed=5)
    assert first == sample_evaluation(list(records), 3, seed=5)  # the same records every time
    counts = {t: sum(r["task"] == t for r in first) for t in "abc"}
    assert counts == {"a": 3, "b": 3, "c": 1}
    assert [r["i"] for r in first if r["task"] == "a"] != [0, 1, 2] or [r["i"] for r in first if r["task"] == "b"] != [0, 1, 2]
    assert first == [r for r in records if r in first]  # file order kept
    assert sample_evaluation(records, None, seed=5) is records


def test_every_evaluation_of_a_run_scores_the_same_records(tmp_path):
    from fedpeft.federation.engine import run_experiment

    run_experiment("configs/tiny.yaml", ["evaluation.max_examples=2", "evaluation.every_rounds=1", "federation.rounds=2"],
                   run_dir=tmp_path / "run")
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["round"] for e in evals] == [0, 1, 2]
    assert {e["examples"] for e in evals} == {2 * 3}  # 3 tasks x 2, the final evaluation included
    start = next(e for e in events if e["event"] == "run_start")
    assert start["data"]["evaluation_sample"] == {"max_examples_per_group": 2, "kept": 6, "of": 12, "seed": 0}


def test_records_preview_loads_no_model(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import fedpeft.models.registry as registry
    from fedpeft.cli import app

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(registry, "load_base_model", boom)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", boom)
    train = _write_tsv(tmp_path / "ag_train.tsv", _topic_rows(40))
    test = _write_tsv(tmp_path / "ag_test.tsv", _topic_rows(8, offset=500))
    result = CliRunner().invoke(app, [
        "data", "-n", "2", f"data.source={train}", "data.fieldnames=[label,text]", "data.task=classification",
        f"data.eval_source={test}", "model.head=classification", "model.name=all-minilm-l6-v2"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "training records: 40" in out and "evaluation records: 8" in out
    assert "Business -> business, Sci/Tech -> sci/tech, Sports -> sports, World -> world" in out
    assert out.count("head_text: headline number") == 4  # 2 training + 2 evaluation records
    assert "headline number 500 about world" in out  # the evaluation file's first record
    bad = CliRunner().invoke(app, ["data", f"data.source={tmp_path / 'missing.tsv'}"])
    assert bad.exit_code == 2 and "does not exist" in bad.output


def test_plain_progress_line_per_round(caplog, monkeypatch):
    from fedpeft.federation import progress as progress_module

    monkeypatch.setattr(progress_module.sys.stderr, "isatty", lambda: False, raising=False)
    caplog.set_level(logging.INFO, logger="fedpeft.federation.progress")
    progress = progress_module.RunProgress(enabled=True, rounds=3)
    with progress:
        progress.start_round(1, 2)
        progress.end_client(1.0)
        progress.end_client(2.0)
        progress.end_round(1_500_000, 3_000_000)
        progress.start_round(2, 1)
        progress.end_client(0.5)
        progress.set_metric("accuracy", 0.8125)
        progress.end_round(750_000, 1_500_000)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("round 1/3: mean loss 1.500 (2 clients), ") and "accuracy" not in lines[0]
    assert lines[0].endswith("uplink 1.5 MB, downlink 3.0 MB")
    assert lines[1].startswith("round 2/3: mean loss 0.500 (1 client), accuracy 0.812, ")
    assert not progress_module.RunProgress(enabled=False, rounds=3).plain


def test_noise_rule_is_two_binomial_standard_errors():
    from fedpeft.report.noise import noise_warnings, within_noise

    # 0.26 -> 0.30 on 100 records each: se = sqrt(.26*.74/100 + .3*.7/100) = 0.0632, 2 se = 0.126 > 0.04
    se = math.sqrt(0.26 * 0.74 / 100 + 0.30 * 0.70 / 100)
    assert within_noise(0.26, 100, 0.30, 100) and 2 * se > 0.04
    assert not within_noise(0.26, 1000, 0.40, 1000)  # 2 se = 0.042 < 0.14
    assert within_noise(0.0, 50, 0.0, 50)  # unchanged at zero: the model did not move
    first = {"round": 0, "examples": 100, "metrics": {"accuracy": 0.26, "ag/accuracy": 0.26}}
    last = {"round": 5, "examples": 100, "metrics": {"accuracy": 0.30, "ag/accuracy": 0.30}}
    [warning] = noise_warnings(first, last)
    assert "accuracy went from 0.260" in warning and "n=100" in warning and f"{2 * se:.3f}" in warning
    assert noise_warnings(first, {**last, "metrics": {"accuracy": 0.9}}) == []


def test_evaluating_more_often_does_not_change_training(tmp_path):
    """The quickstart evaluates every 2 rounds: evaluations draw no randomness and leave the model as
    they found it, so the trained adapter and the final metrics are those of a run evaluated only at the end."""
    import torch
    from safetensors.torch import load_file

    from fedpeft.federation.engine import run_experiment

    runs = {every: run_experiment("configs/tiny.yaml", [f"evaluation.every_rounds={every}", "federation.rounds=2"],
                                  run_dir=tmp_path / f"every{every}") for every in (0, 1)}
    assert runs[0].final_metrics == runs[1].final_metrics
    adapters = {every: load_file(str(run.final_adapter_dir / "adapter_model.safetensors")) for every, run in runs.items()}
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
