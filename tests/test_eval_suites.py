"""Suites by name over a small fake data directory (no ../shared needed), and the ``fedpeft eval`` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedpeft.data import benchmarks
from fedpeft.data.tasks import get_task
from fedpeft.evaluation import suites
from fedpeft.evaluation.loglik import encode_pair
from fedpeft.evaluation.suites import EvalOptions, SuiteEntry, commonsense_mc_items, flat_metrics, resolve_suite, run_suite

MMLU_FIXTURE = Path(__file__).parent / "data" / "mmlu"

torch.set_num_threads(1)

BOOLQ = "Please answer the following question with true or false, question: is the sky blue?\n\nAnswer format: true/false"
PIQA = ("Please choose the correct solution to the question: How do I dry a towel?\n\nSolution1: Hang it in the sun."
        "\n\nSolution2: Put it in the freezer.\n\nAnswer format: solution1/solution2")
ARC = ("Please choose the correct answer to the question: Which is a planet?\n\nAnswer1: Mars Answer2: The Moon "
       "Answer3: The Sun Answer4: Sirius\n\nAnswer format: answer1/answer2/answer3/answer4")
WINO = ("Please choose the correct answer to fill in the blank to complete the given sentence: Sarah was a better "
        "surgeon than Maria so _ got the easier cases.\n\nOption1: Sarah Option2: Maria Answer format: option1/option2")


def _record(instruction: str, answer: str) -> dict:
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")

    def write(relative: str, text: str):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    write("commonsense/boolq/test.json", json.dumps([_record(BOOLQ, "true"), _record(BOOLQ.replace("blue", "green"), "false")]))
    write("commonsense/piqa/test.json", json.dumps([_record(PIQA, "solution1")] * 2))
    write("commonsense/ARC-Easy/test.json", json.dumps([_record(ARC, "answer1")]))
    write("commonsense/winogrande/test.json", json.dumps([_record(WINO, "option2")]))
    for file in MMLU_FIXTURE.glob("*/*.csv"):  # the hand-written MMLU-shaped fixture (test, val, dev)
        write(f"mmlu/{file.parent.name}/{file.name}", file.read_text())
    write("gsm8k/test.jsonl", "\n".join(json.dumps({"question": f"What is {a} plus {a}?", "answer": f"{a}+{a}={2 * a}\n#### {2 * a}"})
                                         for a in (1, 2, 3)))
    write("sst2/test.tsv", "sentence\tlabel\na wonderful film\t1\na dull mess\t0\n")
    write("dolly/10/global_test.json", json.dumps([
        {"instruction": "Name a fruit.", "context": "", "response": "An apple.", "category": "brainstorming"},
        {"instruction": "Summarise.", "context": "The cat sat.", "response": "A cat sat.", "category": "summarization"},
    ]))
    write("mt_bench/question.jsonl", json.dumps({"question_id": 81, "category": "writing", "turns": ["Hi?", "Again?"]}))
    return root


@pytest.fixture(scope="module")
def tiny():
    from fedpeft.models.registry import tiny_llama

    return tiny_llama(seed=0)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setattr(benchmarks, "_HUB_REACHABLE", False)  # never try the network in tests


def _fixture_rows(split: str) -> list[dict]:
    """The fixture's MMLU rows, read here with the csv module (not through the loader under test)."""
    import csv

    rows = []
    for file in sorted((MMLU_FIXTURE / split).glob("*.csv")):
        subject = file.stem.rsplit("_", 1)[0]
        with open(file, newline="") as handle:
            rows += [dict(zip(["question", "A", "B", "C", "D", "answer"], r), subject=subject) for r in csv.reader(handle)]
    return rows


def test_resolve_suite_and_splits():
    assert [e.task for e in resolve_suite("commonsense8")] == suites.COMMONSENSE8
    assert resolve_suite("boolq,gsm8k,boolq") == [SuiteEntry("boolq", "boolq", "test"), SuiteEntry("gsm8k", "gsm8k", "test")]
    assert resolve_suite("arc_challenge")[0].task == "ARC-Challenge"
    assert [e.task for e in resolve_suite("glue")] == ["sst2", "rte", "qnli", "mrpc", "qqp"]
    assert {e.split for e in resolve_suite("glue")} == {"validation"}
    # MMLU: the test split by default (as the papers), validation and dev when asked, per part or for all
    assert resolve_suite("mmlu") == [SuiteEntry("mmlu", "mmlu", "test")]
    assert resolve_suite("mmlu:validation,boolq") == [SuiteEntry("mmlu", "mmlu", "validation"), SuiteEntry("boolq", "boolq", "test")]
    assert resolve_suite("mmlu", split="validation")[0].split == "validation"
    assert resolve_suite("mmlu,mmlu:validation") == [SuiteEntry("mmlu", "mmlu", "test"), SuiteEntry("mmlu", "mmlu", "validation")]
    with pytest.raises(ValueError, match="unknown suite or task 'squad'"):
        resolve_suite("squad")
    with pytest.raises(ValueError, match="task 'boolq' has no split 'validation'; its splits: test"):
        resolve_suite("mmlu,boolq", split="validation")


