"""Answer extraction from generated text, as the seeds' numbers were produced.

The commonsense and arithmetic protocols follow LLM-Adapters (AGI-Edgerunners/LLM-Adapters,
``commonsense_evaluate.py`` and ``evaluate.py``):

* commonsense: the *first* occurrence of a label of the task's label set (``true|false``,
  ``solution1|solution2``, ``answer1..answer5``, ``ending1..ending4``, ``option1|option2``) in the
  response, case-sensitive; no label means wrong.
* GSM8K and the other numeric word problems: commas removed, the *last* number in the response;
  correct when ``|prediction - gold| <= 0.001``; no number means wrong.
* AQuA-style letters: LLM-Adapters takes the first capital ``A-E`` anywhere, which also matches the
  "A" of "Answer"; it is kept as :func:`extract_letter_llm_adapters` for reproducing their numbers,
  while :func:`extract_choice_letter` (used for MMLU) looks for the letter the answer names.

``lenient=True`` on the commonsense extractor case-folds and accepts ``Answer 3`` / ``solution 1``
spellings, which matters for zero-shot instruct models that never saw the training format.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Task name -> labels, in LLM-Adapters' order. Names are the folder names of the LLM-Adapters data.
COMMONSENSE_LABELS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
}

_TASK_ALIASES = {
    "siqa": "social_i_qa",
    "social_iqa": "social_i_qa",
    "arc_challenge": "ARC-Challenge",
    "arc-c": "ARC-Challenge",
    "arc_c": "ARC-Challenge",
    "arc_easy": "ARC-Easy",
    "arc-e": "ARC-Easy",
    "arc_e": "ARC-Easy",
    "obqa": "openbookqa",
}


def canonical_commonsense_task(task: str) -> str:
    """Map ``arc_challenge``, ``ARC-C``, ``siqa``... to the LLM-Adapters folder name."""
    if task in COMMONSENSE_LABELS:
        return task
    key = task.lower()
    if key in _TASK_ALIASES:
        return _TASK_ALIASES[key]
    for name in COMMONSENSE_LABELS:
        if name.lower() == key:
            return name
    raise ValueError(f"unknown commonsense task '{task}'; valid: {', '.join(COMMONSENSE_LABELS)}")


def _label_pattern(labels: Sequence[str], lenient: bool) -> re.Pattern[str]:
    if not lenient:
        return re.compile("|".join(re.escape(label) for label in labels))
    parts = []
    for label in labels:
        match = re.fullmatch(r"([a-z]+)(\d+)", label)
        parts.append(rf"{match.group(1)}\s*{match.group(2)}\b" if match else rf"\b{re.escape(label)}\b")
    return re.compile("|".join(parts), re.IGNORECASE)


def extract_commonsense_label(task: str, text: str, lenient: bool = False) -> str | None:
    """The first label of ``task``'s label set in ``text`` (LLM-Adapters), normalised to lower case."""
    labels = COMMONSENSE_LABELS[canonical_commonsense_task(task)]
    match = _label_pattern(labels, lenient).search(text.strip())
    if match is None:
        return None
    return re.sub(r"\s+", "", match.group(0)).lower()


_NUMBER = re.compile(r"-?\d+\.?\d*")


def extract_last_number(text: str) -> float | None:
    """LLM-Adapters' numeric extraction: drop commas, take the last number; ``None`` when there is none."""
    found = _NUMBER.findall(text.replace(",", ""))
    if not found:
        return None
    try:
        return float(found[-1])
    except ValueError:  # pragma: no cover - the pattern only matches floats
        return None


def gsm8k_gold(answer: str) -> float:
    """The number after ``####`` in a GSM8K reference solution."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '####' marker: {answer[-80:]!r}")
    return float(answer.split("####")[-1].strip().replace(",", ""))


def numbers_match(prediction: float | None, gold: float, tolerance: float = 1e-3) -> bool:
    return prediction is not None and abs(prediction - gold) <= tolerance


def extract_letter_llm_adapters(text: str, letters: str = "ABCDE") -> str | None:
    """LLM-Adapters' letter extraction: the first capital letter of ``letters`` anywhere in the text."""
    match = re.search(f"[{letters}]", text.strip())
    return match.group(0) if match else None


def extract_choice_letter(text: str, letters: str = "ABCD") -> str | None:
    """The option letter an answer names: ``(B)``, ``answer is C``, ``D.`` at the start, or a lone letter.

    Tried in order of how explicit they are; the first pattern that matches wins and within it the
    first occurrence. Returns ``None`` when no letter is named.
    """
    text = text.strip()
    cls = f"[{letters}]"
    patterns = [
        rf"[Aa]nswer(?:\s+is)?\s*:?\s*(?:[Oo]ption\s*)?\(?({cls})\)?(?![A-Za-z])",
        rf"^\(?({cls})(?:[).:\s]|$)",
        rf"\(({cls})\)",
        rf"(?<![A-Za-z])({cls})[.):](?:\s|$)",
        rf"(?<![A-Za-z'])({cls})(?![A-Za-z'])",
    ]
    for pattern in patterns:
        match = re.search(pattern, text, flags=re.MULTILINE)
        if match:
            return match.group(1).upper()
    return None
