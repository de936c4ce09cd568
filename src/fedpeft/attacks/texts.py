"""Client texts to attack and auxiliary texts to train an inversion model on, from a data source.

A source is ``generated`` (the built-in generated tasks, ``tasks`` chooses which), a built-in dataset
name, or a local file / directory (``fedpeft.data.builtin.load_source``). A record's text is its
instruction, input/context and output joined by spaces: the whole sequence a client trains on.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from fedpeft.data.builtin import load_source
from fedpeft.data.generated import generate_task

_FIELDS = ("instruction", "input", "context", "output", "text", "sentence")


def record_text(record: dict) -> str:
    parts = [str(record[f]).strip() for f in _FIELDS if record.get(f) not in (None, "")]
    if not parts:
        raise ValueError(f"record has none of the text fields {', '.join(_FIELDS)}: keys {sorted(record)}")
    return " ".join(parts)


def source_texts(source: str, tasks: Sequence[str] | None, count: int, seed: int) -> list[str]:
    """``count`` texts of ``source`` (seeded sample of its training split)."""
    if source == "generated":
        if not tasks:
            raise ValueError("tasks: source 'generated' needs at least one task name")
        per_task = -(-count // len(tasks))
        records = [r for t in tasks for r in generate_task(t, per_task, seed)]
    else:
        records = load_source(source, split="train")
    if not records:
        raise ValueError(f"source '{source}' has no records")
    rng = random.Random(seed)
    chosen = rng.sample(records, min(count, len(records)))
    return [record_text(r) for r in chosen]