def test_commonsense_item_formats(tiny):
    _, tokenizer = tiny
    task = get_task("commonsense")
    [label] = commonsense_mc_items(task, "ARC-Easy", [task.normalize(_record(ARC, "answer3"))], "label", "alpaca", tokenizer)
    assert label.context.endswith("### Response:\nthe correct answer is")
    assert label.choices == [" answer1", " answer2", " answer3", " answer4"] and label.gold == 2
    [text] = commonsense_mc_items(task, "ARC-Easy", [_record(ARC, "answer1")], "text")
    assert text.context == "Question: Which is a planet?\nAnswer:" and text.choices[0] == " Mars"
    [wino] = commonsense_mc_items(task, "winogrande", [_record(WINO, "option2")], "text")
    assert wino.pairs()[1] == ("Sarah was a better surgeon than Maria so Maria", " got the easier cases.")
    [boolq] = commonsense_mc_items(task, "boolq", [_record(BOOLQ, "false")], "text")
    assert boolq.choices == [" yes", " no"] and boolq.gold == 1


def _hand_mc_accuracy(model, tokenizer, items) -> float:
    """Accuracy from one unpadded forward per (context, option): argmax of summed log p(option tokens)."""
    hits = 0
    for item in items:
        lls = []
        for context, choice in item.pairs():
            ctx, cont = encode_pair(tokenizer, context, choice)
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), dim=-1)
            lls.append(sum(logprobs[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont)))
        hits += max(range(len(lls)), key=lls.__getitem__) == item.gold
    return hits / len(items)


def test_run_suite_loglik_on_tiny_model(tiny, data_dir):
    model, tokenizer = tiny
    seen = []
    options = EvalOptions(data_dir=data_dir, template="plain", batch_size=4)
    results = run_suite(model, tokenizer, "boolq,piqa,ARC-Easy,winogrande,hellaswag,mmlu,sst2,dolly,rte", options,
                        on_result=seen.append)
    assert [r.task for r in seen] == [r.task for r in results]
    by_task = {r.task: r for r in results}
    for task, n in [("boolq", 2), ("piqa", 2), ("ARC-Easy", 1), ("winogrande", 1), ("mmlu", 12), ("sst2", 2)]:
        result = by_task[task]
        assert result.skipped is None and result.num_examples == n and result.evaluator == "multiple_choice"
        assert result.examples_per_second > 0
    # the suite's accuracy is the one a plain, unbatched computation on the same items gives
    boolq = get_task("commonsense")
    boolq_items = commonsense_mc_items(boolq, "boolq", [boolq.normalize(_record(BOOLQ, "true")),
                                                        boolq.normalize(_record(BOOLQ.replace("blue", "green"), "false"))],
                                       "label", "plain", tokenizer)
    assert by_task["boolq"].metrics["acc"] == pytest.approx(_hand_mc_accuracy(model, tokenizer, boolq_items))
    mmlu = get_task("mmlu")
    mmlu_items = suites.mmlu_mc_items(mmlu, _fixture_rows("test"))
    assert by_task["mmlu"].metrics["acc"] == pytest.approx(_hand_mc_accuracy(model, tokenizer, mmlu_items))
    assert by_task["dolly"].evaluator == "lm_loss" and by_task["dolly"].metrics["loss"] > 0
    assert by_task["hellaswag"].skipped and "hellaswag" in by_task["hellaswag"].skipped
    assert by_task["rte"].skipped
    flat = flat_metrics(results)
    assert set(flat) >= {"boolq/test/acc", "boolq/test/acc_norm", "mmlu/test/acc", "mmlu/test/acc_macro",
                         "mmlu/test/stem/acc", "sst2/validation/acc", "dolly/test/perplexity"}
    assert not any(key.startswith("hellaswag") for key in flat)


