"""The data of one experiment: training records (with their partition label) and evaluation records."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedpeft.data.generated import generate_split


@dataclass
class ExperimentData:
    train: list[dict]
    evaluation: list[dict]
    label_field: str = "task"
    scorer: str = "exact_match"
    info: dict = field(default_factory=dict)
    tasks: dict = field(default_factory=dict)
    """Task name -> ``fedpeft.data.tasks.Task`` that scores predictions; empty: exact match."""
    _classes: list[str] | None = field(default=None, repr=False, compare=False)

    def score(self, prediction: str, record: dict) -> float:
        task = self.tasks.get(str(record.get("task")))
        if task is None:
            from fedpeft.evaluation.generation import normalize_answer

            return float(normalize_answer(prediction) == normalize_answer(record["output"]))
        return float(task.score(prediction, record))

    def metric_name(self, task_name: str) -> str:
        task = self.tasks.get(task_name)
        if task is None:
            return "exact_match"
        return "rougeL" if getattr(task, "metric", None) == "rougeL" else "accuracy"

    def classes(self) -> list[str]:
        """The class list of a classification head: every distinct target, sorted (identical in every
        process that loads the same data). Computed once: the records do not change after loading."""
        if self._classes is None:
            self._classes = sorted({str(r["output"]) for r in (*self.train, *self.evaluation)})
        return self._classes

    def label_set_lines(self) -> list[str]:
        """One line per classification task: its label set (value -> word) and where it came from."""
        inferred = set(self.info.get("labels_inferred", ()))
        lines = []
        for task, words in self.info.get("label_sets", {}).items():
            how = "inferred from the training records" if task in inferred else "given"
            pairs = ", ".join(value if value == word else f"{value} -> {word}" for value, word in words.items())
            lines.append(f"labels of task '{task}' ({len(words)}, {how}): {pairs}")
        return lines

    def labels(self) -> list[str]:
        missing = [i for i, r in enumerate(self.train) if self.label_field not in r]
        if missing:
            raise ValueError(
                f"data.partition.by: field '{self.label_field}' is missing from record {missing[0]} "
                f"(fields: {sorted(self.train[missing[0]])})"
            )
        return [str(r[self.label_field]) for r in self.train]


def encode_for_experiment(config, data: ExperimentData, records, tokenizer):
    """``encode_records`` as the model's head needs: prompt + target tokens (causal LM), or text + class
    index (classification). Returns (encoded or None per record, number dropped)."""
    from fedpeft.data.encoding import encode_records

    classes = data.classes() if config.model.head == "classification" else None
    return encode_records(records, tokenizer, config.data.template, config.training.max_seq_len, classes=classes)


def evaluation_group(record: dict, group_by: str | None) -> str:
    """The reporting group of an evaluation record: its ``group_by`` field when it has one, else its task
    (the grouping the evaluators report by)."""
    value = record.get(group_by) if group_by else None
    return str(value) if value not in (None, "") else str(record.get("task"))


def sample_evaluation(records: list[dict], max_examples: int | None, seed: int, group_by: str | None = None) -> list[dict]:
    """At most ``max_examples`` records per group, a seeded random sample kept in file order (all when
    None). Applied once when the data loads, so every evaluation of a run (round 0, the rounds between,
    the final one) scores the very same records and before/after numbers compare like with like."""
    if max_examples is None:
        return records
    import numpy as np

    by_group: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_group.setdefault(evaluation_group(record, group_by), []).append(i)
    rng = np.random.default_rng(seed)
    kept: set[int] = set()
    for group in sorted(by_group):  # sorted: the sample does not depend on which group comes first
        indices = by_group[group]
        chosen = indices if len(indices) <= max_examples else rng.choice(indices, max_examples, replace=False)
        kept.update(int(i) for i in chosen)
    return [r for i, r in enumerate(records) if i in kept]


def load_experiment_data(config) -> ExperimentData:
    """Resolve ``config.data`` to records; raises before any model is loaded when the data is bad.
    ``evaluation.max_examples`` keeps a seeded sample of the evaluation records (``sample_evaluation``)."""
    loaded = _load(config)
    evaluation = getattr(config, "evaluation", None)
    cap = getattr(evaluation, "max_examples", None)
    if cap is not None:
        total = len(loaded.evaluation)
        loaded.evaluation = sample_evaluation(loaded.evaluation, cap, config.seed, evaluation.group_by)
        loaded.info["evaluation_sample"] = {"max_examples_per_group": cap, "kept": len(loaded.evaluation), "of": total,
                                            "seed": config.seed}
    return loaded


def _load(config) -> ExperimentData:
    data = config.data
    if data.source == "generated":
        if data.add_generated:
            raise ValueError("data.add_generated: only for a dataset source; with source=generated list the tasks in data.tasks")
        train, evaluation = generate_split(list(data.tasks), data.train_examples_per_task,
                                           data.eval_examples_per_task, config.seed)
        return ExperimentData(train=train, evaluation=evaluation, label_field=data.partition.by,
                              info={"source": "generated", "eval_split": "generated"})
    from fedpeft.data.builtin import load_for_experiment

    loaded = load_for_experiment(config)
    if data.add_generated:
        extra_train, extra_eval = generate_split(list(data.add_generated), data.train_examples_per_task,
                                                 data.eval_examples_per_task, config.seed)
        clash = sorted({str(r.get("task")) for r in loaded.train} & set(data.add_generated))
        if clash:
            raise ValueError(f"data.add_generated: task names {clash} already occur in data.source '{data.source}'")
        loaded.train += extra_train
        loaded.evaluation += extra_eval
    return loaded
