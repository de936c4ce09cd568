"""Optional bridge to lm-evaluation-harness (EleutherAI ``lm-eval``): any of its tasks on our model + adapter.

For users who have ``lm-eval`` installed (``pip install lm-eval``) and internet for its datasets. The model
already in memory (base model, with its PEFT adapter applied) is handed to lm-eval's ``HFLM`` wrapper, so
whatever fedpeft trained is what lm-eval scores; nothing is re-loaded from the hub.

In ``fedpeft eval`` a suite entry ``lm_eval:<task>`` (e.g. ``--suite lm_eval:hellaswag,lm_eval:arc_easy``)
runs through here; without ``lm-eval`` installed such a task is reported as skipped with the install hint.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Sequence

INSTALL_HINT = "lm-evaluation-harness is not installed: pip install lm-eval (its tasks also need internet)"


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def _clean_metrics(task_results: dict) -> dict[str, float | None]:
    """lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": 0.01, "alias": ...}`` -> ``{"acc": 0.5, "acc_stderr": 0.01}``."""
    out: dict[str, float | None] = {}
    for key, value in task_results.items():
        if key == "alias" or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        name, _, filter_name = key.partition(",")
        out[name if filter_name in ("", "none") else f"{name}[{filter_name}]"] = float(value)
    return out


def run_lm_eval(model, tokenizer, tasks: Sequence[str], limit: int | None = None, batch_size: int = 8,
                num_fewshot: int | None = None, max_length: int | None = None) -> dict[str, dict]:
    """``{task: {"metrics": {...}, "examples": n, "seconds": s}}`` from ``lm_eval.simple_evaluate``.

    Raises ``ImportError`` with the install hint when lm-eval is missing.
    """
    if not lm_eval_available():
        raise ImportError(INSTALL_HINT)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    kwargs = {"pretrained": model, "tokenizer": tokenizer, "batch_size": batch_size}
    if max_length:
        kwargs["max_length"] = max_length
    wrapper = HFLM(**kwargs)
    start = time.perf_counter()
    output = lm_eval.simple_evaluate(model=wrapper, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot)
    seconds = time.perf_counter() - start
    samples = (output or {}).get("n-samples", {})
    results = {}
    for task, task_results in (output or {}).get("results", {}).items():
        count = samples.get(task, {})
        examples = count.get("effective", count.get("original", 0)) if isinstance(count, dict) else 0
        results[task] = {"metrics": _clean_metrics(task_results), "examples": int(examples or 0),
                         "seconds": seconds / max(1, len(tasks))}
    return results
