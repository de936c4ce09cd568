"""Built-in names for the seed datasets: each resolves to a local copy when there is one, else to its
Hugging Face Hub id.

Where a local copy is looked for, in order:

1. ``path`` (``data.path``): a file, or a directory holding the dataset's files (the data root
   ``.../data``, the dataset's own folder ``.../data/gsm8k``, or the folder of per-client files);
2. ``$FEDPEFT_DATA_DIR``;
3. ``../shared/data`` next to the repository root, when it exists.

With no local copy, a name with a hub id loads through ``datasets`` (network needed); without either,
the error says where it looked. ``load_source`` is the one entry point for ``data.source``: a built-in
name (or a group such as ``glue``), else a local path or a hub id.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.data.experiment import ExperimentData
from fedpeft.data.sources import DataError, Record, apply_columns, load_hub, load_local, load_records, looks_local
from fedpeft.data.tasks import ClassificationTask, Task, get_task, infer_task_type

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "FEDPEFT_DATA_DIR"
REPO_ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    task: str | None
    description: str
    hub_id: str | None = None
    hub_config: str | None = None
    hub_splits: Mapping[str, str] = field(default_factory=dict)  # our split name -> hub split name
    local: Mapping[str, str] = field(default_factory=dict)  # split -> path under the data dir
    local_options: Mapping[str, Any] = field(default_factory=dict)  # pattern, fieldnames
    convert: Callable[[Record], Record] | None = None
    task_options: Mapping[str, Any] = field(default_factory=dict)
    members: tuple[str, ...] = ()  # a group: these datasets, each record tagged task=<member>
    eval_split: str | None = None  # the split an experiment evaluates on (None: hold out from train)

    @property
    def splits(self) -> list[str]:
        return sorted(set(self.local) | set(self.hub_splits))


def _hellaswag_to_commonsense(row: Record) -> Record:
    """Rowan/hellaswag rows -> the LLM-Adapters commonsense format."""
    endings = list(row["endings"])
    options = " ".join(f"Ending{i + 1}: {e}" for i, e in enumerate(endings))
    answer_format = "/".join(f"ending{i + 1}" for i in range(len(endings)))
    label = str(row.get("label", "")).strip()
    answer = f"ending{int(label) + 1}" if label.isdigit() else ""
    instruction = (f"Please choose the correct ending to complete the given sentence: {row['activity_label']}: "
                   f"{row['ctx']}\n\n{options}\n\nAnswer format: {answer_format}")
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def _mmlu_subject_from_file(row: Record) -> Record:
    if not row.get("subject") and row.get("client"):
        row = dict(row)
        row["subject"] = re.sub(r"_(dev|val|test)$", "", str(row.pop("client")))
    return row


_MMLU_COLUMNS = ["question", "A", "B", "C", "D", "answer"]
_GLUE_PAIR = {
    "mrpc": (("sentence1", "sentence2"), {"0": "no", "1": "yes"},
             "Do the two sentences mean the same thing? Answer with one word: yes or no."),
    "qqp": (("question1", "question2"), {"0": "no", "1": "yes"},
            "Do the two questions ask the same thing? Answer with one word: yes or no."),
    "qnli": (("question", "sentence"), {"0": "yes", "1": "no"},
             "Does the sentence answer the question? Answer with one word: yes or no."),
    "rte": (("sentence1", "sentence2"), {"0": "yes", "1": "no"},
            "Does the first sentence entail the second? Answer with one word: yes or no."),
}
COMMONSENSE_EVAL = ("boolq", "piqa", "social_i_qa", "ARC-Challenge", "ARC-Easy", "openbookqa", "hellaswag", "winogrande")
MATH_EVAL = ("AddSub", "MultiArith", "SingleEq", "SVAMP", "mawps", "AQuA", "mathqa")


def _registry() -> dict[str, BuiltinDataset]:
    specs = [
        BuiltinDataset("gsm8k", "gsm8k", "GSM8K grade-school math (train 7,473 / test 1,319)", "openai/gsm8k", "main",
                       {"train": "train", "test": "test"}, {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}, eval_split="test"),
        BuiltinDataset("commonsense_170k", "commonsense", "LLM-Adapters commonsense training mix (170k)",
                       "zwhe99/commonsense_170k", None, {"train": "train"},
                       {"train": "commonsense_170k/commonsense_170k.json"}),
        BuiltinDataset("hellaswag", "commonsense", "HellaSwag (validation as test), converted to the LLM-Adapters format",
                       "Rowan/hellaswag", None, {"train": "train", "test": "validation"},
                       {"train": "commonsense/hellaswag/train.json", "test": "commonsense/hellaswag/test.json"},
                       convert=_hellaswag_to_commonsense),
        BuiltinDataset("dolly", "instruction", "databricks-dolly-15k (local: per-client files of dolly/10)",
                       "databricks/databricks-dolly-15k", None, {"train": "train"},
                       {"train": "dolly/10", "test": "dolly/10/global_test.json", "public": "dolly/10/public_training.json"},
                       {"pattern": "local_training_*"}, eval_split="test"),
        BuiltinDataset("alpaca_gpt4", "instruction", "Alpaca-GPT4 (52k)", "vicgalle/alpaca-gpt4", None,
                       {"train": "train"}, {"train": "alpaca_gpt4/alpaca_gpt4_data_en.json"}),
        BuiltinDataset("alpaca_gpt4_demo", "instruction", "999 Alpaca-GPT4-style rows (LLaMA-Factory demo)",
                       local={"train": "alpaca_gpt4_demo/alpaca_en_demo.json"}),
        BuiltinDataset("mmlu", "mmlu", "MMLU, 57 subjects (dev = 5-shot exemplars)", "cais/mmlu", "all",
                       {"dev": "dev", "validation": "validation", "test": "test"},
                       {"dev": "mmlu/dev", "validation": "mmlu/val", "test": "mmlu/test"},
                       {"fieldnames": _MMLU_COLUMNS}, convert=_mmlu_subject_from_file, eval_split="validation"),
        BuiltinDataset("sst2", "sst2", "SST-2 sentiment", "nyu-mll/glue", "sst2",
                       {"train": "train", "validation": "validation"},
                       {"train": "sst2/train.tsv", "validation": "sst2/dev.tsv", "test": "sst2/test.tsv"},
                       eval_split="validation"),
        BuiltinDataset("mt_bench", None, "MT-Bench: 80 two-turn questions (judged, no task scoring here)",
                       local={"test": "mt_bench/question.jsonl"}),
    ]
    for name in ("boolq", "piqa", "social_i_qa", "ARC-Challenge", "ARC-Easy", "openbookqa", "winogrande"):
        specs.append(BuiltinDataset(name, "commonsense", f"{name} in the LLM-Adapters commonsense format",
                                    local={"train": f"commonsense/{name}/train.json",
                                           "test": f"commonsense/{name}/test.json"}, eval_split="test"))
    for name in MATH_EVAL:
        specs.append(BuiltinDataset(name, "math", f"{name} math word problems (LLM-Adapters test set)",
                                    local={"test": f"math_word_problems/{name}/test.json"}, eval_split="test"))
    for name, (fields, words, instruction) in _GLUE_PAIR.items():
        specs.append(BuiltinDataset(name, "classification", f"GLUE {name.upper()}", "nyu-mll/glue", name,
                                    {"train": "train", "validation": "validation"},
                                    local={"train": f"{name}/train.tsv", "validation": f"{name}/dev.tsv"},
                                    task_options={"text_field": fields, "label_words": words,
                                                  "instruction": instruction}, eval_split="validation"))
    specs += [
        BuiltinDataset("glue", None, "FL-TAC's five GLUE tasks (sst2, mrpc, qqp, qnli, rte)",
                       members=("sst2", "mrpc", "qqp", "qnli", "rte"), eval_split="validation"),
        BuiltinDataset("commonsense_eval", "commonsense", "the eight commonsense test sets", members=COMMONSENSE_EVAL, eval_split="test"),
        BuiltinDataset("math_eval", "math", "the seven math word-problem test sets", members=MATH_EVAL, eval_split="test"),
    ]
    return {spec.name: spec for spec in specs}


BUILTINS: dict[str, BuiltinDataset] = _registry()
_ALIASES = {"siqa": "social_i_qa", "arc_challenge": "ARC-Challenge", "arc_easy": "ARC-Easy", "arc-c": "ARC-Challenge",
            "arc-e": "ARC-Easy", "obqa": "openbookqa", "dolly15k": "dolly", "databricks-dolly-15k": "dolly",
            "alpaca": "alpaca_gpt4", "multiarith": "MultiArith", "addsub": "AddSub", "singleeq": "SingleEq",
            "svamp": "SVAMP", "aqua": "AQuA", "commonsense": "commonsense_eval"}


def builtin(name: str) -> BuiltinDataset | None:
    """The spec for a built-in name (case-insensitive, with a few aliases), or None."""
    if name in BUILTINS:
        return BUILTINS[name]
    lowered = name.lower()
    for key, spec in BUILTINS.items():
        if key.lower() == lowered:
            return spec
    alias = _ALIASES.get(lowered)
    return BUILTINS[alias] if alias else None


def data_dir(explicit: str | Path | None = None) -> Path | None:
    """``explicit``, else ``$FEDPEFT_DATA_DIR``, else ``<repo>/../shared/data`` when it exists."""
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    default = REPO_ROOT.parent / "shared" / "data"
    return default if default.is_dir() else None


def _local_candidates(spec: BuiltinDataset, split: str, path: str | Path | None) -> list[Path]:
    relative = spec.local.get(split)
    candidates: list[Path] = []
    if path is not None:
        root = Path(path).expanduser()
        if root.is_file():
            return [root]
        if relative:
            parts = Path(relative).parts
            candidates += [root.joinpath(*parts[i:]) for i in range(len(parts))]  # data root, dataset folder, ...
            if spec.local_options.get("pattern"):
                candidates.append(root)  # the folder of per-client files itself
        else:
            candidates.append(root)
    root = data_dir() if path is None else None
    if root is not None and relative:
        candidates.append(root / relative)
    return candidates


def load_builtin(name: str, split: str = "train", path: str | Path | None = None, *,
                 limit: int | None = None, hub: bool = True, skip_missing: bool = False) -> list[Record]:
    """Records of a built-in dataset split; every record gets ``task`` = the dataset name unless set.
    For a group, ``skip_missing`` leaves out (with a warning) members that cannot be loaded."""
    spec = builtin(name)
    if spec is None:
        raise DataError(f"'{name}' is not a built-in dataset name; known: {', '.join(BUILTINS)}")
    if spec.members:
        records: list[Record] = []
        for member in spec.members:
            try:
                part = load_builtin(member, split, path, limit=limit, hub=hub)
            except DataError as exc:
                if not skip_missing:
                    raise
                logger.warning("group '%s': leaving out '%s': %s", spec.name, member, exc)
                continue
            for record in part:
                record["task"] = BUILTINS[member].name
            records.extend(part)
        if not records:
            raise DataError(f"built-in group '{spec.name}' split '{split}': none of {list(spec.members)} could be loaded")
        return records
    if split not in spec.splits:
        raise DataError(f"built-in dataset '{spec.name}' has no split '{split}'; its splits: {', '.join(spec.splits)}")
    candidates = _local_candidates(spec, split, path)
    relative = spec.local.get(split)
    expects_dir = relative is not None and not Path(relative).suffix
    found = next((c for c in candidates if c.is_file() or (c.is_dir() and (expects_dir or relative is None))), None)
    options = {k: v for k, v in spec.local_options.items() if k != "pattern"}
    if found is not None and found.is_dir():
        options["pattern"] = spec.local_options.get("pattern", "*")
    if found is not None:
        records = load_local(found, limit=limit, **options)
    elif hub and spec.hub_id and split in spec.hub_splits:
        records = load_hub(spec.hub_id, spec.hub_config, spec.hub_splits[split], limit=limit)
    else:
        looked = ", ".join(str(c) for c in candidates) or "nowhere (no data.path, no $FEDPEFT_DATA_DIR, no ../shared/data)"
        hub_note = f"; its hub id '{spec.hub_id}' has no split '{split}'" if spec.hub_id else "; it has no hub id"
        if spec.hub_id and split in spec.hub_splits and not hub:
            hub_note = "; hub loading is off"
        raise DataError(f"built-in dataset '{spec.name}' split '{split}': no local copy (looked in {looked}){hub_note}. "
                        f"Point data.path (fedpeft run), --data-dir (fedpeft eval) or ${DATA_DIR_ENV} at a copy")
    if spec.convert is not None:
        records = [spec.convert(r) for r in records]
    for record in records:
        record.setdefault("task", spec.name)
    if not records:
        raise DataError(f"built-in dataset '{spec.name}' split '{split}' is empty")
    return records


def make_task(name: str, path: str | Path | None = None, **options: Any) -> Task:
    """The task of a built-in dataset, with its default options; ``mmlu`` with ``shots`` > 0 loads the
    dev split for the exemplars."""
    spec = builtin(name)
    if spec is None or spec.task is None:
        kind = "has no task type" if spec is not None else "is not a built-in dataset name"
        raise DataError(f"'{name}' {kind}; use fedpeft.data.tasks.get_task(<type>) with one of its types")
    merged = {**spec.task_options, **options}
    if spec.task == "mmlu" and merged.get("shots") and "dev_records" not in merged:
        merged["dev_records"] = load_builtin("mmlu", "dev", path)
    return get_task(spec.task, **merged)


def load_source(source: str, split: str = "train", path: str | Path | None = None,
                columns: Mapping[str, str] | str | None = None, *, limit: int | None = None,
                fieldnames: list[str] | None = None) -> list[Record]:
    """Records for ``data.source``: a built-in name, else a local file/directory, else a hub id.
    ``fieldnames`` names the columns of a local CSV/TSV without a header row."""
    if builtin(source) is not None:
        records = load_builtin(source, split, path, limit=limit)
        if columns:
            records = apply_columns(records, columns, f"built-in '{source}'")
        return records
    records = load_records(path or source, columns, split=split, limit=limit,
                           **({"fieldnames": fieldnames} if fieldnames else {}))
    name = Path(str(source)).stem or str(source)
    for record in records:
        record.setdefault("task", name)
    return records


# ------------------------------------------------------------------------------------ experiments
def tasks_for_records(records: list[Record], source: str, task_type: str | None = None,
                      task_options: Mapping[str, Any] | None = None, path: str | Path | None = None) -> dict[str, Task]:
    """One Task per distinct ``task`` value: ``task_type`` when given, else the built-in dataset's own
    task (so a group such as ``glue`` gets each member's label words), else inferred from the fields."""
    options = dict(task_options or {})
    tasks: dict[str, Task] = {}
    for record in records:
        name = str(record.get("task", source))
        if name in tasks:
            continue
        if task_type:
            tasks[name] = get_task(task_type, **options)
            continue
        spec = builtin(name) or builtin(source)
        if spec is not None and spec.task is not None:
            tasks[name] = make_task(spec.name, path, **options)
        else:
            tasks[name] = get_task(infer_task_type(record), **options)
    return tasks


def _hold_out(records: list[Record], per_task: int, seed: int) -> tuple[list[Record], list[Record]]:
    """Move ``per_task`` seeded-random records of each task from train to evaluation."""
    import numpy as np

    by_task: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_task.setdefault(str(record.get("task")), []).append(i)
    held: set[int] = set()
    for t, (name, indices) in enumerate(by_task.items()):
        if len(indices) <= per_task:
            raise DataError(f"task '{name}' has {len(indices)} records: too few to hold out "
                            f"data.eval_examples_per_task={per_task} for evaluation and still train")
        rng = np.random.default_rng(seed + t)
        held.update(int(indices[j]) for j in rng.choice(len(indices), per_task, replace=False))
    train = [r for i, r in enumerate(records) if i not in held]
    evaluation = [r for i, r in enumerate(records) if i in held]
    return train, evaluation


def _cap_per_task(records: list[Record], cap: int | None) -> list[Record]:
    if cap is None:
        return records
    counts: dict[str, int] = {}
    kept = []
    for record in records:
        name = str(record.get("task"))
        if counts.get(name, 0) < cap:
            counts[name] = counts.get(name, 0) + 1
            kept.append(record)
    return kept


def _evaluation_records(config: Any, train: list[Record]) -> tuple[list[Record], list[Record], str, str]:
    """(train, evaluation, evaluation split, where the evaluation records come from).

    ``data.eval_source`` is always used when set: a local file or directory is the evaluation set as
    it is (its records take the training task's name unless they have a ``task`` field); a built-in
    name or a hub id gives its ``data.eval_split`` (a built-in's own evaluation split by default). Without
    it, ``data.eval_split`` (or the built-in source's own evaluation split) of ``data.source``; else
    ``eval_examples_per_task`` seeded records per task are held out of the training records."""
    data = config.data
    columns = data.columns or None
    fieldnames = getattr(data, "fieldnames", None)
    eval_source = getattr(data, "eval_source", None)
    eval_split = getattr(data, "eval_split", None)
    if eval_source and builtin(eval_source) is None:
        local = looks_local(eval_source)
        if not local and eval_split is None:
            raise DataError(f"data.eval_source '{eval_source}' is neither a local file nor a built-in dataset name, so it is "
                            f"read as a Hugging Face Hub dataset: set data.eval_split to the split to evaluate on")
        if local and eval_split is not None:
            logger.warning("data.eval_split=%s is ignored: data.eval_source '%s' is a local file, used whole",
                           eval_split, eval_source)
        options = {"fieldnames": fieldnames} if (local and fieldnames) else {}
        evaluation = load_records(eval_source, columns, split=eval_split or "test", **options)
        unnamed = [r for r in evaluation if r.get("task") in (None, "")]
        if unnamed:
            train_tasks = sorted({str(r.get("task")) for r in train})
            if len(train_tasks) != 1:
                raise DataError(f"data.eval_source '{eval_source}': its records have no 'task' field and the training data "
                                f"has several tasks {train_tasks}; add a 'task' column naming one of them to each record")
            for record in unnamed:
                record["task"] = train_tasks[0]
        return train, evaluation, "local file" if local else str(eval_split), str(eval_source)
    source = eval_source or data.source
    spec = builtin(source)
    eval_split = eval_split or (spec.eval_split if spec is not None else None)
    if eval_split is None and eval_source:
        raise DataError(f"data.eval_source '{eval_source}' has no default evaluation split; set data.eval_split "
                        f"(its splits: {', '.join(spec.splits) if spec else '?'})")
    if eval_split is not None:
        eval_path = data.path if source == data.source else None
        return train, load_source(source, eval_split, eval_path, columns), eval_split, str(source)
    train, evaluation = _hold_out(train, data.eval_examples_per_task, getattr(config, "seed", 0))
    return train, evaluation, "held_out", f"{data.source} (held out)"


def _check_evaluation_labels(tasks: Mapping[str, Task], evaluation: list[Record], origin: str) -> None:
    """Every evaluation label of a classification task must be in the label set learnt from training:
    a head has no output for an unseen label, and a generating model was never taught its word."""
    for name, task in tasks.items():
        if not isinstance(task, ClassificationTask) or task.label_words is None:
            continue
        field_ = task.label_field
        seen = {task.label_of(r) for r in evaluation if str(r.get("task")) == name and r.get(field_) is not None}
        unknown = sorted(seen - set(task.labels()), key=str)
        if unknown:
            raise DataError(f"{origin}: evaluation labels {unknown} (field {field_!r}, task '{name}') are not in the training "
                            f"label set {task.labels()}; evaluate on data with the training labels, or give every label in "
                            f"data.task_options.label_words")


def load_for_experiment(config: Any) -> ExperimentData:
    """``config.data`` (a non-generated source) -> ``ExperimentData``: normalized train and evaluation
    records, validated by their tasks before any model is loaded.

    Reads ``data.source``, ``data.path``, ``data.columns``, ``data.fieldnames``,
    ``data.eval_examples_per_task`` and ``data.partition.by``, plus ``data.split`` (default ``train``),
    ``data.eval_source`` / ``data.eval_split`` (see ``_evaluation_records``), ``data.task`` /
    ``data.task_options`` and ``data.max_train_examples_per_task``. A classification task without
    ``label_words`` learns its label set from the training records only.
    """
    data = config.data
    split = getattr(data, "split", None) or "train"
    task_type = getattr(data, "task", None)
    task_options = getattr(data, "task_options", None) or {}
    train = load_source(data.source, split, data.path, data.columns or None, fieldnames=getattr(data, "fieldnames", None))
    train = _cap_per_task(train, getattr(data, "max_train_examples_per_task", None))
    train, evaluation, eval_split, eval_origin = _evaluation_records(config, train)
    tasks = tasks_for_records(train, data.source, task_type, task_options, data.path)
    for task_name, task in tasks.items():  # label sets come from the training records alone
        if isinstance(task, ClassificationTask):
            task.fit_labels([r for r in train if str(r.get("task", data.source)) == task_name],
                            f"{data.source} (train, task '{task_name}')")
    _check_evaluation_labels(tasks, evaluation, eval_origin)
    tasks.update(tasks_for_records([r for r in evaluation if str(r.get("task", data.source)) not in tasks],
                                   data.source, task_type, task_options, data.path))
    normalized = {}
    for name_, records in (("train", train), ("evaluation", evaluation)):
        grouped: dict[str, list[Record]] = {}
        for record in records:
            grouped.setdefault(str(record.get("task", data.source)), []).append(record)
        for task_name, group in grouped.items():
            tasks[task_name].validate(group, f"{eval_origin if name_ == 'evaluation' else data.source} "
                                             f"({name_}, task '{task_name}')")
        normalized[name_] = [tasks[str(r.get("task", data.source))].normalize(r) for r in records]
    task_types = sorted({t.name for t in tasks.values()})
    label_sets = {name: dict(t.label_words) for name, t in tasks.items()
                  if isinstance(t, ClassificationTask) and t.label_words is not None}
    return ExperimentData(
        train=normalized["train"], evaluation=normalized["evaluation"], label_field=data.partition.by,
        scorer=task_types[0] if len(task_types) == 1 else "per_task",
        info={"source": data.source, "split": split, "eval_source": eval_origin, "eval_split": eval_split,
              "task_types": {name: t.name for name, t in tasks.items()}, "label_sets": label_sets,
              "labels_inferred": sorted(name for name, t in tasks.items() if isinstance(t, ClassificationTask) and t.inferred)},
        tasks=tasks,
    )
