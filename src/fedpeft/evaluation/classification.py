"""Accuracy of a sequence-classification head (``model.head=classification``).

Each record's text (``encoding.classification_text``) goes through the model in padded batches; the
prediction is the arg-max over the experiment's class list, and a record is right when that is the
index of its target. Reported per group (task, or the ``group_by`` field) and overall, in the same
shape as ``generation_eval`` so the engine treats both alike.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from fedpeft.data.encoding import collate, encode_classification
from fedpeft.evaluation.generation import first_per_group, group_key, scored_result


@torch.no_grad()
def predict_classes(model, tokenizer, records: Sequence[dict], classes: Sequence[str], max_len: int,
                    batch_size: int = 32) -> tuple[list[int], list[int]]:
    """Arg-max class index of every record, and its gold index."""
    was_training = model.training
    model.eval()
    encoded = [encode_classification(r, tokenizer, classes, max_len) for r in records]
    predictions: list[int] = []
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start:start + batch_size], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        predictions += logits.argmax(dim=-1).tolist()
    model.train(was_training)
    return predictions, [e.labels[0] for e in encoded]


def classification_eval(model, tokenizer, records: Sequence[dict], classes: Sequence[str], max_len: int = 128,
                        batch_size: int = 32, max_examples: int | None = None, group_by: str | None = None) -> dict:
    start = time.perf_counter()
    group_of = group_key(group_by)
    chosen = first_per_group(records, group_of, max_examples)
    predicted, gold = predict_classes(model, tokenizer, chosen, classes, max_len, batch_size)
    return scored_result(chosen, [classes[p] for p in predicted], [float(p == g) for p, g in zip(predicted, gold)],
                         group_of, lambda task: "accuracy", start, default_metric="accuracy")
