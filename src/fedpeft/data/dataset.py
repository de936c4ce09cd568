"""The data of one experiment: training records (with their partition label) and evaluation records."""

from __future__ import annotations

from fedpeft.alignment.experiment import encode_preference_records, is_preference, load_preference_data
from fedpeft.data.builtin import load_for_experiment
from fedpeft.data.encoding import encode_records
from fedpeft.data.experiment import ExperimentData
from fedpeft.data.generated import generate_split
from fedpeft.models.registry import model_head
from fedpeft.data.images import encode_images, load_image_data

IMAGE_HEAD = "image_classification"

__all__ = ["ExperimentData", "encode_for_experiment", "evaluation_group", "load_experiment_data", "sample_evaluation"]


def encode_for_experiment(config, data: ExperimentData, records, tokenizer):
    """``encode_records`` as the model's head needs: prompt + target tokens (causal LM), encoder prompt and
    decoder target (seq2seq, an encoder-decoder by its config), or text + class index (classification),
    or (chosen, rejected) pairs for a preference objective (training.objective).
    Returns (encoded or None per record, number dropped)."""
    if is_preference(config):
        return encode_preference_records(config, records, tokenizer)
    if config.model.head == IMAGE_HEAD:  # the image and its class index; preprocessed per batch
        return encode_images(records, data.classes(), data.task_classes()), 0
    classes = data.classes() if config.model.head == "classification" else None
    return encode_records(records, tokenizer, config.data.template, config.training.max_seq_len, classes=classes,
                          seq2seq=model_head(config.model) == "seq2seq")


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
    loaded = load_preference_data(config) if is_preference(config) else _load(config)
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
    if config.model.head == IMAGE_HEAD:
        return load_image_data(config)
    if data.source == "generated":
        if data.add_generated:
            raise ValueError("data.add_generated: only for a dataset source; with source=generated list the tasks in data.tasks")
        train, evaluation = generate_split(list(data.tasks), data.train_examples_per_task,
                                           data.eval_examples_per_task, config.seed)
        return ExperimentData(train=train, evaluation=evaluation, label_field=data.partition.by,
                              info={"source": "generated", "eval_split": "generated"})
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
