"""Answer extraction and grading helpers: the rules a ``fedpeft.data.tasks.Task`` calls.

Nothing here decides which rule grades which task: the task does (``Task.extract`` / ``Task.score``),
and every evaluator (per-round evaluation, ``fedpeft eval`` suites) grades through the task, so one
generated answer gets one grade. Pure functions on strings; no model, no data loading.

LLM-Adapters-compatible rules (AGI-Edgerunners/LLM-Adapters, ``commonsense_evaluate.py`` and
``evaluate.py``):

* commonsense: the *first* occurrence of one of the question's labels (``true|false``,
  ``solution1|solution2``, ``answer1..answer5``, ``ending1..ending4``, ``option1|option2``) in the
  response, case-sensitive; no label means wrong. ``lenient=True`` case-folds and accepts ``Answer 3`` /
  ``solution 1`` spellings (zero-shot instruct models that never saw the training format).
* numbers: commas removed, the *last* number in the response (:func:`extract_last_number`), correct
  within 0.001.
* AQuA-style letters: the first capital ``A-E`` anywhere (:func:`extract_letter_llm_adapters`; it also
  matches the "A" of "Answer", kept only for reproducing their numbers).

fedpeft's own rules, used by default where a response states its answer:

* :func:`extract_answer_number`: the number after the last ``####`` (the GSM8K solution format), else
  after the last "answer is", else the last number. "The answer is 18. Check: 9 + 10 = 19" gives 18.
* :func:`extract_choice_letter`: the letter the answer names (``(B)``, ``answer is C``, ``D.``).
* :func:`normalize_answer` for exact match, :func:`rouge_l` for free text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

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


# ------------------------------------------------------------------------------------ commonsense
def _label_pattern(labels: Sequence[str], lenient: bool) -> re.Pattern[str]:
    ordered = sorted(labels, key=len, reverse=True)  # answer10 before answer1 if a set ever has both
    if not lenient:
        return re.compile("|".join(re.escape(label) for label in ordered))
    parts = []
    for label in ordered:
        match = re.fullmatch(r"([a-z]+)(\d+)", label)
        parts.append(rf"{match.group(1)}\s*{match.group(2)}\b" if match else rf"\b{re.escape(label)}\b")
    return re.compile("|".join(parts), re.IGNORECASE)


def first_label(labels: Sequence[str], text: str, lenient: bool = False) -> str | None:
    """The first of ``labels`` in ``text`` (LLM-Adapters: case-sensitive substring), lower case;
    ``lenient`` case-folds and allows a space before the number."""
    match = _label_pattern(labels, lenient).search(text.strip())
    if match is None:
        return None
    return re.sub(r"\s+", "", match.group(0)).lower()


def extract_commonsense_label(task: str, text: str, lenient: bool = False) -> str | None:
    """The first label of ``task``'s LLM-Adapters label set in ``text``, normalised to lower case."""
    return first_label(COMMONSENSE_LABELS[canonical_commonsense_task(task)], text, lenient)


# ---------------------------------------------------------------------------------------- numbers
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_LLM_ADAPTERS_NUMBER = re.compile(r"-?\d+\.?\d*")


def _clean_numbers(text: str) -> str:
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)  # thousands separators: 1,000 -> 1000
    return text.replace("$", "")


def parse_number(text: Any) -> float | None:
    """A float from a gold answer such as ``"72"``, ``"8.0"``, ``"1,000"``, ``"$5"``; None if none."""
    match = _NUMBER.search(_clean_numbers(str(text)))
    return float(match.group()) if match else None


def extract_answer_number(prediction: str) -> float | None:
    """The answer number of a generation: after the last ``####``, else after the last "answer is",
    else the last number in the text."""
    text = _clean_numbers(prediction)
    for marker in ("####", "answer is"):
        position = text.lower().rfind(marker)
        if position >= 0:
            match = _NUMBER.search(text[position + len(marker):])
            if match:
                return float(match.group())
    numbers = _NUMBER.findall(text)
    return float(numbers[-1]) if numbers else None


def extract_last_number(text: str) -> float | None:
    """LLM-Adapters' numeric extraction: drop commas, take the last number; ``None`` when there is none."""
    found = _LLM_ADAPTERS_NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def numbers_equal(a: float | None, b: float | None, tolerance: float = 1e-3) -> bool:
    """Equal within an absolute ``tolerance`` (LLM-Adapters uses 0.001); None never equals."""
    return a is not None and b is not None and abs(a - b) <= tolerance


numbers_match = numbers_equal  # the name the LLM-Adapters helpers used


def gsm8k_gold(answer: str) -> float:
    """The number after ``####`` in a GSM8K reference solution."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '####' marker: {answer[-80:]!r}")
    return float(answer.split("####")[-1].strip().replace(",", ""))


# ---------------------------------------------------------------------------------------- letters
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


# ------------------------------------------------------------------------------------- free text
def normalize_answer(text: str) -> str:
    """First line, surrounding whitespace and a trailing period removed; inner spaces collapsed."""
    text = text.strip().split("\n")[0].strip()
    text = re.sub(r"\s+", " ", text)
    return text[:-1].rstrip() if text.endswith(".") else text


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased word tokens."""
    pred, ref = re.findall(r"\w+", prediction.lower()), re.findall(r"\w+", reference.lower())
    if not pred or not ref:
        return float(pred == ref)
    previous = [0] * (len(ref) + 1)
    for p in pred:
        current = [0]
        for j, r in enumerate(ref):
            current.append(previous[j] + 1 if p == r else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)
