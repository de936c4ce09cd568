"""MT-Bench: two-turn answers from the model under test, graded 1-10 per turn by a judge.

The judge is any OpenAI-compatible chat-completions endpoint (OpenAI, a local vLLM, Ollama, llama.cpp
server...; URL, model and key from arguments or the environment) or a model loaded by fedpeft
(:class:`LocalModelJudge`). Grading follows FastChat's ``gen_judgment.py`` single-answer mode:

* turn 1 is graded with the ``single-v1`` prompt, turn 2 with ``single-v1-multi-turn`` (the whole
  conversation shown, the judge told to grade the second answer); questions of the categories
  ``math``, ``reasoning`` and ``coding`` that carry a reference answer use the ``single-math-v1``
  variants with the reference;
* the score is the number in ``[[x]]`` (falling back to ``[x]``), as FastChat parses it.

Nothing that can go wrong with a remote judge crashes the evaluation or becomes a silent zero:
timeouts, HTTP errors, malformed JSON, a reply with no message, a judgment without a score — each is
recorded as a :class:`Judgment` with ``score=None`` and an ``error`` saying what happened, and the
averages are over the scored answers only, reported together with the number of failures.

The judge prompts are FastChat's (lm-sys/FastChat, ``fastchat/llm_judge/data/judge_prompts.jsonl``,
Apache-2.0), copied here so that grading works without the data directory.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

NEED_REFERENCE_CATEGORIES = ("math", "reasoning", "coding")

_SINGLE_SYSTEM = "You are a helpful assistant."
_MULTI_TURN_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant "
    "to the user question displayed below. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of the response. You evaluation should focus "
    "on the assistant's answer to the second user question. Begin your evaluation by providing a short "
    "explanation. Be as objective as possible. After providing your explanation, you must rate the response on "
    "a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n"
)
_MULTI_TURN_MATH_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant "
    "to the user question. Your evaluation should consider correctness and helpfulness. You will be given a "
    "reference answer and the assistant's answer. You evaluation should focus on the assistant's answer to the "
    "second question. Begin your evaluation by comparing the assistant's answer with the reference answer. "
    "Identify and correct any mistakes. Be as objective as possible. After providing your explanation, you must "
    "rate the response on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for example: "
    "\"Rating: [[5]]\".\n\n"
)
_RATING_INSTRUCTION = (
    "After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly following "
    "this format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n"
)
_CONVERSATION = (
    "<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}\n\n### Assistant A:\n"
    "{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n"
    "<|The End of Assistant A's Conversation with User|>"
)
_REFERENCE_CONVERSATION = (
    "<|The Start of Reference Answer|>\n\n### User:\n{question_1}\n\n### Reference answer:\n{ref_answer_1}\n\n"
    "### User:\n{question_2}\n\n### Reference answer:\n{ref_answer_2}\n\n<|The End of Reference Answer|>\n\n\n"
)

JUDGE_PROMPTS: dict[str, dict[str, str]] = {
    "single-v1": {
        "system_prompt": _SINGLE_SYSTEM,
        "prompt_template": (
            "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by "
            "an AI assistant to the user question displayed below. Your evaluation should consider factors such as "
            "the helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. Begin "
            "your evaluation by providing a short explanation. Be as objective as possible. " + _RATING_INSTRUCTION
            + "[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
        ),
    },
    "single-math-v1": {
        "system_prompt": _SINGLE_SYSTEM,
        "prompt_template": (
            "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by "
            "an AI assistant to the user question displayed below. Your evaluation should consider correctness and "
            "helpfulness. You will be given a reference answer and the assistant's answer. Begin your evaluation by "
            "comparing the assistant's answer with the reference answer. Identify and correct any mistakes. Be as "
            "objective as possible. " + _RATING_INSTRUCTION + "[Question]\n{question}\n\n[The Start of Reference "
            "Answer]\n{ref_answer_1}\n[The End of Reference Answer]\n\n[The Start of Assistant's Answer]\n{answer}\n"
            "[The End of Assistant's Answer]"
        ),
    },
    "single-v1-multi-turn": {"system_prompt": _MULTI_TURN_SYSTEM, "prompt_template": _CONVERSATION},
    "single-math-v1-multi-turn": {
        "system_prompt": _MULTI_TURN_MATH_SYSTEM,
        "prompt_template": _REFERENCE_CONVERSATION + _CONVERSATION,
    },
}

_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def load_judge_prompts(path: str | Path | None = None) -> dict[str, dict[str, str]]:
    """FastChat's judge prompts from a ``judge_prompts.jsonl`` file, or the built-in copy."""
    if path is None:
        return dict(JUDGE_PROMPTS)
    prompts = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            prompts[row["name"]] = {"system_prompt": row["system_prompt"], "prompt_template": row["prompt_template"]}
    return prompts


