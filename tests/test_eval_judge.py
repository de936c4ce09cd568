"""The MT-Bench judge client against a local HTTP server speaking OpenAI chat-completions.

The server's behaviour is chosen by the ``model`` of the request, so one server covers a good judge, a
judge that answers malformed JSON, one without a score, one with an error object, an HTTP 500 that
recovers on retry, and one too slow for the client's timeout.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from fedpeft.evaluation.judge import (JUDGE_PROMPTS, JudgeSettings, Judgment, MTBenchResult, OpenAIChatClient,
                                      judge_answers, judge_messages, parse_score, run_mt_bench)

torch.set_num_threads(1)

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it rhyme."]},
    {"question_id": 111, "category": "math", "turns": ["What is 2+3?", "And times 4?"], "reference": ["5", "20"]},
]
ANSWERS = {81: ["Rain taps on the roof", "Rain falls, the drain calls"], 111: ["5", "20"]}


class _Handler(BaseHTTPRequestHandler):
    calls: dict[str, int] = {}
    requests: list[dict] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        payload["_path"] = self.path
        payload["_auth"] = self.headers.get("Authorization")
        _Handler.requests.append(payload)
        mode = payload["model"]
        _Handler.calls[mode] = _Handler.calls.get(mode, 0) + 1

        def reply(content):
            return json.dumps({"id": "x", "object": "chat.completion", "model": mode,
                               "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                            "finish_reason": "stop"}]}).encode()

        if mode == "good":
            text = payload["messages"][-1]["content"]
            score = 3 if "Reference" in text else 8  # math questions get another score
            self._send(200, reply(f"The answer is helpful and concise. Rating: [[{score}]]"))
        elif mode == "backup":
            self._send(200, reply("Decent answer. Rating: [6.5]"))
        elif mode == "malformed":
            self._send(200, b'{"choices": [{"message": {"content": "Rating: [[9]]"')
        elif mode == "noscore":
            self._send(200, reply("I think the assistant did a fine job overall."))
        elif mode == "error_object":
            self._send(200, json.dumps({"error": {"message": "model overloaded"}}).encode())
        elif mode == "flaky":  # first call fails with 500, then answers
            if _Handler.calls[mode] == 1:
                self._send(500, b'{"error": "internal"}')
            else:
                self._send(200, reply("Rating: [[4]]"))
        elif mode == "bad_request":
            self._send(400, b'{"error": "unknown model"}')
        elif mode == "slow":
            time.sleep(1.5)
            self._send(200, reply("Rating: [[10]]"))
        else:
            self._send(404, b"{}")


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def client(url: str, model: str, **kw) -> OpenAIChatClient:
    kw.setdefault("timeout", 5.0)
    kw.setdefault("max_retries", 0)
    return OpenAIChatClient(JudgeSettings(base_url=url, model=model, **kw))


def test_parse_score_like_fastchat():
    assert parse_score("Explanation... Rating: [[7]]") == 7.0
    assert parse_score("Rating: [[8.5]]") == 8.5
    assert parse_score("Rating: [6]") == 6.0  # FastChat's backup pattern
    assert parse_score("Rating: 7/10") is None
    assert parse_score("") is None


def test_good_reply_with_key_and_path(server):
    reply = client(server, "good", api_key="sk-test").complete([{"role": "user", "content": "hi"}])
    assert reply.error is None and parse_score(reply.text) == 8.0
    last = _Handler.requests[-1]
    assert last["_path"] == "/v1/chat/completions"
    assert last["_auth"] == "Bearer sk-test"
    assert last["temperature"] == 0.0 and last["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("mode,fragment", [
    ("malformed", "malformed JSON"),
    ("error_object", "model overloaded"),
    ("bad_request", "HTTP 400"),
])
def test_failures_become_recorded_errors(server, mode, fragment):
    reply = client(server, mode).complete([{"role": "user", "content": "hi"}])
    assert reply.text is None and fragment in reply.error


def test_timeout_is_a_recorded_failure(server):
    start = time.perf_counter()
    reply = client(server, "slow", timeout=0.3).complete([{"role": "user", "content": "hi"}])
    assert reply.text is None and "timed out" in reply.error
    assert time.perf_counter() - start < 1.4


def test_server_error_is_retried(server):
    reply = client(server, "flaky", max_retries=2).complete([{"role": "user", "content": "hi"}])
    assert reply.text == "Rating: [[4]]" and reply.attempts == 2


def test_unreachable_judge(server):
    reply = client("http://127.0.0.1:9/v1", "good", timeout=1.0).complete([{"role": "user", "content": "x"}])
    assert reply.text is None and reply.error


def test_judge_prompts_follow_fastchat():
    name, messages = judge_messages(QUESTIONS[0], ANSWERS[81], turn=1)
    assert name == "single-v1"
    assert messages[0] == {"role": "system", "content": JUDGE_PROMPTS["single-v1"]["system_prompt"]}
    assert "[Question]\nWrite a haiku about rain." in messages[1]["content"]
    assert "Rain taps on the roof" in messages[1]["content"]
    name, messages = judge_messages(QUESTIONS[0], ANSWERS[81], turn=2)
    assert name == "single-v1-multi-turn"
    assert "### User:\nNow make it rhyme." in messages[1]["content"]
    assert "second user question" in messages[0]["content"]
    name, messages = judge_messages(QUESTIONS[1], ANSWERS[111], turn=1)
    assert name == "single-math-v1" and "[The Start of Reference Answer]\n5\n" in messages[1]["content"]
    name, messages = judge_messages(QUESTIONS[1], ANSWERS[111], turn=2)
    assert name == "single-math-v1-multi-turn" and "### Reference answer:\n20" in messages[1]["content"]


def test_judge_answers_scores_and_summary(server):
    judgments = judge_answers(QUESTIONS, ANSWERS, client(server, "good", concurrency=3))
    assert [(j.question_id, j.turn, j.score) for j in judgments] == [(81, 1, 8.0), (81, 2, 8.0), (111, 1, 3.0), (111, 2, 3.0)]
    summary = MTBenchResult(judgments).summary()
    assert summary["score"] == pytest.approx(5.5)
    assert summary["score_turn1"] == pytest.approx(5.5) and summary["judge_failures"] == 0
    assert summary["score_math"] == 3.0 and summary["score_writing"] == 8.0


@pytest.mark.parametrize("mode,fragment", [
    ("malformed", "malformed JSON"),
    ("noscore", "no [[rating]]"),
    ("error_object", "error"),
])
def test_judge_failures_are_recorded_not_zero(server, mode, fragment):
    judgments = judge_answers(QUESTIONS, ANSWERS, client(server, mode))
    assert len(judgments) == 4 and all(j.score is None and fragment in j.error for j in judgments)
    summary = MTBenchResult(judgments).summary()
    assert summary["score"] is None  # not a silent 0
    assert summary["judge_failures"] == 4 and summary["judged"] == 0
    if mode == "noscore":
        assert judgments[0].judgment.startswith("I think")  # the raw reply is kept


def test_backup_score_pattern_and_mixed_failures(server):
    judgments = judge_answers(QUESTIONS, ANSWERS, client(server, "backup"))
    assert all(j.score == 6.5 for j in judgments)
    mixed = MTBenchResult([Judgment(1, "writing", 1, "single-v1", 9.0),
                           Judgment(1, "writing", 2, "single-v1-multi-turn", None, error="judge timed out after 1 s")])
    summary = mixed.summary()
    assert summary["score"] == 9.0 and summary["score_turn2"] is None and summary["judge_failures"] == 1
    assert mixed.failures()[0]["error"].startswith("judge timed out")


def test_a_judge_that_raises_is_recorded():
    class Broken:
        def complete(self, messages):
            raise RuntimeError("boom")

    judgments = judge_answers(QUESTIONS[:1], ANSWERS, Broken())
    assert all(j.score is None and "boom" in j.error for j in judgments)


def test_settings_from_env(monkeypatch):
    for name in ("FEDPEFT_JUDGE_URL", "OPENAI_BASE_URL", "FEDPEFT_JUDGE_MODEL", "FEDPEFT_JUDGE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert JudgeSettings.from_env() is None
    monkeypatch.setenv("FEDPEFT_JUDGE_URL", "http://localhost:11434/v1")
    monkeypatch.setenv("FEDPEFT_JUDGE_MODEL", "llama3")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    settings = JudgeSettings.from_env(timeout=10.0)
    assert (settings.base_url, settings.model, settings.api_key, settings.timeout) == (
        "http://localhost:11434/v1", "llama3", "sk-env", 10.0)
    assert JudgeSettings.from_env(model="other").model == "other"


def test_run_mt_bench_end_to_end_with_tiny_model(server):
    from fedpeft.models.registry import tiny_llama

    model, tokenizer = tiny_llama(seed=0)
    result = run_mt_bench(model, tokenizer, QUESTIONS, judge=client(server, "good"), max_new_tokens=3, batch_size=2)
    assert set(result.answers) == {81, 111} and all(len(a) == 2 for a in result.answers.values())
    assert len(result.judgments) == 4 and result.summary()["judged"] == 4
    # without a judge: answers kept, every turn recorded as unjudged
    unjudged = run_mt_bench(model, tokenizer, QUESTIONS, judge=None, max_new_tokens=2, limit=1)
    assert len(unjudged.judgments) == 2 and all(j.error == "no judge configured" for j in unjudged.judgments)
    assert unjudged.summary()["score"] is None
