"""Tasks: how a record becomes (prompt, target) and how a model's answer is scored.

A task never tokenizes or applies a prompt template: it returns the user-side text (``instruction``
plus an optional ``input``/context) and the target text; ``fedpeft.data.encoding`` wraps them in the
Alpaca template or the model's chat template and masks the loss to the target.

Types (``get_task(name)``):

- ``instruction`` (aliases ``alpaca``, ``dolly``): instruction + optional input/context -> output/response;
  scored by ROUGE-L F1 (or exact match with ``metric="exact"``).
- ``gsm8k``: question -> worked answer ending ``#### <number>``; scored on the number.
- ``commonsense``: LLM-Adapters multiple choice (``answer`` like ``solution1``, ``true``, ``option2``);
  scored on the first option word in the answer, as LLM-Adapters does.
- ``mmlu``: question + 4 options -> letter, optional k-shot exemplars from the dev set of the same subject;
  each subject belongs to one of MMLU's four categories (``mmlu_category``).
- ``exact`` (the generated tasks): instruction -> output; exact match after ``normalize_answer``.
- ``classification``: text -> label word (the label set given, or inferred from the training records);
  scored on the first label word said. ``sst2``: the same with SST-2's negative/positive words.
- ``math``: math word problems (LLM-Adapters format; number or option letter answers).

A task is the only place an answer is extracted and graded: per-round evaluation (``ExperimentData.score``)
and the benchmark suites (``fedpeft.evaluation.suites``) both call ``task.score``; the extraction rules
themselves are pure helpers in ``fedpeft.evaluation.extraction`` (LLM-Adapters-compatible ones included).

Every task validates its records up front (``task.validate(records, origin)``): a missing field or a
label outside the label set is a ``DataError`` naming the file, the record and the value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from fedpeft.data.sources import DataError, Record
from fedpeft.evaluation.extraction import (extract_answer_number, extract_choice_letter, extract_last_number,
                                           first_label, normalize_answer, numbers_equal, parse_number, rouge_l)

__all__ = ["Example", "Task", "TASK_TYPES", "get_task", "infer_task_type", "normalize_answer", "parse_number",
           "rouge_l"]


@dataclass(frozen=True)
class Example:
    """What a task makes of one record: user-side text and the target the loss is computed on."""

    instruction: str
    target: str
    input: str = ""

    @property
    def prompt(self) -> str:
        """Instruction and input as one user message (for chat templates and plain prompts)."""
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction


def _text(record: Mapping[str, Any], *names: str, default: str | None = None) -> str:
    for name in names:
        value = record.get(name)
        if value is not None:
            return str(value)
    if default is not None:
        return default
    raise DataError(f"record has none of the fields {list(names)} (it has {sorted(record)})")


# ------------------------------------------------------------------------------------------- tasks
class Task:
    """Base class. Subclasses set ``name`` and ``fields`` (each an alternative tuple) and define
    ``example``, ``reference`` and ``score``."""

    name: ClassVar[str] = "task"
    fields: ClassVar[tuple[tuple[str, ...], ...]] = ()
    metric_name: ClassVar[str] = "accuracy"  # what ``score`` averages to (per-round metric names)

    def validate(self, records: Sequence[Record], origin: str = "<records>") -> None:
        """Raise a DataError naming the first record that this task cannot use."""
        if not records:
            raise DataError(f"{origin}: no records for task {self.name!r} (empty split)")
        for i, record in enumerate(records):
            for alternatives in self.fields:
                if not any(record.get(f) is not None for f in alternatives):
                    wanted = " or ".join(repr(f) for f in alternatives)
                    raise DataError(
                        f"{origin}: record {i} has no field {wanted} for task {self.name!r} (it has {sorted(record)}); "
                        f"map a column to it with data.columns"
                    )
            self._check_record(record, i, origin)

    def _check_record(self, record: Record, index: int, origin: str) -> None:
        """Task-specific checks (label sets); raise DataError."""

    def example(self, record: Record) -> Example:
        raise NotImplementedError

    def prompt(self, record: Record) -> str:
        return self.example(record).prompt

    def target(self, record: Record) -> str:
        return self.example(record).target

    def reference(self, record: Record) -> str:
        """The gold answer in the form ``extract`` returns (a number, a letter, an option word...)."""
        return self.target(record)

    def extract(self, prediction: str) -> Any:
        """The answer part of a generation (None when nothing recognisable is there)."""
        return prediction.strip()

    def answer(self, prediction: str, record: Record) -> Any:
        """The answer ``score`` grades, for this record (None: the generation names none)."""
        return self.extract(prediction)

    def score(self, prediction: str, record: Record) -> float:
        """1.0 / 0.0 for tasks with one right answer; a similarity in [0, 1] for free text."""
        raise NotImplementedError

    def candidates(self, record: Record) -> list[str] | None:
        """Target strings of every option, for multiple-choice log-likelihood scoring (None: free text)."""
        return None

    def gold_index(self, record: Record) -> int | None:
        options = self.candidates(record)
        return None if options is None else options.index(self.target(record))

    def normalize(self, record: Record) -> Record:
        """The record with ``instruction``, ``input``, ``output`` (the generated-set shape that
        ``encoding`` reads), ``reference`` (the gold answer as ``extract`` returns it) and ``task`` set;
        its other fields (``category``, ``client``, ``answer``...) are kept for partitions and scoring."""
        ex = self.example(record)
        out = dict(record)
        out.update(task=record.get("task", self.name), instruction=ex.instruction, input=ex.input,
                   output=ex.target, reference=self.reference(record), task_type=self.name)
        return out


class ExactMatchTask(Task):
    """Instruction -> output graded by exact match after ``normalize_answer`` (first line, no trailing
    period, collapsed spaces): fedpeft's generated tasks, whose answers are exact."""

    name = "exact"
    fields = (("instruction",), ("output",))
    metric_name = "exact_match"

    def example(self, record: Record) -> Example:
        return Example(str(record["instruction"]), str(record["output"]), _text(record, "input", default=""))

    def extract(self, prediction: str) -> str:
        return normalize_answer(prediction)

    def score(self, prediction: str, record: Record) -> float:
        return float(self.extract(prediction) == normalize_answer(str(record["output"])))