def parse_score(judgment: str) -> float | None:
    """The rating in ``[[x]]`` (else ``[x]``), as FastChat; ``None`` when the judgment names none."""
    match = _SCORE.search(judgment) or _SCORE_BACKUP.search(judgment)
    return float(match.group(1)) if match else None


# --------------------------------------------------------------------------------------------------
# Chat clients


@dataclass
class ChatReply:
    text: str | None
    error: str | None = None
    seconds: float = 0.0
    attempts: int = 1


@dataclass
class JudgeSettings:
    """Where the judge lives. ``from_env`` reads ``FEDPEFT_JUDGE_URL`` (else ``OPENAI_BASE_URL``),
    ``FEDPEFT_JUDGE_MODEL`` and ``FEDPEFT_JUDGE_API_KEY`` (else ``OPENAI_API_KEY``)."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 120.0
    max_retries: int = 2
    temperature: float = 0.0
    max_tokens: int = 2048
    concurrency: int = 4

    @classmethod
    def from_env(cls, base_url: str | None = None, model: str | None = None, api_key: str | None = None,
                 **overrides) -> JudgeSettings | None:
        """Settings from arguments, falling back to the environment; ``None`` when no URL or model is known."""
        base_url = base_url or os.environ.get("FEDPEFT_JUDGE_URL") or os.environ.get("OPENAI_BASE_URL")
        model = model or os.environ.get("FEDPEFT_JUDGE_MODEL")
        api_key = api_key or os.environ.get("FEDPEFT_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        if not base_url or not model:
            return None
        return cls(base_url=base_url, model=model, api_key=api_key,
                   **{k: v for k, v in overrides.items() if v is not None})


class OpenAIChatClient:
    """A minimal chat-completions client over ``urllib`` (no extra dependency).

    ``base_url`` is the API root, e.g. ``http://localhost:8000/v1`` (``/chat/completions`` is appended
    unless already there). Timeouts, connection errors, 429 and 5xx are retried ``max_retries`` times with
    a short backoff; every failure ends as a :class:`ChatReply` with ``text=None`` and an ``error``.
    """

    def __init__(self, settings: JudgeSettings):
        self.settings = settings
        url = settings.base_url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"

    def _request(self, messages: list[dict]) -> tuple[str | None, str | None, bool]:
        """(text, error, retryable)."""
        body = json.dumps({"model": self.settings.model, "messages": messages, "temperature": self.settings.temperature,
                           "max_tokens": self.settings.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode("utf-8", "replace") if exc.fp else ""
            return None, f"HTTP {exc.code} from judge: {detail}".strip(), exc.code == 429 or exc.code >= 500
        except (TimeoutError, socket.timeout):
            return None, f"judge timed out after {self.settings.timeout:g} s", True
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                return None, f"judge timed out after {self.settings.timeout:g} s", True
            return None, f"cannot reach judge at {self.url}: {exc.reason}", True
        except (ConnectionError, OSError) as exc:
            return None, f"connection to judge failed: {exc}", True
        try:
            payload = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, f"malformed JSON from judge: {raw[:200]!r}", False
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            if isinstance(payload, dict) and "error" in payload:
                return None, f"judge returned an error: {str(payload['error'])[:200]}", False
            return None, f"judge reply has no choices[0].message.content: {str(payload)[:200]}", False
        if not isinstance(content, str) or not content.strip():
            return None, "judge reply content is empty", False
        return content, None, False

    def complete(self, messages: list[dict]) -> ChatReply:
        start = time.perf_counter()
        error = None
        for attempt in range(1, self.settings.max_retries + 2):
            text, error, retryable = self._request(messages)
            if text is not None:
                return ChatReply(text=text, seconds=time.perf_counter() - start, attempts=attempt)
            if not retryable or attempt > self.settings.max_retries:
                return ChatReply(text=None, error=error, seconds=time.perf_counter() - start, attempts=attempt)
            time.sleep(min(0.5 * 2 ** (attempt - 1), 4.0))
        return ChatReply(text=None, error=error, seconds=time.perf_counter() - start)  # pragma: no cover


class LocalModelJudge:
    """A judge that is a model loaded by fedpeft (greedy, through the tokenizer's chat template)."""

    concurrency = 1

    def __init__(self, model, tokenizer, max_new_tokens: int = 512):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens

    def complete(self, messages: list[dict]) -> ChatReply:
        from fedpeft.evaluation.generation import generate

        start = time.perf_counter()
        try:
            prompt = chat_prompt(self.tokenizer, messages)
            text = generate(self.model, self.tokenizer, [prompt], max_new_tokens=self.max_new_tokens, batch_size=1)[0]
        except Exception as exc:  # noqa: BLE001 - a judge failure is recorded, never raised
            return ChatReply(text=None, error=f"local judge failed: {exc!r}", seconds=time.perf_counter() - start)
        return ChatReply(text=text, seconds=time.perf_counter() - start)


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The generation prompt for a conversation: the tokenizer's chat template, else a plain transcript."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = [f"### {m['role'].capitalize()}:\n{m['content']}\n" for m in messages]
    return "\n".join(lines) + "\n### Assistant:\n"


# --------------------------------------------------------------------------------------------------
# MT-Bench


@dataclass
class Judgment:
    question_id: int | str
    category: str
    turn: int  # 1 or 2
    prompt_name: str
    score: float | None
    error: str | None = None
    judgment: str | None = None
    seconds: float = 0.0


@dataclass
class MTBenchResult:
    judgments: list[Judgment]
    answers: dict = field(default_factory=dict)  # question_id -> [answer turn 1, answer turn 2]
    generation_seconds: float = 0.0
    judge_seconds: float = 0.0

    def summary(self) -> dict:
        """Mean score per turn and overall over scored judgments, with the failure count (never a fake 0)."""
        def mean(values):
            return sum(values) / len(values) if values else None

        scored = [j for j in self.judgments if j.score is not None]
        out = {
            "score_turn1": mean([j.score for j in scored if j.turn == 1]),
            "score_turn2": mean([j.score for j in scored if j.turn == 2]),
            "score": mean([j.score for j in scored]),
            "judged": float(len(scored)),
            "judge_failures": float(len(self.judgments) - len(scored)),
        }
        for category in sorted({j.category for j in scored}):
            out[f"score_{category}"] = mean([j.score for j in scored if j.category == category])
        return out

    def failures(self) -> list[dict]:
        return [asdict(j) for j in self.judgments if j.score is None]


def load_mt_bench_questions(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "question.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _reference(question: dict) -> list[str] | None:
    reference = question.get("reference")
    if isinstance(reference, str):
        return [reference]
    return list(reference) if reference else None


def judge_messages(question: dict, answers: Sequence[str], turn: int,
                   prompts: dict[str, dict[str, str]] | None = None) -> tuple[str, list[dict]]:
    """(prompt name, chat messages) grading ``answers[turn - 1]`` as FastChat's single-answer mode does."""
    prompts = prompts or JUDGE_PROMPTS
    reference = _reference(question) if question.get("category") in NEED_REFERENCE_CATEGORIES else None
    turns = question["turns"]
    if turn == 1:
        name = "single-math-v1" if reference else "single-v1"
        fields = {"question": turns[0], "answer": answers[0]}
        if reference:
            fields["ref_answer_1"] = reference[0]
    else:
        name = "single-math-v1-multi-turn" if reference else "single-v1-multi-turn"
        fields = {"question_1": turns[0], "question_2": turns[1], "answer_1": answers[0], "answer_2": answers[1]}
        if reference:
            fields["ref_answer_1"] = reference[0]
            fields["ref_answer_2"] = reference[1] if len(reference) > 1 else ""
    prompt = prompts[name]
    user = prompt["prompt_template"].format(**fields)
    return name, [{"role": "system", "content": prompt["system_prompt"]}, {"role": "user", "content": user}]


def judge_answers(questions: Sequence[dict], answers: dict, judge,
                  prompts: dict[str, dict[str, str]] | None = None) -> list[Judgment]:
    """Grade every turn of every answered question; failures are recorded, never raised."""
    jobs = []
    for question in questions:
        qid = question["question_id"]
        for turn in range(1, min(len(question["turns"]), len(answers[qid])) + 1):
            jobs.append((question, turn))

    def grade(job) -> Judgment:
        question, turn = job
        qid, category = question["question_id"], question.get("category", "")
        try:
            name, messages = judge_messages(question, answers[qid], turn, prompts)
        except (KeyError, IndexError) as exc:
            return Judgment(qid, category, turn, "", None, error=f"cannot build judge prompt: {exc!r}")
        try:
            reply = judge.complete(messages)
        except Exception as exc:  # noqa: BLE001 - whatever a judge object raises is recorded
            return Judgment(qid, category, turn, name, None, error=f"judge raised {exc!r}")
        if reply.text is None:
            return Judgment(qid, category, turn, name, None, error=reply.error, seconds=reply.seconds)
        score = parse_score(reply.text)
        error = None if score is not None else "judge reply has no [[rating]]"
        return Judgment(qid, category, turn, name, score, error=error, judgment=reply.text, seconds=reply.seconds)

    workers = max(1, int(getattr(getattr(judge, "settings", None), "concurrency", getattr(judge, "concurrency", 1))))
    if workers == 1 or len(jobs) <= 1:
        return [grade(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(grade, jobs))


def generate_mt_bench_answers(model, tokenizer, questions: Sequence[dict], max_new_tokens: int = 512,
                              batch_size: int = 8, system_prompt: str | None = None) -> dict:
    """Two-turn answers: all first turns in batches, then all second turns with the first answer in context."""
    from fedpeft.evaluation.generation import generate

    base = [{"role": "system", "content": system_prompt}] if system_prompt else []
    first_prompts = [chat_prompt(tokenizer, base + [{"role": "user", "content": q["turns"][0]}]) for q in questions]
    first = generate(model, tokenizer, first_prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    answers = {q["question_id"]: [a.strip()] for q, a in zip(questions, first)}
    two_turn = [q for q in questions if len(q["turns"]) > 1]
    second_prompts = [
        chat_prompt(tokenizer, base + [
            {"role": "user", "content": q["turns"][0]},
            {"role": "assistant", "content": answers[q["question_id"]][0]},
            {"role": "user", "content": q["turns"][1]},
        ])
        for q in two_turn
    ]
    second = generate(model, tokenizer, second_prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    for q, a in zip(two_turn, second):
        answers[q["question_id"]].append(a.strip())
    return answers


def run_mt_bench(model, tokenizer, questions: Sequence[dict], judge=None, max_new_tokens: int = 512,
                 batch_size: int = 8, limit: int | None = None,
                 prompts: dict[str, dict[str, str]] | None = None) -> MTBenchResult:
    """Generate two-turn answers and, when a judge is given, grade them. Without a judge the answers are
    kept and every turn is recorded as unjudged (``error='no judge configured'``)."""
    questions = list(questions)[:limit] if limit else list(questions)
    start = time.perf_counter()
    answers = generate_mt_bench_answers(model, tokenizer, questions, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size)
    generation_seconds = time.perf_counter() - start
    start = time.perf_counter()
    if judge is None:
        judgments = [Judgment(q["question_id"], q.get("category", ""), turn, "", None, error="no judge configured")
                     for q in questions for turn in range(1, len(answers[q["question_id"]]) + 1)]
    else:
        judgments = judge_answers(questions, answers, judge, prompts)
    return MTBenchResult(judgments=judgments, answers=answers, generation_seconds=generation_seconds,
                         judge_seconds=time.perf_counter() - start)
