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
- ``mmlu``: question + 4 options -> letter, optional k-shot exemplars from the dev set of the same subject.
- ``classification``: text -> label word (the label set given, or inferred from the training records);
  scored on the first label word said. ``sst2``: the same with SST-2's negative/positive words.
- ``math``: math word problems (LLM-Adapters format; number or option letter answers).

Every task validates its records up front (``task.validate(records, origin)``): a missing field or a
label outside the label set is a ``DataError`` naming the file, the record and the value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from fedpeft.data.sources import DataError, Record


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


# ------------------------------------------------------------------------------------ answer helpers
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _clean_numbers(text: str) -> str:
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)  # thousands separators: 1,000 -> 1000
    return text.replace("$", "")


def parse_number(text: Any) -> float | None:
    """A float from a gold answer such as ``"72"``, ``"8.0"``, ``"1,000"``, ``"$5"``; None if none."""
    match = _NUMBER.search(_clean_numbers(str(text)))
    return float(match.group()) if match else None


def extract_number(prediction: str) -> float | None:
    """The answer number of a generation: after the last ``####``, else after the last "answer is",
    else the last number in the text (LLM-Adapters' rule)."""
    text = _clean_numbers(prediction)
    for marker in ("####", "answer is"):
        position = text.lower().rfind(marker)
        if position >= 0:
            match = _NUMBER.search(text[position + len(marker):])
            if match:
                return float(match.group())
    numbers = _NUMBER.findall(text)
    return float(numbers[-1]) if numbers else None


def numbers_equal(a: float | None, b: float | None, tolerance: float = 1e-3) -> bool:
    """Equal within an absolute ``tolerance`` (LLM-Adapters uses 0.001); None never equals."""
    return a is not None and b is not None and abs(a - b) <= tolerance


def extract_letter(prediction: str, letters: str = "ABCD") -> str | None:
    """The option letter of a generation: "answer is (C)" / "answer: C", else a leading "C" / "(C)",
    else the first standalone letter."""
    cls = f"[{letters}]"
    for pattern in (rf"(?i:answer)\s*(?:(?i:is)|:)?\s*[:\-]?\s*\(?({cls})\b", rf"^\s*\(?({cls})(?:\)|\.|:|\b)",
                    rf"\(({cls})\)", rf"\b({cls})\b"):
        match = re.search(pattern, prediction)
        if match:
            return match.group(1)
    return None


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


class InstructionTask(Task):
    """Alpaca / Dolly style: instruction + optional input (``input`` or ``context``) -> ``output`` or
    ``response``."""

    name = "instruction"
    fields = (("instruction",), ("output", "response"))

    def __init__(self, metric: str = "rougeL") -> None:
        if metric not in ("rougeL", "exact"):
            raise DataError(f"instruction task metric must be 'rougeL' or 'exact', got {metric!r}")
        self.metric = metric

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
    annotations ``<<48/2=24>>`` are removed from the target unless ``keep_calculator``."""

    name = "gsm8k"
    fields = (("question", "instruction"), ("answer", "output"))

    def __init__(self, keep_calculator: bool = False) -> None:
        self.keep_calculator = keep_calculator

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
        return extract_number(prediction)

    def score(self, prediction: str, record: Record) -> float:
        return float(numbers_equal(self.extract(prediction), float(self.reference(record))))


def _format_number(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


_OPTION_PREFIXES = {"solution": 2, "answer": 5, "option": 2, "ending": 4}


class CommonsenseTask(Task):
    """LLM-Adapters commonsense format ``{instruction, input, output, answer}``; ``answer`` is an option
    word (``true``/``false``, ``solution1``, ``answer3``, ``option2``, ``ending4``). The options are read
    from the instruction's "Answer format: a/b/c" line (else from the answer's prefix). Scoring takes the
    first option word in the generation, like LLM-Adapters' evaluation."""

    name = "commonsense"
    fields = (("instruction",), ("answer",))

    def options(self, record: Record) -> list[str]:
        match = re.search(r"Answer format:\s*([\w/ ]+)", str(record.get("instruction", "")))
        if match:
            return [o.strip().lower() for o in match.group(1).split("/") if o.strip()]
        answer = str(record.get("answer", "")).strip().lower()
        if answer in ("true", "false"):
            return ["true", "false"]
        prefix = re.sub(r"\d+$", "", answer)
        return [f"{prefix}{i}" for i in range(1, _OPTION_PREFIXES.get(prefix, 5) + 1)]

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
        pattern = r"\b(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")\b"
        match = re.search(pattern, prediction.lower())
        return match.group(1) if match else None

    def score(self, prediction: str, record: Record) -> float:
        return float(self.extract(prediction, self.options(record)) == self.reference(record))

    def candidates(self, record: Record) -> list[str]:
        target = self.target(record)
        gold = self.reference(record)
        stem = target[: target.lower().rfind(gold)] if gold in target.lower() else "the correct answer is "
        return [f"{stem}{option}" for option in self.options(record)]

    def gold_index(self, record: Record) -> int:
        return self.options(record).index(self.reference(record))


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
        return extract_letter(prediction, self.LETTERS)

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

    def _correct(self, prediction: str, record: Record) -> bool:
        if self._is_letter(record):
            return extract_letter(prediction, "ABCDE") == self.reference(record)
        return numbers_equal(extract_number(prediction), float(self.reference(record)))

    def reference(self, record: Record) -> str:
        if self._is_letter(record):
            return str(record["answer"]).strip().upper()
        return _format_number(parse_number(record["answer"]))

    def score(self, prediction: str, record: Record) -> float:
        return float(self._correct(prediction, record))


TASK_TYPES: dict[str, type[Task]] = {
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
