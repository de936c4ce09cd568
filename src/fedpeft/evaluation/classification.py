"""Accuracy of a sequence-classification head (``model.head=classification``).

Each record's text (``encoding.classification_text``) goes through the model in padded batches; the
prediction is the arg-max over the experiment's class list, and a record is right when that is the
index of its target. Reported per group (task, or the ``group_by`` field) and overall, in the same
shape as ``generation_eval`` so the engine treats both alike.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence

import torch

from fedpeft.data.encoding import class_index, collate, encode_classification
from fedpeft.evaluation.generation import first_per_group, group_key


@torch.no_grad()
def predict_classes(model, tokenizer, records: Sequence[dict], classes: Sequence[str], max_len: int,
                    batch_size: int = 32) -> list[int]:
    was_training = model.training
    model.eval()
    encoded = [encode_classification(r, tokenizer, classes, max_len) for r in records]
    predictions: list[int] = []
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start:start + batch_size], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        predictions += logits.argmax(dim=-1).tolist()
    model.train(was_training)
    return predictions


def classification_eval(model, tokenizer, records: Sequence[dict], classes: Sequence[str], max_len: int = 128,
                        batch_size: int = 32, max_examples: int | None = None, group_by: str | None = None) -> dict:
    start = time.perf_counter()
    group_of = group_key(group_by)
    chosen = first_per_group(records, group_of, max_examples)
    predicted = predict_classes(model, tokenizer, chosen, classes, max_len, batch_size)
    correct: dict[str, list[float]] = defaultdict(list)
    for r, p in zip(chosen, predicted):
        correct[group_of(r)].append(float(p == class_index(r, classes)))
    metrics = {f"{group}/accuracy": sum(v) / len(v) for group, v in sorted(correct.items())}
    metrics["accuracy"] = sum(sum(v) for v in correct.values()) / max(1, len(chosen))
    samples = [{"task": r["task"], "prompt": r["instruction"], "expected": r["output"], "predicted": classes[p]}
               for r, p in list(zip(chosen, predicted))[:: max(1, len(chosen) // 8)]]
    return {"metrics": metrics, "examples": len(chosen), "seconds": time.perf_counter() - start, "samples": samples,
            "headline": "accuracy"}
