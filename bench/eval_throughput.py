"""Multiple-choice evaluation speed: examples/s per suite task, the evaluator before this change ("old",
``fedpeft/evaluation/loglik.py`` at commit OLD_COMMIT, read from git) against the current one ("new"),
on the same items, model and thread count, in one run. Also checks that both pick the same answers.

    python bench/eval_throughput.py --limit 60 --threads 1          # SmolLM2-135M (the 135M shape), CPU

Data: ``--data-dir``, ``$FEDPEFT_DATA_DIR`` or ../shared/data (the MMLU validation split and the
LLM-Adapters commonsense test sets); a task without data is skipped. Limits are seeded stratified samples
(every MMLU subject present). On a GPU pass ``--device cuda --dtype bfloat16`` (not verified on a GPU here).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedpeft.data.benchmarks import BenchmarkDataMissing
from fedpeft.evaluation import loglik
from fedpeft.evaluation.suites import TASKS, EvalOptions, _mc_items, suite_records, suite_task
from fedpeft.models.registry import load_base_model

OLD_COMMIT = "67fce2a"
REPO = Path(__file__).resolve().parents[1]
# (label, task, split, mc_format, MMLU shots)
CASES = [
    ("mmlu val 0-shot", "mmlu", "validation", "label", 0),
    ("mmlu val 5-shot", "mmlu", "validation", "label", 5),
    ("boolq (label)", "boolq", "test", "label", 0),
    ("ARC-Easy (label)", "ARC-Easy", "test", "label", 0),
    ("piqa (text)", "piqa", "test", "text", 0),
    ("ARC-Challenge (text)", "ARC-Challenge", "test", "text", 0),
    ("winogrande (text)", "winogrande", "test", "text", 0),
]


def old_loglik():
    """The evaluator module as it was at OLD_COMMIT (None outside a git checkout)."""
    try:
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{OLD_COMMIT}:src/fedpeft/evaluation/loglik.py"],
                                check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "loglik_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("loglik_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["loglik_old"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def timed(module, model, tokenizer, items, batch_size):
    start = time.perf_counter()
    result = module.evaluate_multiple_choice(model, tokenizer, items, batch_size=batch_size, keep_records=True)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--template", default="chat")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cases", default=None, help="comma-separated labels' first words (e.g. mmlu,boolq)")
    parser.add_argument("--subject", default=None,
                        help="MMLU: only this subject's questions (k-shot exemplars are shared within a subject)")
    parser.add_argument("--old-batch-size", type=int, default=None,
                        help="batch size of the old evaluator (default --batch-size; 1 was its fastest on a CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    old = old_loglik()
    loaded = load_base_model(args.model, dtype=args.dtype)
    model, tokenizer = loaded.model.to(args.device), loaded.tokenizer
    print(f"model {loaded.source}, device {args.device}, dtype {args.dtype}, threads {args.threads}, "
          f"batch {args.batch_size} (old: {args.old_batch_size or args.batch_size}), limit {args.limit}"
          f"{', subject ' + args.subject if args.subject else ''}, old evaluator: {OLD_COMMIT if old else 'unavailable'}",
          flush=True)
    print("| task | n | old ex/s | new ex/s | new/old | acc old | acc new | same picks |")
    print("|---|---|---|---|---|---|---|---|")
    wanted = args.cases.split(",") if args.cases else None
    for label, name, split, mc_format, shots in CASES:
        if wanted and label.split()[0] not in wanted:
            continue
        options = EvalOptions(data_dir=args.data_dir, limit=args.limit, template=args.template, mc_format=mc_format,
                              num_fewshot=shots)
        spec = TASKS[name]
        try:
            task = suite_task(spec, options)
            if args.subject and name == "mmlu":
                options.limit = None
                records = [r for r in suite_records(spec, split, task, options) if r["subject"] == args.subject]
                records = records[:args.limit]
            else:
                records = suite_records(spec, split, task, options)
        except BenchmarkDataMissing as exc:
            print(f"| {label} | skipped: {str(exc)[:80]} |")
            continue
        items = _mc_items(spec, task, records, options, tokenizer)
        new, new_s = timed(loglik, model, tokenizer, items, args.batch_size)
        row = f"| {label} | {len(items)} | "
        if old is not None:
            before, old_s = timed(old, model, tokenizer, items, args.old_batch_size or args.batch_size)
            same = sum(a["pred"] == b["pred"] for a, b in zip(before.records, new.records))
            row += (f"{len(items) / old_s:.2f} | {len(items) / new_s:.2f} | {old_s / new_s:.2f} | "
                    f"{before.metrics['acc']:.3f} | {new.metrics['acc']:.3f} | {same}/{len(items)} |")
        else:
            row += f"- | {len(items) / new_s:.2f} | - | - | {new.metrics['acc']:.3f} | - |"
        print(row, flush=True)


if __name__ == "__main__":
    sys.exit(main())