class InstructionTask(Task):
    """Alpaca / Dolly style: instruction + optional input (``input`` or ``context``) -> ``output`` or
    ``response``."""

    name = "instruction"
    fields = (("instruction",), ("output", "response"))

    def __init__(self, metric: str = "rougeL") -> None:
        if metric not in ("rougeL", "exact"):
            raise DataError(f"instruction task metric must be 'rougeL' or 'exact', got {metric!r}")
        self.metric = metric
        self.metric_name = "rougeL" if metric == "rougeL" else "exact_match"  # type: ignore[misc]

    def example(self, record: Record) -> Example:
        context = _text(record, "input", "context", default="").strip()
        return Example(str(record["instruction"]).strip(), _text(record, "output", "response").strip(), context)

    def score(self, prediction: str, record: Record) -> float:
        reference = self.reference(record)
        if self.metric == "exact":
            return float(prediction.strip().lower() == reference.strip().lower())
        return rouge_l(prediction, reference)


class GSM8KTask(Task):
    """GSM8K: ``question`` -> ``answer`` (worked solution ending ``#### <number>``). Calculator
    annotations ``<<48/2=24>>`` are removed from the target unless ``keep_calculator``. The answer of a
    generation is the number after ``####`` / "answer is", else the last number (``extraction="answer"``,
    default), or LLM-Adapters' last number (``extraction="last_number"``, for reproducing their tables)."""

    name = "gsm8k"
    fields = (("question", "instruction"), ("answer", "output"))
    EXTRACTORS: ClassVar[dict] = {"answer": extract_answer_number, "last_number": extract_last_number}

    def __init__(self, keep_calculator: bool = False, extraction: str = "answer") -> None:
        if extraction not in self.EXTRACTORS:
            raise DataError(f"gsm8k extraction must be one of {', '.join(self.EXTRACTORS)}, got {extraction!r}")
        self.keep_calculator = keep_calculator
        self.extraction = extraction

    def _solution(self, record: Record) -> str:
        return _text(record, "answer", "output")

    def _check_record(self, record: Record, index: int, origin: str) -> None:
        solution = self._solution(record)
        if "####" not in solution or parse_number(solution.rsplit("####", 1)[1]) is None:
            raise DataError(f"{origin}: record {index}: GSM8K answer has no '#### <number>' at the end: {solution[-60:]!r}")

    def example(self, record: Record) -> Example:
        solution = self._solution(record)
        if not self.keep_calculator:
            solution = re.sub(r"<<[^>]*>>", "", solution)
        return Example(_text(record, "question", "instruction").strip(), solution.strip())

    def reference(self, record: Record) -> str:
        number = parse_number(self._solution(record).rsplit("####", 1)[-1])
        return _format_number(number)

    def extract(self, prediction: str) -> float | None:
        return self.EXTRACTORS[self.extraction](prediction)

    def score(self, prediction: str, record: Record) -> float:
        return float(numbers_equal(self.extract(prediction), float(self.reference(record))))


