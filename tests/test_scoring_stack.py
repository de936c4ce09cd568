"""One answer, one grade: the same generated outputs scored by per-round evaluation (the engine's
``generation_eval`` with ``ExperimentData.score``) and by the ``fedpeft eval`` suites give identical
per-record scores, equal to the grades written by hand below."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpeft.config import DataConfig, ExperimentConfig
from fedpeft.data import benchmarks
from fedpeft.data.dataset import ExperimentData, load_experiment_data
from fedpeft.data.generated import generate_split
from fedpeft.evaluation import generation
from fedpeft.evaluation.generation import generation_eval
from fedpeft.evaluation.suites import EvalOptions, run_suite

BOOLQ = "Please answer the following question with true or false, question: is the sky {}?\n\nAnswer format: true/false"
PIQA = ("Please choose the correct solution to the question: How do I dry a {}?\n\nSolution1: Hang it in the sun."
        "\n\nSolution2: Put it in the freezer.\n\nAnswer format: solution1/solution2")

# (record, generated output, the grade by hand)
GSM8K = [
    ({"question": "Q1: 9 + 9?", "answer": "9+9=18\n#### 18"}, "The answer is 18. Check: 9 + 10 = 19", 1.0),
    ({"question": "Q2: 8 * 9?", "answer": "8*9=72\n#### 72"}, "#### 72\n\nNote: 3 steps", 1.0),
    ({"question": "Q3: 5 + 5?", "answer": "#### 10"}, "5 + 5 = 10, so 10 apples", 1.0),
    ({"question": "Q4: 2 + 2?", "answer": "#### 4"}, "The answer is 5. (4 was a guess)", 0.0),
    ({"question": "Q5: 1,000 + 1?", "answer": "#### 1,001"}, "I get 1,001", 1.0),
    ({"question": "Q6: 3 + 3?", "answer": "#### 6"}, "no idea", 0.0),
]
COMMONSENSE = [  # boolq and piqa records; LLM-Adapters' case-sensitive first label
    ({"instruction": BOOLQ.format("blue"), "answer": "true"}, "the correct answer is true", 1.0),
    ({"instruction": BOOLQ.format("green"), "answer": "false"}, "True. false is wrong", 1.0),  # "True" is not a label; "false" is
    ({"instruction": BOOLQ.format("red"), "answer": "false"}, "False", 0.0),
    ({"instruction": PIQA.format("towel"), "answer": "solution1"}, "Solution2 no, solution1", 1.0),
    ({"instruction": PIQA.format("shirt"), "answer": "solution2"}, "solution1 or solution2", 0.0),
]
MMLU = [  # question,A,B,C,D,answer ; output ; grade
    ("Closest planet to the Sun?,Venus,Earth,Mercury,Mars,C", "The answer is (C).", 1.0),
    ("What is the Moon?,A star,A planet,A comet,A satellite,D", "D. A satellite", 1.0),
    ("Red planet?,Mars,Venus,Earth,Pluto,A", "B", 0.0),
    ("Largest planet?,Mars,Jupiter,Earth,Pluto,B", "I am not sure.", 0.0),
]
DOLLY = [
    ({"instruction": "Name a red fruit.", "context": "", "response": "An apple.", "category": "brainstorming"},
     "An apple.", 1.0),
    ({"instruction": "Summarise the text.", "context": "The cat sat on the mat.", "response": "A cat sat on a mat.",
      "category": "summarization"}, "the cat sat", 2 * (2 / 3) * (2 / 6) / (2 / 3 + 2 / 6)),  # LCS "cat sat"
]


def _key(record: dict) -> str:
    return str(record.get("question") or record.get("instruction"))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    def write(relative: str, text: str) -> None:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    write("gsm8k/test.jsonl", "\n".join(json.dumps(r) for r, _, _ in GSM8K))
    write("commonsense/boolq/test.json", json.dumps([{**r, "input": ""} for r, _, _ in COMMONSENSE[:3]]))
    write("commonsense/piqa/test.json", json.dumps([{**r, "input": ""} for r, _, _ in COMMONSENSE[3:]]))
    write("mmlu/test/astronomy_test.csv", "\n".join(row for row, _, _ in MMLU) + "\n")
    write("dolly/10/global_test.json", json.dumps([r for r, _, _ in DOLLY]))
    return tmp_path


@pytest.fixture
def canned(monkeypatch):
    """generate() answers each prompt with the output listed for the record whose question it contains."""
    outputs: dict[str, str] = {}
    for record, output, _ in GSM8K + COMMONSENSE + DOLLY:
        outputs[_key(record)] = output
    for row, output, _ in MMLU:
        outputs[row.split(",")[0]] = output

    def fake_generate(model, tokenizer, prompts, **kwargs):
        found = [[out for key, out in outputs.items() if key in prompt] for prompt in prompts]
        assert all(len(f) == 1 for f in found), "each prompt names exactly one record"
        return [f[0] for f in found]

    monkeypatch.setattr(generation, "generate", fake_generate)
    monkeypatch.setattr(benchmarks, "_HUB_REACHABLE", False)


def _per_round(data_dir: Path, source: str) -> tuple[ExperimentData, dict]:
    """What the engine's per-round evaluation computes for a built-in source (Engine._evaluate_records)."""
    config = ExperimentConfig(data=DataConfig(source=source, path=str(data_dir), split="test", eval_split="test",
                                              template="plain"))
    data = load_experiment_data(config)
    return data, generation_eval(None, None, data.evaluation, "plain", score=data.score, metric_name=data.metric_name)