def test_mmlu_split_selection_reads_the_asked_files(tiny, data_dir):
    """Default: the test files (5 subjects, 12 rows); validation when asked (2 subjects, 3 rows)."""
    model, tokenizer = tiny
    [test] = run_suite(model, tokenizer, "mmlu", EvalOptions(data_dir=data_dir))
    assert test.split == "test" and test.num_examples == len(_fixture_rows("test")) == 12
    assert {s: row["n"] for s, row in test.groups["subject"].items()} == {
        "abstract_algebra": 4, "anatomy": 3, "astronomy": 2, "philosophy": 2, "sociology": 1}
    [val] = run_suite(model, tokenizer, "mmlu", EvalOptions(data_dir=data_dir, split="validation"))
    assert val.split == "validation" and val.num_examples == 3
    assert set(val.groups["subject"]) == {"astronomy", "virology"}
    assert "mmlu/validation/acc" in flat_metrics([val]) and "mmlu/test/acc" in flat_metrics([test])


def test_mmlu_per_category_table_sums(tiny, data_dir):
    model, tokenizer = tiny
    [result] = run_suite(model, tokenizer, "mmlu", EvalOptions(data_dir=data_dir, batch_size=3))
    subjects, categories = result.groups["subject"], result.groups["category"]
    assert {s: row["category"] for s, row in subjects.items()} == {
        "abstract_algebra": "stem", "astronomy": "stem", "anatomy": "other", "philosophy": "humanities",
        "sociology": "social_sciences"}
    assert sum(row["n"] for row in categories.values()) == result.num_examples
    for category, row in categories.items():
        members = [s for s in subjects.values() if s["category"] == category]
        assert row["n"] == sum(s["n"] for s in members)
        assert row["correct"] == sum(s["correct"] for s in members)
        assert result.metrics[f"{category}/acc"] == pytest.approx(row["correct"] / row["n"])
    total_correct = sum(row["correct"] for row in categories.values())
    assert result.metrics["acc"] == pytest.approx(total_correct / result.num_examples)
    assert result.metrics["acc_macro"] == pytest.approx(sum(s["acc"] for s in subjects.values()) / len(subjects))


def test_mmlu_fewshot_prompt_has_the_subjects_dev_rows(tiny, data_dir):
    task = suites.suite_task(suites.TASKS["mmlu"], EvalOptions(data_dir=data_dir, num_fewshot=1))
    row = next(r for r in _fixture_rows("test") if r["subject"] == "astronomy")
    [item] = suites.mmlu_mc_items(task, [row])
    assert item.context.startswith("The following are multiple choice questions (with answers) about astronomy.")
    assert "Closest star?\nA. Sun\nB. Sirius\nC. Vega\nD. Rigel\nAnswer: A\n\nWhich planet is closest" in item.context
    assert item.context.endswith("D. Mars\nAnswer:") and item.choices == [" A", " B", " C", " D"] and item.gold == 2
    model, tokenizer = tiny
    [result] = run_suite(model, tokenizer, "mmlu", EvalOptions(data_dir=data_dir, num_fewshot=1, limit=5))
    assert result.num_examples == 5 and len(result.groups["subject"]) == 5  # a limit of 5 covers all 5 subjects


def test_limit_is_a_stratified_seeded_sample(tiny, data_dir):
    model, tokenizer = tiny
    runs = {seed: run_suite(model, tokenizer, "mmlu", EvalOptions(data_dir=data_dir, limit=6, seed=seed))[0]
            for seed in range(6)}
    for result in runs.values():
        assert result.num_examples == 6
        assert set(result.groups["subject"]) == {"abstract_algebra", "anatomy", "astronomy", "philosophy", "sociology"}
    picks = {seed: tuple(sorted((s, row["n"]) for s, row in r.groups["subject"].items())) for seed, r in runs.items()}
    # 6 = one per subject + 1 more, given to the largest subject's share: abstract_algebra has 3 of the 7 spare rows
    assert all(dict(p)["abstract_algebra"] == 2 for p in picks.values())
    again = run_suite(model, tokenizer, "mmlu", EvalOptions(data_dir=data_dir, limit=6, seed=0))[0]
    assert again.metrics == runs[0].metrics


def test_run_suite_generate_and_limit(tiny, data_dir):
    model, tokenizer = tiny
    options = EvalOptions(data_dir=data_dir, mode="generate", template="plain", limit=2, max_new_tokens=3, batch_size=2)
    results = run_suite(model, tokenizer, "gsm8k,boolq,mmlu,dolly,sst2", options)
    by_task = {r.task: r for r in results}
    assert by_task["gsm8k"].evaluator == "generate" and by_task["gsm8k"].num_examples == 2
    assert len(by_task["boolq"].extra["samples"]) == 2 and "output" in by_task["boolq"].extra["samples"][0]
    assert "rougeL" in by_task["dolly"].metrics
    assert by_task["sst2"].evaluator == "multiple_choice"  # no generation evaluator: falls back to loglik
    both = run_suite(model, tokenizer, "gsm8k", EvalOptions(data_dir=data_dir, mode="both", limit=1, max_new_tokens=2))
    assert [r.evaluator for r in both] == ["lm_loss", "generate"]
    assert set(flat_metrics(both)) >= {"gsm8k/test/lm_loss/loss", "gsm8k/test/generate/acc"}


