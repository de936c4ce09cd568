"""SmolLM2-135M-Instruct zero-shot on the evaluation suites, with the examples/second of each evaluator.

Reads real data from ``--data-dir`` / ``$FEDPEFT_DATA_DIR`` / ``../shared/data``; exits 0 with a message
when there is none (or when the bundled model is not installed). Runs, with sample limits stated in the
output (seeded samples of N examples of each test set; MMLU's cover every subject in proportion):

* each commonsense set, multiple choice by log-likelihood in two formats: ``text`` (option texts,
  lm-evaluation-harness style, the usual zero-shot baseline) and ``label`` (the LLM-Adapters answer
  labels after "the correct answer is", what a fine-tuned adapter is trained to say);
* each commonsense set by generation + LLM-Adapters label extraction (strict, and lenient);
* MMLU validation, multiple choice over the letters, 0-shot;
* GSM8K test, generation (greedy, 256 new tokens), graded by ``GSM8KTask`` (the stated answer);
* the cost of batching: BoolQ multiple choice at batch size 1 vs ``--batch-size``.

    python bench/eval_smollm2.py                                  # defaults below
    python bench/eval_smollm2.py --limit 30 --gen-limit 10 --mmlu-limit 60 --gsm8k-limit 5   # about 10 min on 1 core
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fedpeft.data.builtin import data_dir as default_data_dir
from fedpeft.evaluation import extraction
from fedpeft.evaluation.suites import COMMONSENSE8, EvalOptions, run_suite


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--limit", type=int, default=100, help="examples per commonsense set (multiple choice)")
    parser.add_argument("--gen-limit", type=int, default=20, help="examples per commonsense set (generation)")
    parser.add_argument("--mmlu-limit", type=int, default=200)
    parser.add_argument("--gsm8k-limit", type=int, default=20)
    parser.add_argument("--gsm8k-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; on a shared, loaded CPU 1 is several times faster than 2 (spin-waits)")
    parser.add_argument("--template", default="chat")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: text,label,generate,mmlu,gsm8k,batching")
    parser.add_argument("--out", default=None, help="write all results as JSON here")
    args = parser.parse_args()

    data_dir = default_data_dir(args.data_dir)
    if data_dir is None or not data_dir.is_dir():
        print("skipped: no data directory (give --data-dir, set FEDPEFT_DATA_DIR, or provide ../shared/data)")
        return 0
    torch.set_num_threads(args.threads)
    from fedpeft.models.registry import ModelNotFoundError, load_base_model

    try:
        loaded = load_base_model(args.model)
    except ModelNotFoundError as exc:
        print(f"skipped: {exc}")
        return 0
    model, tokenizer = loaded.model, loaded.tokenizer
    skip = set(filter(None, args.skip.split(",")))
    print(f"# fedpeft evaluation bench: {args.model} zero-shot (loaded in {loaded.load_seconds:.1f} s)")
    print(f"data: {data_dir}; torch threads: {args.threads}; batch size: {args.batch_size}; template: {args.template}")
    print(f"limits (seeded samples): commonsense multiple choice {args.limit} per set, commonsense generation "
          f"{args.gen_limit} per set, MMLU val {args.mmlu_limit} (stratified by subject), GSM8K test "
          f"{args.gsm8k_limit} ({args.gsm8k_tokens} new tokens)\n")
    rows: list[dict] = []

    def record(results, label: str):
        for r in results:
            row = {"task": r.task, "evaluator": label, "n": r.num_examples, "seconds": round(r.seconds, 2),
                   "examples_per_second": r.examples_per_second, **{k: v for k, v in r.metrics.items()}}
            if r.skipped:
                row["skipped"] = r.skipped.split(";")[0]
            if r.evaluator == "generate" and r.task in extraction.COMMONSENSE_LABELS and r.extra.get("samples"):
                samples = r.extra["samples"]
                lenient = [extraction.extract_commonsense_label(r.task, s["output"], lenient=True) == s["gold"]
                           for s in samples]
                row["acc_lenient"] = sum(lenient) / len(lenient)
            rows.append(row)
            speed = row["examples_per_second"]
            shown = {k: round(v, 3) for k, v in r.metrics.items() if isinstance(v, float)}
            print(f"  {r.task:14s} {label:22s} n={r.num_examples:4d} {shown} "
                  f"{'' if speed is None else f'{speed:.2f} ex/s'}{' SKIPPED' if r.skipped else ''}", flush=True)

    common = dict(data_dir=data_dir, template=args.template, batch_size=args.batch_size)
    suite = ",".join(COMMONSENSE8)
    if "text" not in skip:
        record(run_suite(model, tokenizer, suite, EvalOptions(limit=args.limit, mc_format="text", **common)), "mc (text)")
    if "label" not in skip:
        record(run_suite(model, tokenizer, suite, EvalOptions(limit=args.limit, mc_format="label", **common)), "mc (label)")
    if "generate" not in skip:
        options = EvalOptions(limit=args.gen_limit, mode="generate", samples_to_keep=args.gen_limit, **common)
        record(run_suite(model, tokenizer, suite, options), "generate (LLM-Adapters)")
    if "mmlu" not in skip:
        record(run_suite(model, tokenizer, "mmlu:validation", EvalOptions(limit=args.mmlu_limit, **common)),
               "mc (letters, 0-shot)")
    if "gsm8k" not in skip:
        options = EvalOptions(limit=args.gsm8k_limit, mode="generate", max_new_tokens=args.gsm8k_tokens, **common)
        record(run_suite(model, tokenizer, "gsm8k", options), "generate (stated answer)")
    if "batching" not in skip:
        n = min(args.limit, 32)
        for batch_size in (1, args.batch_size):
            options = EvalOptions(data_dir=data_dir, template=args.template, batch_size=batch_size, limit=n, mc_format="label")
            record(run_suite(model, tokenizer, "boolq", options), f"mc (label) batch={batch_size}")

    print("\n| task | evaluator | n | acc | acc_norm | ex/s |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        if row.get("skipped"):
            print(f"| {row['task']} | {row['evaluator']} | 0 | skipped: no local data, hub unreachable | | |")
            continue
        acc = row.get("acc")
        extra = f" (lenient {row['acc_lenient']:.3f})" if "acc_lenient" in row else ""
        norm = row.get("acc_norm")
        speed = row["examples_per_second"]
        print(f"| {row['task']} | {row['evaluator']} | {row['n']} | "
              f"{'' if acc is None else f'{acc:.3f}'}{extra} | {'' if norm is None else f'{norm:.3f}'} | "
              f"{'' if speed is None else f'{speed:.2f}'} |")
    print("\nthroughput per evaluator (all tasks): ")
    for evaluator in dict.fromkeys(row["evaluator"] for row in rows):
        done = [r for r in rows if r["evaluator"] == evaluator and not r.get("skipped")]
        examples, seconds = sum(r["n"] for r in done), sum(r["seconds"] for r in done)
        if seconds:
            print(f"  {evaluator:24s} {examples:5d} examples in {seconds:7.1f} s = {examples / seconds:.2f} ex/s")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "time": time.time()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
