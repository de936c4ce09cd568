"""``ExperimentData``: the records of one experiment (training records with their partition label,
evaluation records) and how they are scored. A leaf of the data layer: the loaders (``dataset``,
``builtin``) both build it without importing each other for it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fedpeft.data.tasks import ExactMatchTask, Task

_EXACT = ExactMatchTask()


def task_class_indices(records: Sequence[dict], classes: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Task name -> the indices (in ``classes``) of every label its records carry."""
    index = {c: i for i, c in enumerate(classes)}
    out: dict[str, set[int]] = {}
    for r in records:
        out.setdefault(str(r["task"]), set()).add(index[str(r["output"])])
    return {task: tuple(sorted(ids)) for task, ids in out.items()}


@dataclass
class ExperimentData:
    train: list[dict]
    evaluation: list[dict]
    label_field: str = "task"
    scorer: str = "exact_match"
    info: dict = field(default_factory=dict)
    tasks: dict = field(default_factory=dict)
    """Task name -> ``fedpeft.data.tasks.Task`` that scores predictions; a task not in it (the generated
    tasks) is graded by ``ExactMatchTask``."""
    _classes: list[str] | None = field(default=None, repr=False, compare=False)
    _task_classes: dict[str, tuple[int, ...]] | None = field(default=None, repr=False, compare=False)

    def task_of(self, task_name: str) -> Task:
        """The task that grades records of ``task_name`` (the only place an answer is graded)."""
        return self.tasks.get(task_name) or _EXACT

    def score(self, prediction: str, record: dict) -> float:
        return float(self.task_of(str(record.get("task"))).score(prediction, record))

    def metric_name(self, task_name: str) -> str:
        return self.task_of(task_name).metric_name

    def classes(self) -> list[str]:
        """The class list of a classification head: every distinct target, sorted (identical in every
        process that loads the same data). Computed once: the records do not change after loading."""
        if self._classes is None:
            self._classes = sorted({str(r["output"]) for r in (*self.train, *self.evaluation)})
        return self._classes

    def task_classes(self) -> dict[str, tuple[int, ...]]:
        """Task -> the indices in :meth:`classes` of the labels its records carry (an image task's logits,
        ``models.vision``). Computed once, like the class list."""
        if self._task_classes is None:
            self._task_classes = task_class_indices((*self.train, *self.evaluation), self.classes())
        return self._task_classes

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