def test_eval_command_base_and_adapter(tmp_path, data_dir):
    from peft import LoraConfig, get_peft_model
    from typer.testing import CliRunner

    from fedpeft.cli import app
    from fedpeft.models.registry import tiny_llama

    runner = CliRunner()
    metrics = tmp_path / "base" / "metrics.jsonl"
    result = runner.invoke(app, ["eval", "--model", "tiny-llama", "--suite", "boolq,sst2,hellaswag", "--limit", "2",
                                 "--data-dir", str(data_dir), "--metrics", str(metrics), "--threads", "1"])
    assert result.exit_code == 1, result.output  # hellaswag has no data: the results are logged, the exit says so
    assert "1 task(s) did not run: hellaswag" in result.output and "--data-dir" in result.output
    [event] = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert event["event"] == "eval_suite" and event["model"] == "tiny-llama"
    assert set(event["metrics"]) >= {"boolq/test/acc", "sst2/validation/acc"}
    assert event["splits"] == {"boolq": "test", "sst2": "validation", "hellaswag": "test"}
    assert [t["task"] for t in event["tasks"]] == ["boolq", "sst2", "hellaswag"] and event["tasks"][2]["skipped"]

    # a run directory: config.yaml names the model and template; the adapter lives in RUN_DIR/final
    run_dir = tmp_path / "run"
    model, _ = tiny_llama(seed=0)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(run_dir / "final"))
    (run_dir / "config.yaml").write_text("model: {name: tiny-llama}\ndata: {template: alpaca}\n")
    (run_dir / "metrics.jsonl").write_text('{"event": "run_end", "time": 0}\n')
    result = runner.invoke(app, ["eval", "--adapter", str(run_dir / "final"), "--suite", "boolq", "--limit", "2",
                                 "--data-dir", str(data_dir), "--mc-format", "text"])
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["run_end", "eval_suite"]
    assert events[1]["template"] == "alpaca" and events[1]["adapter"].endswith("final")


def test_eval_command_rejects_bad_input(tmp_path):
    from typer.testing import CliRunner

    from fedpeft.cli import app

    def error_of(args) -> str:
        result = CliRunner().invoke(app, args)
        assert result.exit_code != 0
        return " ".join(result.output.replace("│", " ").split())  # rich wraps the message in a box

    assert "unknown suite or task 'nope'" in error_of(["eval", "--model", "tiny-llama", "--suite", "nope"])
    assert "auto, loglik, generate, both" in error_of(["eval", "--model", "tiny-llama", "--mode", "fast"])
    assert "does not exist" in error_of(["eval", "--adapter", str(tmp_path / "missing")])
    assert "task 'boolq' has no split 'validation'; its splits: test" in error_of(
        ["eval", "--model", "tiny-llama", "--suite", "mmlu,boolq", "--split", "validation"])


def test_load_model_for_eval_applies_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    from fedpeft.evaluation.loglik import score_continuations
    from fedpeft.models.loading import load_model_for_eval
    from fedpeft.models.registry import tiny_llama

    model, tokenizer = tiny_llama(seed=0)
    torch.manual_seed(0)  # the random LoRA init draws from the global generator: fix it, and make its effect large
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "final"))
    pair = [("Question: 2+2?\nAnswer:", " 4")]
    expected = score_continuations(peft_model, tokenizer, pair)[0].logprob
    loaded, _, description = load_model_for_eval("tiny-llama", tmp_path)  # RUN_DIR works too
    assert "adapter" in description
    assert score_continuations(loaded, tokenizer, pair)[0].logprob == pytest.approx(expected, abs=1e-5)
    base, _, _ = load_model_for_eval("tiny-llama")
    assert score_continuations(base, tokenizer, pair)[0].logprob != pytest.approx(expected, abs=1e-2)
    with pytest.raises(FileNotFoundError):
        load_model_for_eval("tiny-llama", tmp_path / "nothing")


