"""Loading records from every local format, per-client directories, column mapping, hub errors."""

from __future__ import annotations

import json
import sys
import types

import pytest

from fedpeft.data.sources import (
    DataError,
    apply_columns,
    load_hub,
    load_local,
    load_records,
    parse_columns,
    require_fields,
)

ROWS = [{"question": "What is 2+2?", "answer": "4"}, {"question": "Capital of France?", "answer": "Paris"}]


def _write(path, fmt, rows=ROWS):
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        lines = [sep.join(rows[0])] + [sep.join(str(v) for v in r.values()) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "tsv", "parquet"])
def test_each_format_loads_and_maps_columns(tmp_path, fmt):
    path = _write(tmp_path / f"data.{fmt}", fmt)
    assert load_local(path) == ROWS
    mapped = load_local(path, "question->instruction, answer->output")
    assert mapped == [{"instruction": "What is 2+2?", "output": "4"}, {"instruction": "Capital of France?", "output": "Paris"}]


def test_json_variants(tmp_path):
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": ROWS}))
    assert load_local(tmp_path / "wrapped.json") == ROWS
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in ROWS))
    assert load_local(tmp_path / "lines.json") == ROWS


def test_headerless_csv_with_fieldnames(tmp_path):
    (tmp_path / "mmlu.csv").write_text('What is 1+1?,1,2,3,"4, or more",B\n')
    rows = load_local(tmp_path / "mmlu.csv", fieldnames=["question", "A", "B", "C", "D", "answer"])
    assert rows == [{"question": "What is 1+1?", "A": "1", "B": "2", "C": "3", "D": "4, or more", "answer": "B"}]


def test_directory_of_per_client_files_in_natural_order(tmp_path):
    for i in (10, 2, 1):
        _write(tmp_path / f"client_{i}.json", "json", [{"instruction": f"q{i}", "output": "a"}])
    (tmp_path / "notes.txt").write_text("ignored")
    rows = load_local(tmp_path)
    assert [r["client"] for r in rows] == ["client_1", "client_2", "client_10"]
    only = load_local(tmp_path, pattern="client_1*")
    assert [r["client"] for r in only] == ["client_1", "client_10"]


def test_parse_columns_forms():
    assert parse_columns("a->b, c=d") == {"a": "b", "c": "d"}
    assert parse_columns({"x": "y"}) == {"x": "y"}
    with pytest.raises(DataError, match="source->field"):
        parse_columns("oops")


@pytest.mark.parametrize(
    "setup, call, message",
    [
        (lambda p: None, lambda p: load_local(p / "missing.json"), "missing.json"),
        (lambda p: (p / "empty.json").write_text("[]"), lambda p: load_local(p / "empty.json"), "no records"),
        (lambda p: _write(p / "d.jsonl", "jsonl"), lambda p: load_local(p / "d.jsonl", "prompt->instruction"), "'prompt'"),
        (lambda p: (p / "bad.jsonl").write_text('{"a": 1}\n{oops\n'), lambda p: load_local(p / "bad.jsonl"), "line 2"),
        (lambda p: (p / "d.xml").write_text("<a/>"), lambda p: load_local(p / "d.xml"), "unsupported"),
        (lambda p: (p / "s.json").write_text('["a", "b"]'), lambda p: load_local(p / "s.json"), "record 0"),
        (lambda p: (p / "empty_dir").mkdir(), lambda p: load_local(p / "empty_dir"), "no"),
    ],
)
def test_bad_input_names_file_and_field(tmp_path, setup, call, message):
    setup(tmp_path)
    with pytest.raises(DataError, match=message):
        call(tmp_path)


def test_missing_mapped_column_names_the_file(tmp_path):
    path = _write(tmp_path / "d.json", "json")
    with pytest.raises(DataError) as info:
        load_local(path, {"prompt": "instruction"})
    assert str(path) in str(info.value) and "question" in str(info.value)


def test_require_fields():
    with pytest.raises(DataError, match="'output'"):
        require_fields(ROWS, ["question", "output"], "x.json")
    assert apply_columns(ROWS, None) is ROWS


def _fake_datasets(monkeypatch, load_dataset):
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


class _FakeDataset(list):
    def select(self, indices):
        return _FakeDataset(self[i] for i in indices)


def test_hub_loading_through_datasets(monkeypatch):
    calls = []

    def load_dataset(name, config=None, split=None, revision=None):
        calls.append((name, config, split))
        return _FakeDataset(ROWS * 3)

    _fake_datasets(monkeypatch, load_dataset)
    rows = load_records("openai/gsm8k", "question->instruction", split="test", hub_config="main", limit=2)
    assert calls == [("openai/gsm8k", "main", "test")]
    assert rows == [{"instruction": "What is 2+2?", "answer": "4"}, {"instruction": "Capital of France?", "answer": "Paris"}]


def test_hub_offline_error_says_what_to_do(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    _fake_datasets(monkeypatch, load_dataset)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="data.path") as info:
        load_hub("openai/gsm8k", "main", "train")
    assert "'openai/gsm8k'" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)


def test_hub_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="datasets"):
        load_hub("some/dataset")


def test_local_path_never_touches_the_hub(tmp_path, monkeypatch):
    def load_dataset(*args, **kwargs):  # pragma: no cover - must not be called
        raise AssertionError("hub called for a local path")

    _fake_datasets(monkeypatch, load_dataset)
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")
