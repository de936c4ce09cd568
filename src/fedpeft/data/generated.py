"""A multi-task instruction set that fedpeft generates itself: clearly different tasks with exact answers.

Deterministic from a seed, no files and no network, so the quickstart and the tests always have real
supervised data with an unambiguous metric (exact match). Each record is
``{"task", "instruction", "output"}``. The tasks differ in what the answer *is* (a sum, a reversed
sequence, a conversion, a transformed word...), so adapters trained on them carry task identity, which
is what multi-task methods such as FL-TAC need. Three of them (``sentiment``, ``topic``, ``parity``)
are classification tasks: their answers are label words, so they also train a classification head
(``model.head=classification``, e.g. on the MiniLM encoder).
"""

from __future__ import annotations

import random
from collections.abc import Callable

_WORDS = (
    "apple river stone cloud garden window pencil forest candle silver rabbit orange planet bridge "
    "yellow summer winter market doctor engine butter island jacket kitten ladder mirror needle "
    "pepper rocket saddle tunnel violin wallet button carpet dragon falcon guitar helmet lemon "
    "magnet napkin parrot pillow rubber sunset tomato velvet walnut"
).split()
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(1, 30), rng.randint(1, 30)
    return f"Add {a} and {b}.", str(a + b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    items = rng.sample(_LETTERS, 3)
    return f"Reverse this sequence: {' '.join(items)}", " ".join(reversed(items))


def _unit_conversion(rng: random.Random) -> tuple[str, str]:
    value = rng.randint(2, 99)
    unit, factor, target = rng.choice([("kilometers", 1000, "meters"), ("meters", 100, "centimeters"),
                                       ("kilograms", 1000, "grams"), ("hours", 60, "minutes")])
    return f"Convert {value} {unit} to {target}.", str(value * factor)


def _uppercase(rng: random.Random) -> tuple[str, str]:
    words = " ".join(rng.sample(_WORDS, 2))
    return f"Write '{words}' in capital letters.", words.upper()


def _sort_numbers(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(1, 100), 4)
    return f"Sort these numbers from smallest to largest: {' '.join(map(str, numbers))}", " ".join(map(str, sorted(numbers)))


def _last_word(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, 4)
    return f"What is the last word of this list: {' '.join(words)}", words[-1]


def _count_items(rng: random.Random) -> tuple[str, str]:
    items = rng.sample(_WORDS, rng.randint(2, 7))
    return f"How many words are in this list: {' '.join(items)}", str(len(items))


# Classification tasks: the answer is one of a few label words (a classification head's classes).
_POSITIVE = "wonderful excellent friendly delicious lovely brilliant pleasant superb charming perfect".split()
_NEGATIVE = "terrible awful rude disgusting boring broken dirty horrible noisy disappointing".split()
_THINGS = "food service room staff film music view coffee price seat show book".split()
_TOPICS = {
    "sport": "football goal referee stadium tennis match coach marathon team score".split(),
    "food": "soup bread recipe kitchen pasta dessert spices oven breakfast salad".split(),
    "music": "guitar concert melody singer album drums chorus orchestra song piano".split(),
    "weather": "rain storm forecast sunshine snow wind clouds temperature thunder fog".split(),
}


def _sentiment(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(["positive", "negative"])
    words = _POSITIVE if label == "positive" else _NEGATIVE
    a, b = rng.sample(_THINGS, 2)
    return f"Is this review positive or negative? The {a} was {rng.choice(words)} and the {b} was {rng.choice(words)}.", label


def _topic(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(sorted(_TOPICS))
    a, b = rng.sample(_TOPICS[label], 2)
    return f"Is this sentence about sport, food, music or weather? They talked about the {a} and the {b}.", label


def _parity(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(10, 999)
    return f"Is {n} even or odd?", "even" if n % 2 == 0 else "odd"


CLASSIFICATION_TASKS = ("sentiment", "topic", "parity")

GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": _arithmetic,
    "reverse": _reverse,
    "unit_conversion": _unit_conversion,
    "uppercase": _uppercase,
    "sort_numbers": _sort_numbers,
    "last_word": _last_word,
    "count_items": _count_items,
    "sentiment": _sentiment,
    "topic": _topic,
    "parity": _parity,
}


def generate_task(task: str, count: int, seed: int) -> list[dict[str, str]]:
    if task not in GENERATORS:
        raise ValueError(f"data.tasks: unknown generated task '{task}'; valid: {', '.join(GENERATORS)}")
    # Seeded by (seed, task) so adding a task never changes the records of another.
    rng = random.Random(f"{seed}:{task}")
    records = []
    for _ in range(count):
        instruction, output = GENERATORS[task](rng)
        records.append({"task": task, "instruction": instruction, "output": output})
    return records


def generate_split(tasks: list[str], train_per_task: int, eval_per_task: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and evaluation records; evaluation prompts never occur in the training records."""
    train, evaluation = [], []
    for task in tasks:
        records = generate_task(task, train_per_task + 4 * eval_per_task, seed)
        task_train = records[:train_per_task]
        seen = {r["instruction"] for r in task_train}
        held_out = [r for r in records[train_per_task:] if r["instruction"] not in seen]
        unique, names = [], set()
        for r in held_out:
            if r["instruction"] not in names:
                names.add(r["instruction"])
                unique.append(r)
        train.extend(task_train)
        evaluation.extend(unique[:eval_per_task])
    return train, evaluation
