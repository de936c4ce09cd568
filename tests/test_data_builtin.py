"""Built-in dataset names: local resolution (data.path, FEDPEFT_DATA_DIR), hub fallback, groups, and
``load_for_experiment``. Everything runs on small files the tests write; no network, no ../shared."""

from __future__ import annotations

import json
import sys
import types

import pytest

from fedpeft.config import load_config
from fedpeft.data import builtin as builtin_module
from fedpeft.data.builtin import BUILTINS, builtin, load_builtin, load_source, make_task
from fedpeft.data.dataset import load_experiment_data
from fedpeft.data.partition import partition
from fedpeft.data.sources import DataError

GSM_ROWS = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(12)]


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    """A small copy of the shared layout; FEDPEFT_DATA_DIR points at it, the repo fallback is disabled."""
    root = tmp_path / "data"
    (root / "gsm8k").mkdir(parents=True)
    (root / "gsm8k" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in GSM_ROWS[:10]))
    (root / "gsm8k" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in GSM_ROWS[10:]))
    dolly = root / "dolly" / "10"
    dolly.mkdir(parents=True)
    for c in range(3):
        rows = [{"instruction": f"c{c} q{i}", "context": "", "response": "r", "category": ["open_qa", "summarization"][i % 2]}
                for i in range(4 + c)]
        (dolly / f"local_training_{c}.json").write_text(json.dumps(rows))
    (dolly / "global_test.json").write_text(json.dumps([{"instruction": "t", "context": "", "response": "r",
                                                          "category": "open_qa"}]))
    (dolly / "public_training.json").write_text(json.dumps([{"instruction": "p", "context": "", "response": "r",
                                                              "category": "open_qa"}]))
    (root / "mmlu" / "dev").mkdir(parents=True)
    (root / "mmlu" / "val").mkdir(parents=True)
    for subject in ("virology", "anatomy"):
        (root / "mmlu" / "dev" / f"{subject}_dev.csv").write_text(
            "".join(f"{subject} dev {i}?,a,b,c,d,{'ABCD'[i % 4]}\n" for i in range(5)))
        (root / "mmlu" / "val" / f"{subject}_val.csv").write_text(f"{subject} val?,a,b,c,d,C\n")
    (root / "sst2").mkdir()
    (root / "sst2" / "train.tsv").write_text("sentence\tlabel\ngood \t1\nbad \t0\n\"quoted\" film \t1\n")
    (root / "sst2" / "dev.tsv").write_text("sentence\tlabel\nfine \t1\n")
    monkeypatch.setenv("FEDPEFT_DATA_DIR", str(root))
    monkeypatch.setattr(builtin_module, "REPO_ROOT", tmp_path / "no-repo")
    return root


def test_names_cover_the_seed_datasets():
    for name in ["gsm8k", "commonsense_170k", "boolq", "piqa", "social_i_qa", "ARC-Challenge", "ARC-Easy", "openbookqa",
                 "hellaswag", "winogrande", "dolly", "alpaca_gpt4", "mmlu", "sst2", "mrpc", "qqp", "qnli", "rte",
                 "mt_bench", "AQuA", "SVAMP", "glue", "commonsense_eval", "math_eval"]:
        assert name in BUILTINS, name
    assert builtin("SIQA").name == "social_i_qa" and builtin("arc_easy").name == "ARC-Easy" and builtin("GSM8K")
    assert builtin("no-such-thing") is None


def test_local_copy_from_data_dir_path_and_file(data_root):
    assert len(load_builtin("gsm8k", "train")) == 10 and len(load_builtin("gsm8k", "test")) == 2
    assert load_builtin("gsm8k", "train")[0]["task"] == "gsm8k"
    # data.path: the data root, the dataset folder, or the file itself
    for path in (data_root, data_root / "gsm8k", data_root / "gsm8k" / "test.jsonl"):
        assert len(load_builtin("gsm8k", "test", path)) == 2, path


def test_dolly_per_client_files_and_natural_partition(data_root):
    rows = load_builtin("dolly", "train")
    assert len(rows) == 4 + 5 + 6 and {r["client"] for r in rows} == {f"local_training_{c}" for c in range(3)}
    assert len(load_builtin("dolly", "test")) == 1 and len(load_builtin("dolly", "public")) == 1
    # a different client count folder through data.path
    assert len(load_builtin("dolly", "train", data_root / "dolly" / "10")) == 15
    parts = partition([r["client"] for r in rows], 3, "natural", seed=0)
    assert [len(p) for p in parts] == [4, 5, 6]


