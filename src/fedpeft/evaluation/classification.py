"""Accuracy of a sequence-classification head (``model.head=classification``).

Each record's text (``encoding.classification_text``) goes through the model in padded batches; the
prediction is the arg-max over the experiment's class list, and a record is right when that is the
index of its target. Reported per group (task, or the ``group_by`` field) and overall, in the same
shape as ``generation_eval`` so the engine treats both alike; its samples show the text the head read
(shortened) with the predicted and expected label.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from fedpeft.data.encoding import classification_text, collate, encode_classification
from fedpeft.evaluation.generation import first_per_group, group_key, scored_result
from fedpeft.models.vision import predict_images

SAMPLE_CHARS = 160  # input text kept in an evaluation sample


@torch.no_grad()
def predict_classes(model, tokenizer, records: Sequence[dict], classes: Sequence[str], max_len: int,
                    batch_size: int = 32) -> tuple[list[int], list[int]]:
    """Arg-max class index of every record, and its gold index."""
    was_training = model.training
    model.eval()
    encoded = [encode_classification(r, tokenizer, classes, max_len) for r in records]
    predictions: list[int] = []
    device = next(model.parameters()).device
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start:start + batch_size], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        predictions += logits.argmax(dim=-1).tolist()
    model.train(was_training)
    return predictions, [e.labels[0] for e in encoded]


def classification_eval(model, tokenizer, records: Sequence[dict], classes: Sequence[str], max_len: int = 128,
                        batch_size: int = 32, max_examples: int | None = None, group_by: str | None = None) -> dict:
    start = time.perf_counter()
    group_of = group_key(group_by)
    chosen = first_per_group(records, group_of, max_examples)
    predicted, gold = predict_classes(model, tokenizer, chosen, classes, max_len, batch_size)
    result = scored_result(chosen, [classes[p] for p in predicted], [float(p == g) for p, g in zip(predicted, gold)],
                           group_of, lambda task: "accuracy", start, default_metric="accuracy")
    result["samples"] = classification_samples(chosen, [classes[p] for p in predicted])
    return result


def shorten(text: str, limit: int = SAMPLE_CHARS) -> str:
    """``text`` on one line, cut to ``limit`` characters (with an ellipsis when cut)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def classification_samples(records: Sequence[dict], predicted: Sequence[str], count: int = 8) -> list[dict]:
    """About ``count`` evenly spaced records as the head saw them: the input text (shortened), the
    predicted and the expected label, and whether they agree."""
    step = max(1, len(records) // count)
    return [{"task": r["task"], "input": shorten(classification_text(r)), "predicted": p, "expected": r["output"],
             "correct": p == r["output"]} for r, p in list(zip(records, predicted))[::step]]


def image_classification_eval(model, processor, records: Sequence[dict], classes: Sequence[str], batch_size: int = 64,
                              max_examples: int | None = None, group_by: str | None = None,
                              allowed: dict[str, tuple[int, ...]] | None = None) -> dict:
    """Top-1 accuracy of an image classifier (``model.head=image_classification``) per group and overall,
    in ``classification_eval``'s shape. The arg-max is over the classes of each record's task (the
    label set the task's training records carry; ``models.vision``), so one head over the union of
    CIFAR-10's and CIFAR-100's classes is scored as two 10- and 100-way classifiers. ``allowed``: task ->
    its class indices (default: the labels ``records`` carry)."""
    start = time.perf_counter()
    group_of = group_key(group_by)
    chosen = first_per_group(records, group_of, max_examples)
    predicted, gold = predict_images(model, processor, chosen, classes, batch_size, allowed=allowed)
    return image_accuracy(chosen, [classes[p] for p in predicted], [classes[g] for g in gold], group_of, start)


def image_accuracy(records: Sequence[dict], predicted: Sequence[str], expected: Sequence[str], group_of,
                   start: float) -> dict:
    """The evaluation result of predicted against expected labels (accuracy per group and overall);
    samples name the task and both labels (not the image)."""
    shown = [{**{k: v for k, v in r.items() if k != "image"}, "instruction": "[image]", "output": e}
             for r, e in zip(records, expected)]
    result = scored_result(shown, list(predicted), [float(p == e) for p, e in zip(predicted, expected)], group_of,
                           lambda task: "accuracy", start, default_metric="accuracy")
    step = max(1, len(records) // 8)
    result["samples"] = [{"task": r["task"], "predicted": p, "expected": e, "correct": p == e}
                         for r, p, e in list(zip(records, predicted, expected))[::step]]
    return result