def _format_number(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


_OPTION_PREFIXES = {"solution": 2, "answer": 5, "option": 2, "ending": 4}
_OPTION_MARKER = re.compile(r"(Answer|Solution|Option|Ending)(\d)\s*:\s*")


class CommonsenseTask(Task):
    """LLM-Adapters commonsense format ``{instruction, input, output, answer}``; ``answer`` is an option
    word (``true``/``false``, ``solution1``, ``answer3``, ``option2``, ``ending4``). The options are read
    from the instruction's "Answer format: a/b/c" line (else from the answer's prefix). A generation's
    answer is the first option word in it, case-sensitive, as LLM-Adapters' evaluation does
    (``extraction.first_label``); ``lenient`` case-folds and accepts ``Answer 3``."""

    name = "commonsense"
    fields = (("instruction",), ("answer",))

    def __init__(self, lenient: bool = False) -> None:
        self.lenient = lenient

    def options(self, record: Record) -> list[str]:
        match = re.search(r"Answer format:\s*([\w/ ]+)", str(record.get("instruction", "")))
        if match:
            return [o.strip().lower() for o in match.group(1).split("/") if o.strip()]
        answer = str(record.get("answer", "")).strip().lower()
        if answer in ("true", "false"):
            return ["true", "false"]
        prefix = re.sub(r"\d+$", "", answer)
        return [f"{prefix}{i}" for i in range(1, _OPTION_PREFIXES.get(prefix, 5) + 1)]

    def option_texts(self, record: Record) -> tuple[str, list[str]]:
        """(question, option texts) of the instruction: ``Answer1: ... Answer2: ...`` markers, or the
        question after "question:" with ``true``/``false`` for BoolQ-style records."""
        instruction = str(record["instruction"])
        body = re.split(r"\s*Answer format:", instruction)[0]
        if self.options(record) == ["true", "false"]:
            return body.split("question:", 1)[-1].strip(), ["true", "false"]
        markers = list(_OPTION_MARKER.finditer(body))
        if not markers:
            raise DataError(f"commonsense record: no options (Answer1: / Solution1: ...) in instruction {instruction[:120]!r}")
        head = body[:markers[0].start()]
        question = head.split(": ", 1)[1].strip() if ": " in head else head.strip()
        texts = [body[m.end():(markers[i + 1].start() if i + 1 < len(markers) else len(body))].strip()
                 for i, m in enumerate(markers)]
        return question, texts

    def _check_record(self, record: Record, index: int, origin: str) -> None:
        answer = str(record["answer"]).strip().lower()
        if answer not in self.options(record):
            raise DataError(f"{origin}: record {index}: answer {record['answer']!r} is not one of the options "
                            f"{self.options(record)}")

    def example(self, record: Record) -> Example:
        target = _text(record, "output", default="").strip() or f"the correct answer is {self.reference(record)}"
        return Example(str(record["instruction"]).strip(), target, _text(record, "input", default="").strip())

    def reference(self, record: Record) -> str:
        return str(record["answer"]).strip().lower()

    def extract(self, prediction: str, options: Sequence[str] | None = None) -> str | None:
        words = options or ["true", "false", *(f"{p}{i}" for p, n in _OPTION_PREFIXES.items() for i in range(1, n + 1))]
        return first_label(words, prediction, self.lenient)

    def answer(self, prediction: str, record: Record) -> str | None:
        return self.extract(prediction, self.options(record))

    def score(self, prediction: str, record: Record) -> float:
        return float(self.answer(prediction, record) == self.reference(record))

    def candidates(self, record: Record) -> list[str]:
        target = self.target(record)
        gold = self.reference(record)
        stem = target[: target.lower().rfind(gold)] if gold in target.lower() else "the correct answer is "
        return [f"{stem}{option}" for option in self.options(record)]

    def gold_index(self, record: Record) -> int:
        return self.options(record).index(self.reference(record))


# MMLU subject -> category, the grouping of Hendrycks et al.'s ``categories.py`` (hendrycks/test):
# subjects -> subcategories -> STEM, humanities, social sciences, other (business, health, misc.).
# (lm-evaluation-harness files anatomy under STEM; Hendrycks' map, used here, under health -> other.)
MMLU_CATEGORIES: dict[str, tuple[str, ...]] = {
    "stem": ("abstract_algebra", "astronomy", "college_biology", "college_chemistry",
             "college_computer_science", "college_mathematics", "college_physics", "computer_security",
             "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
             "high_school_chemistry", "high_school_computer_science", "high_school_mathematics",
             "high_school_physics", "high_school_statistics", "machine_learning"),
    "humanities": ("formal_logic", "high_school_european_history", "high_school_us_history",
                   "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
                   "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
                   "world_religions"),
    "social_sciences": ("econometrics", "high_school_geography", "high_school_government_and_politics",
                        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
                        "human_sexuality", "professional_psychology", "public_relations", "security_studies",
                        "sociology", "us_foreign_policy"),
    "other": ("anatomy", "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
              "management", "marketing", "medical_genetics", "miscellaneous", "nutrition",
              "professional_accounting", "professional_medicine", "virology"),
}
MMLU_SUBJECT_CATEGORY: dict[str, str] = {s: c for c, subjects in MMLU_CATEGORIES.items() for s in subjects}


def mmlu_category(subject: str) -> str:
    """The category of an MMLU subject (``stem``, ``humanities``, ``social_sciences``, ``other``);
    a subject outside the 57 is ``other``."""
    return MMLU_SUBJECT_CATEGORY.get(subject.strip(), "other")


class MMLUTask(Task):
    """MMLU: ``question``, options ``A``-``D`` (or ``choices`` list) and ``answer`` (letter or 0-3).
    With ``shots`` > 0, the first ``shots`` records of ``dev_records`` with the same ``subject`` are
    prepended as solved exemplars (Hendrycks et al.'s prompt)."""

    name = "mmlu"
    fields = (("question",), ("answer",))
    LETTERS: ClassVar[str] = "ABCD"

    def __init__(self, shots: int = 0, dev_records: Sequence[Record] | None = None) -> None:
        if shots < 0:
            raise DataError(f"mmlu shots must be >= 0, got {shots}")
        if shots and not dev_records:
            raise DataError(f"mmlu with shots={shots} needs dev_records (the MMLU dev split) for the exemplars")
        self.shots = shots
        self.dev_by_subject: dict[str, list[Record]] = {}
        for record in dev_records or []:
            self.dev_by_subject.setdefault(self.subject(record), []).append(record)

    @staticmethod
    def subject(record: Record) -> str:
        return str(record.get("subject") or "").strip()

    def choices(self, record: Record) -> list[str]:
        if record.get("choices") is not None:
            return [str(c) for c in record["choices"]]
        return [str(record[letter]) for letter in self.LETTERS if letter in record]

    def _check_record(self, record: Record, index: int, origin: str) -> None:
        if len(self.choices(record)) != 4:
            raise DataError(f"{origin}: record {index}: MMLU needs 4 options (fields A-D or choices), "
                            f"got {len(self.choices(record))}")
        if self.reference(record) not in self.LETTERS:
            raise DataError(f"{origin}: record {index}: answer {record['answer']!r} is not one of A, B, C, D (or 0-3)")

    def reference(self, record: Record) -> str:
        answer = record["answer"]
        if isinstance(answer, int) or str(answer).strip().isdigit():
            index = int(answer)
            return self.LETTERS[index] if 0 <= index < 4 else str(answer)
        return str(answer).strip().upper()

    def _block(self, record: Record, with_answer: bool) -> str:
        lines = [str(record["question"]).strip()]
        lines += [f"{letter}. {choice}" for letter, choice in zip(self.LETTERS, self.choices(record))]
        lines.append("Answer:" + (f" {self.reference(record)}" if with_answer else ""))
        return "\n".join(lines)

    def example(self, record: Record) -> Example:
        subject = self.subject(record)
        about = f" about {subject.replace('_', ' ')}" if subject else ""
        parts = [f"The following are multiple choice questions (with answers){about}."]
        if self.shots:
            exemplars = [r for r in self.dev_by_subject.get(subject, []) if r is not record][: self.shots]
            parts += [self._block(r, True) for r in exemplars]
        parts.append(self._block(record, False))
        return Example("\n\n".join(parts), self.reference(record))

    def extract(self, prediction: str) -> str | None:
        return extract_choice_letter(prediction, self.LETTERS)

    def score(self, prediction: str, record: Record) -> float:
        return float(self.extract(prediction) == self.reference(record))

    def candidates(self, record: Record) -> list[str]:
        return list(self.LETTERS)


SST2_LABEL_WORDS = {"0": "negative", "1": "positive"}
SST2_INSTRUCTION = "Classify the sentiment of the sentence. Answer with one word: negative or positive."


def _label_sort_key(value: str) -> tuple[int, float | str]:
    """Integers in numeric order ("2" before "10"), then everything else alphabetically."""
    try:
        return (0, int(value))
    except ValueError:
        return (1, value)


class ClassificationTask(Task):
    """Text classification: text -> the label word of ``label``.

    ``label_words`` maps label values (compared as strings) to the words the model should say. Without
    it the label set is inferred from the training records (``fit_labels``): the sorted distinct values,
    each label's word its value lower-cased. A label outside the set is an error naming the value.
    ``text_field`` names the text column(s) (default ``sentence``, else ``text``); several names make a
    sentence-pair task. ``instruction`` is what a generating model is told (default: a neutral
    "Classify the text..." naming the label words). A classification head (``model.head=classification``)
    reads the text alone, unless ``head_instruction`` is true."""

    name = "classification"
    DEFAULT_TEXT_FIELDS: ClassVar[tuple[str, ...]] = ("sentence", "text")

    def __init__(self, label_words: Mapping[Any, str] | None = None, text_field: str | Sequence[str] | None = None,
                 label_field: str = "label", instruction: str | None = None, head_instruction: bool = False) -> None:
        self.label_words: dict[str, str] | None = None
        self.inferred = label_words is None
        if label_words is not None:
            self._set_label_words({str(k).strip(): str(v) for k, v in label_words.items()})
        if text_field is None:
            self.text_fields: list[str] | None = None  # the first of DEFAULT_TEXT_FIELDS a record has
        else:
            self.text_fields = [text_field] if isinstance(text_field, str) else list(text_field)
            if not self.text_fields:
                raise DataError("classification task needs at least one text_field")
        self.label_field = label_field
        self._instruction = instruction
        self.head_instruction = bool(head_instruction)

    def _set_label_words(self, label_words: dict[str, str]) -> None:
        if len(set(label_words.values())) != len(label_words):
            raise DataError(f"label_words must map each label to a different word, got {label_words}")
        self.label_words = label_words

    @property
    def instruction(self) -> str:
        if self._instruction:
            return self._instruction
        return f"Classify the text. Answer with one word: {' or '.join(self._words().values())}."

    def _words(self) -> dict[str, str]:
        if self.label_words is None:
            raise DataError(f"classification task: the label set is not known yet; give data.task_options.label_words "
                            f"or let it be inferred from the training records (field {self.label_field!r})")
        return self.label_words

    def fit_labels(self, records: Sequence[Record], origin: str = "<records>") -> dict[str, str]:
        """Infer the label set from (training) records unless ``label_words`` was given; return it."""
        if self.label_words is not None:
            return self.label_words
        missing = next((i for i, r in enumerate(records) if r.get(self.label_field) is None), None)
        if missing is not None:
            raise DataError(f"{origin}: record {missing} has no field {self.label_field!r} to read its label from "
                            f"(it has {sorted(records[missing])}); map a column to it with data.columns or set "
                            f"data.task_options.label_field")
        values = sorted({self.label_of(r) for r in records}, key=_label_sort_key)
        if len(values) < 2:
            raise DataError(f"{origin}: field {self.label_field!r} has only the value(s) {values}; classification needs "
                            f"at least two labels in the training data")
        words = {value: value.lower() for value in values}
        if len(set(words.values())) != len(words):
            raise DataError(f"{origin}: labels {values} differ only in case; give data.task_options.label_words")
        self._set_label_words(words)
        return words

    def validate(self, records: Sequence[Record], origin: str = "<records>") -> None:
        if self.label_words is None and records:
            self.fit_labels(records, origin)
        super().validate(records, origin)

    def _fields_of(self, record: Record) -> list[str]:
        if self.text_fields is not None:
            return self.text_fields
        found = next((f for f in self.DEFAULT_TEXT_FIELDS if record.get(f) is not None), None)
        return [found] if found else [self.DEFAULT_TEXT_FIELDS[0]]

    @property
    def fields(self) -> tuple[tuple[str, ...], ...]:  # type: ignore[override]
        texts = ((self.DEFAULT_TEXT_FIELDS,) if self.text_fields is None else tuple((f,) for f in self.text_fields))
        return (*texts, (self.label_field,))

    def label_of(self, record: Record) -> str:
        value = record[self.label_field]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return str(value).strip()

    def labels(self) -> list[str]:
        """The label values, in label-set order."""
        return list(self._words())

    def _check_record(self, record: Record, index: int, origin: str) -> None:
        if self.label_of(record) not in self._words():
            raise DataError(f"{origin}: record {index}: {self.label_field} {record[self.label_field]!r} is not in the "
                            f"label set {self.labels()}")

    def text(self, record: Record) -> str:
        """The input text alone (sentence pairs one per line, each named)."""
        fields = self._fields_of(record)
        if len(fields) == 1:
            return str(record[fields[0]]).strip()
        return "\n".join(f"{f.replace('_', ' ').capitalize()}: {str(record[f]).strip()}" for f in fields)

    def example(self, record: Record) -> Example:
        label = self.label_of(record)
        words = self._words()
        if label not in words:
            raise DataError(f"{self.label_field} {record[self.label_field]!r} is not in the label set {self.labels()}")
        fields = self._fields_of(record)
        text = f"Sentence: {self.text(record)}" if len(fields) == 1 else self.text(record)
        return Example(self.instruction, words[label], text)

    def normalize(self, record: Record) -> Record:
        """As ``Task.normalize``, plus ``head_text``: what a classification head reads (the text alone, or
        with ``head_instruction`` the instruction and the text)."""
        out = super().normalize(record)
        out["head_text"] = f"{self.instruction}\n{out['input']}" if self.head_instruction else self.text(record)
        return out

    def extract(self, prediction: str) -> str | None:
        words = sorted(self._words().values(), key=len, reverse=True)
        match = re.search(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", prediction, flags=re.IGNORECASE)
        return match.group(1).lower() if match else None

    def score(self, prediction: str, record: Record) -> float:
        return float(self.extract(prediction) == self.reference(record).lower())

    def candidates(self, record: Record) -> list[str]:
        return list(self._words().values())


class SST2Task(ClassificationTask):
    """SST-2: ``sentence`` -> negative / positive (labels 0 / 1), with the sentiment instruction."""

    def __init__(self, label_words: Mapping[Any, str] | None = None, instruction: str | None = None, **options: Any) -> None:
        super().__init__(label_words=label_words or SST2_LABEL_WORDS, instruction=instruction or SST2_INSTRUCTION,
                         **options)


class MathTask(Task):
    """Math word problems in the LLM-Adapters format (AddSub, MultiArith, SingleEq, SVAMP, MAWPS: a
    number; AQuA, MathQA: an option letter A-E). Target: "The answer is <answer>.", preceded by the
    record's worked ``output`` when ``use_output`` allows: ``"consistent"`` (default) uses it only when
    its own final answer equals the gold ``answer`` (the LLM-Adapters test files hold model-written
    rationales, many of them wrong), ``"always"`` / ``"never"`` as named."""

    name = "math"
    fields = (("instruction",), ("answer",))

    def __init__(self, use_output: str = "consistent") -> None:
        if use_output not in ("consistent", "always", "never"):
            raise DataError(f"math task use_output must be consistent, always or never, got {use_output!r}")
        self.use_output = use_output

    @staticmethod
    def _is_letter(record: Record) -> bool:
        return bool(re.fullmatch(r"[A-Ea-e]", str(record["answer"]).strip()))

    def _check_record(self, record: Record, index: int, origin: str) -> None:
        if not self._is_letter(record) and parse_number(record["answer"]) is None:
            raise DataError(f"{origin}: record {index}: answer {record['answer']!r} is neither a number nor an option letter A-E")

    def example(self, record: Record) -> Example:
        output = _text(record, "output", default="").strip()
        plain = f"The answer is {self.reference(record)}."
        use = self.use_output == "always" or (self.use_output == "consistent" and self._correct(output, record))
        target = output if (use and output) else plain
        return Example(str(record["instruction"]).strip(), target, _text(record, "input", default="").strip())

    def answer(self, prediction: str, record: Record) -> str | float | None:
        if self._is_letter(record):
            return extract_choice_letter(prediction, "ABCDE")
        return extract_answer_number(prediction)

    def _correct(self, prediction: str, record: Record) -> bool:
        if self._is_letter(record):
            return self.answer(prediction, record) == self.reference(record)
        return numbers_equal(self.answer(prediction, record), float(self.reference(record)))

    def reference(self, record: Record) -> str:
        if self._is_letter(record):
            return str(record["answer"]).strip().upper()
        return _format_number(parse_number(record["answer"]))

    def score(self, prediction: str, record: Record) -> float:
        return float(self._correct(prediction, record))


TASK_TYPES: dict[str, type[Task]] = {
    "exact": ExactMatchTask,
    "instruction": InstructionTask,
    "alpaca": InstructionTask,
    "dolly": InstructionTask,
    "gsm8k": GSM8KTask,
    "commonsense": CommonsenseTask,
    "mmlu": MMLUTask,
    "classification": ClassificationTask,
    "sst2": SST2Task,
    "math": MathTask,
}


def infer_task_type(record: Record) -> str:
    """A task type from a record's fields (for files given without ``data.task``)."""
    keys = set(record)
    if {"question", "A", "B", "C", "D"} <= keys or ({"question", "choices", "answer"} <= keys):
        return "mmlu"
    if "question" in keys and "####" in str(record.get("answer", "")):
        return "gsm8k"
    if {"instruction", "answer"} <= keys:
        if "Answer format:" in str(record["instruction"]) or str(record["answer"]).strip().lower() in ("true", "false"):
            return "commonsense"
        return "math"
    if "label" in keys and keys & set(ClassificationTask.DEFAULT_TEXT_FIELDS):
        return "classification"
    if "instruction" in keys and ({"output", "response"} & keys):
        return "instruction"
    raise DataError(f"cannot tell the task type from the fields {sorted(keys)}; set data.task "
                    f"(one of {', '.join(TASK_TYPES)}) or map columns with data.columns")


def get_task(name: str, **options: Any) -> Task:
    """A task by type name (see ``TASK_TYPES``) with its options (e.g. ``shots=5, dev_records=...``)."""
    try:
        cls = TASK_TYPES[name]
    except KeyError:
        raise DataError(f"task type {name!r} is not known; valid: {', '.join(TASK_TYPES)}") from None
    try:
        return cls(**options)
    except TypeError as exc:
        raise DataError(f"task type {name!r}: bad options {sorted(options)} ({exc})") from None
