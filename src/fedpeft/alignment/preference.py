"""Preference data: records ``{"prompt", "chosen", "rejected"}`` (plus any other fields, e.g. ``task``).

Sources, all ending in the same three string fields:

- a local file (``.jsonl``, ``.json``, ``.csv``, ``.tsv``, ``.parquet``) or a Hub dataset, read through
  ``data.sources.load_records`` (so ``columns`` renames source columns, e.g. ``"question->prompt"``);
- ``format`` says how its records map to the three fields:

  * ``fields``: the record already has ``prompt``, ``chosen`` and ``rejected``; a chosen/rejected that
    is a chat (a list of ``{"role", "content"}`` messages) is reduced to its last assistant message;
  * ``hh-rlhf`` (Anthropic/hh-rlhf): ``chosen`` and ``rejected`` are whole transcripts
    ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` that share the dialogue so far; the prompt is their common
    prefix up to and including its last ``"\\n\\nAssistant:"``, the completions are what follows;
  * ``ultrafeedback`` (HuggingFaceH4/ultrafeedback_binarized, splits ``train_prefs``/``test_prefs``):
    ``prompt`` is a string, ``chosen``/``rejected`` are chats whose last assistant message is the answer.

  A known Hub name picks its format and split by itself (``HUB_FORMATS``);

- ``generated``: a preference set made from fedpeft's generated tasks (``data.generated``): the task's
  exact answer is chosen, the answer of another record of the same task (so a plausible, well-formed but
  wrong answer) is rejected. Deterministic from the seed; no files, no network.

Bad records fail before any model loads, naming the record, the field and what was expected.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedpeft.data.generated import GENERATORS, generate_split
from fedpeft.data.sources import DataError, Record, load_records

FIELDS = ("prompt", "chosen", "rejected")
FORMATS = ("fields", "hh-rlhf", "ultrafeedback")

# Hub name -> (format, default split).
HUB_FORMATS: dict[str, tuple[str, str]] = {
    "Anthropic/hh-rlhf": ("hh-rlhf", "train"),
    "HuggingFaceH4/ultrafeedback_binarized": ("ultrafeedback", "train_prefs"),
}

ASSISTANT_TURN = "\n\nAssistant:"


# ------------------------------------------------------------------------------------------ mapping
def _require(record: Mapping[str, Any], field: str, index: int, origin: str) -> Any:
    if field not in record:
        raise DataError(f"{origin}: preference record {index} has no field {field!r} (it has {sorted(record)}); "
                        f"a preference record needs {', '.join(FIELDS)}")
    return record[field]


def _last_assistant(value: Any, field: str, index: int, origin: str) -> str:
    """A completion given as a string, or as a chat whose last assistant message is the completion."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, Mapping) for m in value):
        for message in reversed(value):
            if message.get("role") == "assistant":
                return str(message.get("content", ""))
        raise DataError(f"{origin}: preference record {index} field {field!r} is a chat with no assistant message "
                        f"(roles: {[m.get('role') for m in value]})")
    raise DataError(f"{origin}: preference record {index} field {field!r} is a {type(value).__name__}; expected a "
                    f"string or a list of chat messages")


def split_hh_transcripts(chosen: str, rejected: str, index: int = 0, origin: str = "<records>") -> tuple[str, str, str]:
    """(prompt, chosen completion, rejected completion) of an hh-rlhf pair of transcripts."""
    common = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common += 1
    cut = chosen.rfind(ASSISTANT_TURN, 0, common)  # the last assistant turn lying wholly in the shared prefix
    if cut < 0:
        raise DataError(f"{origin}: preference record {index} (format hh-rlhf): the chosen and rejected transcripts "
                        f"share no prefix ending in {ASSISTANT_TURN!r}; expected 'Human: ... Assistant: ...' dialogues")
    end = cut + len(ASSISTANT_TURN)
    return chosen[:end], chosen[end:], rejected[end:]


