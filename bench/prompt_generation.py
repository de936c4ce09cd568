"""Generation speed with a prompt-learning adapter: the cached, batched decoding of
``evaluation.generation.generate`` against greedy decoding by full forwards without a cache, one prompt at
a time (``generate_by_full_forwards``, what evaluation did before), on the same prompts, in one process.
LoRA's batched cached ``generate`` (peft's own) is timed alongside as the yardstick.

Prompts: the quickstart's generated tasks (first ``--per-task`` held-out prompts of each, chat template).
The adapters are fresh (each type's defaults, seed 0): speed does not depend on what they learned, and
the two decodings' texts are compared (``same``: prompts whose outputs are identical).

    PYTHONPATH=src python bench/prompt_generation.py                     # SmolLM2-135M, 4 x 4 prompts
    PYTHONPATH=src python bench/prompt_generation.py --model tiny-llama  # seconds: a smoke test
"""

from __future__ import annotations

import argparse
import time

import torch

from fedpeft.config import PeftConfig
from fedpeft.data.encoding import format_prompt
from fedpeft.data.generated import generate_split
from fedpeft.evaluation.generation import generate, generate_by_full_forwards
from fedpeft.models.peft_wrap import wrap_peft
from fedpeft.models.registry import load_base_model

TASKS = ["arithmetic", "reverse", "unit_conversion", "uppercase"]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--types", default="prompt_tuning,p_tuning,prefix_tuning")
    parser.add_argument("--per-task", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    template = "chat" if args.model.startswith("smollm2") else "plain"
    _, records = generate_split(TASKS, 0, args.per_task, seed=0)
    rows = []
    for kind in ["lora", *args.types.split(",")]:
        loaded = load_base_model(args.model, seed=0)
        model = wrap_peft(loaded.model, PeftConfig(type=kind), seed=0, tokenizer=loaded.tokenizer)
        tok = loaded.tokenizer
        prompts = [format_prompt(r, template, tok) for r in records]
        cached, t_cached = timed(lambda: generate(model, tok, prompts, args.max_new_tokens, args.batch_size))
        if kind == "lora":
            rows.append((kind, t_cached, None, None))
            continue
        full, t_full = timed(lambda: generate_by_full_forwards(model, tok, prompts, args.max_new_tokens))
        rows.append((kind, t_cached, t_full, sum(a == b for a, b in zip(cached, full))))
    n = len(records)
    print(f"{args.model}, {n} prompts, {args.max_new_tokens} new tokens at most, batch {args.batch_size}, "
          f"{args.threads} thread(s)\n")
    print("| peft.type | cached, batched s | full forwards, one prompt at a time s | speed-up | same output |")
    print("|---|---:|---:|---:|---:|")
    for kind, t_cached, t_full, same in rows:
        if t_full is None:
            print(f"| {kind} (peft's generate) | {t_cached:.1f} | - | - | - |")
        else:
            print(f"| {kind} | {t_cached:.1f} | {t_full:.1f} | {t_full / t_cached:.1f}x | {same}/{n} |")


if __name__ == "__main__":
    main()