def test_mmlu_subjects_from_file_names_and_k_shot(data_root):
    val = load_builtin("mmlu", "validation")
    assert sorted(r["subject"] for r in val) == ["anatomy", "virology"] and "client" not in val[0]
    task = make_task("mmlu", shots=3)
    prompt = task.prompt(val[0])
    subject = val[0]["subject"]
    assert prompt.count(f"{subject} dev") == 3 and "Answer: A" in prompt and prompt.endswith("Answer:")


def test_group_tags_each_member(data_root, monkeypatch):
    monkeypatch.setitem(BUILTINS, "pair", builtin_module.BuiltinDataset("pair", None, "test group",
                                                                        members=("gsm8k", "sst2")))
    rows = load_builtin("pair", "train")
    assert [r["task"] for r in rows] == ["gsm8k"] * 10 + ["sst2"] * 3
    with pytest.raises(DataError, match="'mrpc'"):
        load_builtin("glue", "train", hub=False)
    monkeypatch.setitem(BUILTINS, "partly", builtin_module.BuiltinDataset("partly", None, "", members=("gsm8k", "boolq")))
    assert len(load_builtin("partly", "train", hub=False, skip_missing=True)) == 10


def test_errors_name_what_was_looked_for(data_root):
    with pytest.raises(DataError, match="known"):
        load_builtin("nope")
    with pytest.raises(DataError, match="no split 'dev'.*test, train"):
        load_builtin("gsm8k", "dev")
    with pytest.raises(DataError, match=r"no local copy \(looked in .*boolq/train.json\); it has no hub id"):
        load_builtin("boolq", "train")
    with pytest.raises(DataError, match="hub loading is off"):
        load_builtin("alpaca_gpt4", "train", hub=False)


def test_hub_fallback_and_conversion(data_root, monkeypatch):
    calls = []

    def load_dataset(name, config=None, split=None, revision=None):
        calls.append((name, config, split))
        return [{"activity_label": "Cooking", "ctx": "He cracks an egg", "endings": ["a", "b", "c", "d"], "label": "2"}]

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    rows = load_builtin("hellaswag", "test")
    assert calls == [("Rowan/hellaswag", None, "validation")]
    assert rows[0]["answer"] == "ending3" and "Answer format: ending1/ending2/ending3/ending4" in rows[0]["instruction"]
    task = make_task("hellaswag")
    task.validate(rows, "hellaswag")
    assert task.score("ending3", rows[0]) == 1.0


def test_load_source_for_plain_files(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"q": "hi", "a": "there"}) + "\n")
    rows = load_source(str(path), columns="q->instruction,a->output")
    assert rows == [{"instruction": "hi", "output": "there", "task": "mine"}]


def test_load_for_experiment_builtin(data_root):
    cfg = load_config(None, ["data.source=gsm8k", "federation.num_clients=2", "federation.clients_per_round=1"])
    data = load_experiment_data(cfg)
    assert len(data.train) == 10 and len(data.evaluation) == 2 and data.scorer == "gsm8k"
    assert data.train[0]["instruction"].startswith("What is") and data.train[0]["output"].endswith("#### 1")
    assert data.evaluation[0]["reference"] == "11" and data.labels() == ["gsm8k"] * 10


def test_load_for_experiment_file_with_held_out_eval(tmp_path):
    rows = [{"prompt": f"say {i}", "reply": str(i), "user": f"u{i % 3}"} for i in range(20)]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(rows))
    cfg = load_config(None, [f"data.source={path}", "data.columns={prompt: instruction, reply: output}",
                             "data.eval_examples_per_task=4", "data.partition.by=user", "seed=3"])
    data = load_experiment_data(cfg)
    assert len(data.train) == 16 and len(data.evaluation) == 4
    assert {r["instruction"] for r in data.train}.isdisjoint({r["instruction"] for r in data.evaluation})
    assert data.evaluation == load_experiment_data(cfg).evaluation  # seeded
    assert sorted(set(data.labels())) == ["u0", "u1", "u2"] and data.train[0]["task"] == "chat"


def test_load_for_experiment_bad_data_fails_before_any_model(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"question": "q", "answer": "no hash here"}] * 3))
    cfg = load_config(None, [f"data.source={path}", "data.columns={question: question, answer: output}",
                             "data.eval_examples_per_task=1"])
    with pytest.raises(DataError, match="cannot tell the task type"):
        load_experiment_data(cfg)
    cfg = load_config(None, [f"data.source={path}"])
    with pytest.raises(DataError, match="too few to hold out data.eval_examples_per_task=30"):
        load_experiment_data(cfg)
    cfg = load_config(None, [f"data.source={path}", "data.columns={prompt: instruction}"])
    with pytest.raises(DataError, match="'prompt'"):
        load_experiment_data(cfg)