def to_preference(record: Mapping[str, Any], fmt: str, index: int = 0, origin: str = "<records>") -> Record:
    """One source record -> ``{"prompt", "chosen", "rejected", ...other fields}``."""
    if not isinstance(record, Mapping):
        raise DataError(f"{origin}: preference record {index} is a {type(record).__name__}; expected an object")
    if fmt == "hh-rlhf":
        chosen, rejected = (_require(record, f, index, origin) for f in ("chosen", "rejected"))
        for field, value in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str):
                raise DataError(f"{origin}: preference record {index} field {field!r} is a {type(value).__name__}; "
                                f"format hh-rlhf expects a transcript string")
        prompt, chosen, rejected = split_hh_transcripts(chosen, rejected, index, origin)
    elif fmt in ("fields", "ultrafeedback"):
        prompt, chosen, rejected = (_require(record, f, index, origin) for f in FIELDS)
        if not isinstance(prompt, str):
            raise DataError(f"{origin}: preference record {index} field 'prompt' is a {type(prompt).__name__}; "
                            f"expected a string")
        chosen = _last_assistant(chosen, "chosen", index, origin)
        rejected = _last_assistant(rejected, "rejected", index, origin)
    else:
        raise DataError(f"preference format {fmt!r} is unknown; valid: {', '.join(FORMATS)}")
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if not value.strip():
            raise DataError(f"{origin}: preference record {index} field {field!r} is empty; expected a completion")
    out = {k: v for k, v in record.items() if k not in FIELDS}
    out.update(prompt=prompt, chosen=chosen, rejected=rejected)
    return out


def to_preferences(records: Sequence[Mapping[str, Any]], fmt: str = "fields", origin: str = "<records>") -> list[Record]:
    if fmt not in FORMATS:
        raise DataError(f"preference format {fmt!r} is unknown; valid: {', '.join(FORMATS)}")
    return [to_preference(r, fmt, i, origin) for i, r in enumerate(records)]


# ------------------------------------------------------------------------------------------ sources
def generated_preferences(tasks: Sequence[str], train_per_task: int, eval_per_task: int,
                          seed: int) -> tuple[list[Record], list[Record]]:
    """Train and held-out preference pairs from the generated tasks: chosen = the exact answer,
    rejected = a different answer of the same task (drawn with a seeded RNG). Held-out prompts never
    occur in training (``data.generated.generate_split``)."""
    unknown = [t for t in tasks if t not in GENERATORS]
    if unknown:
        raise DataError(f"generated preferences: unknown task {unknown[0]!r}; valid: {', '.join(GENERATORS)}")
    train, held_out = generate_split(list(tasks), train_per_task, eval_per_task, seed)
    answers: dict[str, list[str]] = {}
    for r in train + held_out:
        answers.setdefault(r["task"], [])
        if r["output"] not in answers[r["task"]]:
            answers[r["task"]].append(r["output"])
    rng = random.Random(f"{seed}:preferences")

    def pair(r: Record) -> Record:
        wrong = [a for a in answers[r["task"]] if a != r["output"]]
        if not wrong:
            raise DataError(f"generated preferences: task {r['task']!r} produced a single distinct answer; "
                            f"raise the number of records per task")
        return {"task": r["task"], "prompt": r["instruction"], "chosen": r["output"], "rejected": rng.choice(wrong)}

    return [pair(r) for r in train], [pair(r) for r in held_out]


def load_preferences(source: str | Path, *, fmt: str | None = None, columns: Mapping[str, str] | str | None = None,
                     split: str | None = None, hub_config: str | None = None, limit: int | None = None) -> list[Record]:
    """Preference records of a local file/directory or a Hub dataset. ``fmt`` defaults to the Hub
    name's format (``HUB_FORMATS``), else ``fields``; ``split`` to the Hub name's split, else ``train``."""
    known_fmt, known_split = HUB_FORMATS.get(str(source), ("fields", "train"))
    fmt = fmt or known_fmt
    if fmt not in FORMATS:
        raise DataError(f"preference format {fmt!r} is unknown; valid: {', '.join(FORMATS)}")
    records = load_records(source, columns, split=split or known_split, hub_config=hub_config, limit=limit)
    return to_preferences(records, fmt, origin=str(source))