def test_lm_eval_bridge_skips_cleanly_when_not_installed(tiny, monkeypatch):
    from fedpeft.evaluation import lm_eval_bridge

    monkeypatch.setattr(lm_eval_bridge, "lm_eval_available", lambda: False)
    model, tokenizer = tiny
    [result] = run_suite(model, tokenizer, "lm_eval:hellaswag", EvalOptions())
    assert result.skipped and "pip install lm-eval" in result.skipped
    with pytest.raises(ValueError):
        resolve_suite("lm_eval:")


def test_lm_eval_bridge_hands_our_model_to_hflm(tiny, monkeypatch):
    """A stand-in lm_eval package: the bridge passes the in-memory model and maps lm-eval's metric names."""
    import importlib.machinery
    import sys
    import types

    seen = {}

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size, **kwargs):
            seen["model"], seen["batch_size"] = pretrained, batch_size

    def simple_evaluate(model, tasks, limit, num_fewshot):
        seen["tasks"], seen["limit"] = tasks, limit
        return {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_norm,none": 0.75,
                                         "acc_stderr,none": 0.1}},
                "n-samples": {"arc_easy": {"original": 2376, "effective": 4}}}

    package = types.ModuleType("lm_eval")
    package.__spec__ = importlib.machinery.ModuleSpec("lm_eval", None)
    package.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    huggingface = types.ModuleType("lm_eval.models.huggingface")
    huggingface.HFLM = HFLM
    for name, module in (("lm_eval", package), ("lm_eval.models", models), ("lm_eval.models.huggingface", huggingface)):
        monkeypatch.setitem(sys.modules, name, module)
    model, tokenizer = tiny
    results = run_suite(model, tokenizer, "lm_eval:arc_easy,lm_eval:nope", EvalOptions(limit=4, batch_size=3))
    assert seen == {"model": model, "batch_size": 3, "tasks": ["arc_easy", "nope"], "limit": 4}
    assert results[0].task == "arc_easy" and results[0].num_examples == 4
    assert results[0].metrics == {"acc": 0.5, "acc_norm": 0.75, "acc_stderr": 0.1}
    assert results[1].task == "nope" and results[1].skipped


def test_flat_metrics_suite_means():
    from fedpeft.evaluation.suites import TaskResult

    results = [TaskResult("commonsense8", "boolq", "multiple_choice", {"acc": 0.5, "acc_norm": 0.25}, 2, 1.0, split="test"),
               TaskResult("commonsense8", "piqa", "multiple_choice", {"acc": 1.0, "acc_norm": 0.75}, 2, 1.0, split="test"),
               TaskResult("commonsense8", "hellaswag", "multiple_choice", skipped="no data", split="test")]
    flat = flat_metrics(results)
    assert flat == {"boolq/test/acc": 0.5, "boolq/test/acc_norm": 0.25, "piqa/test/acc": 1.0, "piqa/test/acc_norm": 0.75,
                    "commonsense8/test/acc": 0.75}


def test_eval_command_mt_bench_with_a_local_judge(tmp_path, data_dir):
    """The tiny model as its own judge never writes [[rating]]: every turn is a recorded failure, exit 0."""
    from typer.testing import CliRunner

    from fedpeft.cli import app

    metrics = tmp_path / "metrics.jsonl"
    result = CliRunner().invoke(app, ["eval", "--model", "tiny-llama", "--suite", "mt_bench", "--data-dir", str(data_dir),
                                      "--judge-url", "local", "--judge-model", "tiny-llama", "--judge-max-tokens", "4", "--max-new-tokens", "2",
                                      "--metrics", str(metrics)])
    assert result.exit_code == 0, result.output
    [event] = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert event["metrics"]["mt_bench/test/judge_failures"] == 2.0 and "mt_bench/test/score" not in event["metrics"]
    [details] = list(tmp_path.glob("eval-mt_bench-*.json"))
    saved = json.loads(details.read_text())["mt_bench"]
    assert len(saved["answers"]["81"]) == 2 and saved["failures"][0]["error"] == "judge reply has no [[rating]]"


def test_config_checks_suite_entries_before_any_model_loads():
    from fedpeft.config import ConfigError, load_config

    config = load_config(None, ["evaluation.suites=[mmlu:validation,commonsense8]"])
    assert config.evaluation.suites == ["mmlu:validation", "commonsense8"]
    with pytest.raises(ConfigError, match=r"evaluation.suites.*task 'mmlu' has no split 'valid'; its splits: test, validation, dev"):
        load_config(None, ["evaluation.suites=[mmlu:valid]"])
    with pytest.raises(ConfigError, match=r"evaluation.suites.*unknown suite or task 'commonsens8'"):
        load_config(None, ["evaluation.suites=[commonsens8]"])
