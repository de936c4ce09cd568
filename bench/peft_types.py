"""PEFT types side by side: trainable parameters and bytes per round (``--counts``, no training), and a
small federated run per type (metric, uplink per round, seconds per round, peak memory).

Counts: each ``peft.type`` with its defaults (config.PeftConfig) wrapped by peft on the model; trainable
numel is what peft marks trainable, bytes per client per round = numel x 4 (float32 on the wire, each
way), uplink per round = that x clients per round.

Runs (``--train``): configs/quickstart.yaml (SmolLM2-135M, generated tasks, FedIT) with a smaller budget
by default (``--rounds``, ``--local-steps``, ``--eval-per-task``); each type with its defaults except
the learning rate (``--lr-prompt`` for prompt/P-/prefix tuning, which need a larger one). Metric: exact
match averaged over the tasks at the last evaluation. Seconds per round: the mean of ``round_end``'s
train + aggregate phases (evaluation left out). Peak memory: the run's peak RSS (``run_end``).

    PYTHONPATH=src python bench/peft_types.py --counts --model smollm2-135m-instruct
    PYTHONPATH=src python bench/peft_types.py --counts --model tiny-llama
    PYTHONPATH=src python bench/peft_types.py --train --types lora,dora,prompt_tuning,p_tuning,prefix_tuning,ia3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from fedpeft.config import PEFT_TYPES, PeftConfig
from fedpeft.models.peft_wrap import wrap_peft
from fedpeft.models.registry import load_base_model

PROMPT_LEARNING = ("prompt_tuning", "p_tuning", "prefix_tuning")


def counts(model_name: str, clients_per_round: int, types: list[str]) -> list[dict]:
    rows = []
    for kind in types:
        loaded = load_base_model(model_name, seed=0)
        base_numel = sum(p.numel() for p in loaded.model.parameters())
        model = wrap_peft(loaded.model, PeftConfig(type=kind), seed=0, total_step=1, tokenizer=loaded.tokenizer)
        numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append({"type": kind, "trainable": numel, "percent_of_base": 100 * numel / base_numel,
                     "bytes_per_client": 4 * numel, "uplink_per_round": 4 * numel * clients_per_round})
    return rows


def train(types: list[str], rounds: int, local_steps: int, eval_per_task: int, lr_prompt: float, out: Path) -> list[dict]:
    from fedpeft.federation.engine import run_experiment

    rows = []
    for kind in types:
        run_dir = out / kind
        overrides = [f"peft.type={kind}", "peft.r=null", "peft.alpha=null", "peft.dropout=null",
                     "peft.target_modules=null", f"federation.rounds={rounds}", f"federation.local_steps={local_steps}",
                     f"data.eval_examples_per_task={eval_per_task}", f"evaluation.every_rounds={rounds}",
                     "evaluation.before_training=false", "output.progress=false", "output.report=false"]
        if kind in PROMPT_LEARNING:
            overrides += [f"training.lr={lr_prompt}", f"training.lr_min={lr_prompt / 4}"]
        summary = run_experiment("configs/quickstart.yaml", overrides, run_dir=run_dir)
        events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        evals = [e for e in events if e["event"] == "eval"]
        ems = {k: v for k, v in evals[-1]["metrics"].items() if k.endswith("exact_match") and "/" in k}
        ends = [e for e in events if e["event"] == "round_end"]
        run_end = next(e for e in events if e["event"] == "run_end")
        rows.append({"type": kind, "exact_match": statistics.mean(ems.values()) if ems else float("nan"),
                     "per_task": ems, "uplink_per_round": summary.uplink_bytes / rounds,
                     "seconds_per_round": statistics.mean(e["phase_seconds"]["train"] + e["phase_seconds"]["aggregate"]
                                                          for e in ends),
                     "peak_rss_mb": run_end.get("peak_rss_mb")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", action="store_true")
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--types", default=",".join(PEFT_TYPES))
    parser.add_argument("--clients-per-round", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--eval-per-task", type=int, default=10)
    parser.add_argument("--lr-prompt", type=float, default=3e-2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    types = [t for t in args.types.split(",") if t]
    if args.counts:
        print(f"| peft.type | trainable params | % of {args.model} | bytes per client per round (each way) | "
              f"uplink per round ({args.clients_per_round} clients) |")
        print("|---|---:|---:|---:|---:|")
        for r in counts(args.model, args.clients_per_round, types):
            print(f"| {r['type']} | {r['trainable']:,} | {r['percent_of_base']:.3f} | {r['bytes_per_client']:,} | "
                  f"{r['uplink_per_round']:,} |")
    if args.train:
        out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="peft_types_"))
        rows = train(types, args.rounds, args.local_steps, args.eval_per_task, args.lr_prompt, out)
        print("| peft.type | exact match (mean of tasks) | uplink per round (bytes) | s/round | peak RSS (MB) |")
        print("|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['type']} | {r['exact_match']:.3f} | {r['uplink_per_round']:,.0f} | {r['seconds_per_round']:.1f} | "
                  f"{r['peak_rss_mb']} |")
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