@pytest.mark.parametrize("source, suite, table", [
    ("gsm8k", "gsm8k", GSM8K),
    ("boolq", "boolq", COMMONSENSE[:3]),
    ("piqa", "piqa", COMMONSENSE[3:]),
    ("mmlu", "mmlu", MMLU),
    ("dolly", "dolly", DOLLY),
])
def test_per_round_and_suite_give_the_same_grades(data_dir, canned, source, suite, table):
    _, per_round = _per_round(data_dir, source)
    [result] = run_suite(None, None, suite, EvalOptions(data_dir=data_dir, mode="generate", template="plain"))
    by_hand = {_key(r) if isinstance(r, dict) else r.split(",")[0]: grade for r, _, grade in table}
    expected = [by_hand[next(k for k in by_hand if k in _key(r))] for r in per_round["records"]]
    assert per_round["scores"] == pytest.approx(expected)
    assert result.extra["scores"] == pytest.approx(per_round["scores"])  # same records, same order, same grades
    metric = "rougeL" if source == "dolly" else "acc"
    assert result.metrics[metric] == pytest.approx(sum(expected) / len(expected))


def test_generated_tasks_keep_their_exact_match_grade():
    """The quickstart's tasks have no Task of their own: ExactMatchTask grades them as before (first
    line, trailing period dropped, spaces collapsed, case kept)."""
    data = ExperimentData(train=[], evaluation=[])
    record = {"task": "arithmetic", "instruction": "Add 8 and 9.", "output": "17"}
    for prediction, grade in [("17", 1.0), (" 17.\nmore text", 1.0), ("17 .", 1.0), ("The answer is 17.", 0.0),
                              ("18", 0.0), ("", 0.0)]:
        assert data.score(prediction, record) == grade, prediction
    upper = {"task": "uppercase", "instruction": "Write 'a b' in capital letters.", "output": "APPLE  RIVER"}
    assert data.score("APPLE RIVER", upper) == 1.0 and data.score("apple river", upper) == 0.0
    assert data.metric_name("arithmetic") == "exact_match"
    train, evaluation = generate_split(["arithmetic", "reverse", "unit_conversion", "uppercase"], 5, 25, 0)
    assert all(data.score(r["output"], r) == 1.0 for r in evaluation)
    assert sum(data.score(r["output"] + " extra", r) for r in evaluation) == 0
