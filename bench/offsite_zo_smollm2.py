"""FedOT (offsite tuning) and FedKSeed (zeroth-order) on SmolLM2-135M-Instruct, next to FedIT (LoRA on the
full model): accuracy, bytes per round, what left the model owner, seconds per round, peak memory.

Same data and federation as ``bench/methods_smollm2.py`` (ARC-Easy + OBQA + BoolQ from
``$FEDPEFT_DATA_DIR``, default ``../shared/data``; Dirichlet 0.5 by task; exact match by generation).
Each method runs in its own process (``python -m fedpeft run``), so ``peak RSS`` is that run's own.

- FedOT: adapter = LoRA (rank ``--rank``, q/k/v/o) of the first 2 and last 2 of SmolLM2's 30 blocks;
  emulator = the 26 middle blocks with drop ratio 0.2 (21 kept) or 0.5 (13 kept). ``accuracy`` is the
  adapter plugged into the full model, ``emulator acc`` the same adapter through the emulator.
  ``left the owner`` = the frozen tensors one client received once (full model minus dropped blocks).
- FedKSeed: all base parameters, K = 4096 seeds, eps = 5e-4, its own learning rate ``--zo-lr``
  (zeroth-order steps along a 135M-dimensional direction need a far smaller rate than AdamW on LoRA).

    python bench/offsite_zo_smollm2.py                        # all rows, a few minutes each on 2 cores
    python bench/offsite_zo_smollm2.py --rows fedot0.5 fedkseed
    python bench/offsite_zo_smollm2.py --model tiny-llama     # seconds: a smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from methods_smollm2 import accuracy, data_dir, overrides_for, summarise, write_subset

REPO = Path(__file__).resolve().parents[1]
ROWS = {
    "fedit": ("fedit", []),
    "fedot0.2": ("fedot", ["method.options.drop_ratio=0.2"]),
    "fedot0.5": ("fedot", ["method.options.drop_ratio=0.5"]),
    "fedot0.5+distill": ("fedot", ["method.options.drop_ratio=0.5", "method.options.distill_steps=20",
                                   "method.options.distill_lr=5e-4"]),
    "localot0.2": ("fedot", ["method.options.drop_ratio=0.2", "method.options.local_ot=true"]),
    "fedkseed": ("fedkseed", ["method.options.k=4096"]),
}


def mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n:,.0f} B"


def row_for(run_dir: Path) -> dict:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    row = summarise(run_dir)
    aggregates = [e for e in events if e["event"] == "aggregate"]
    rounds = [e for e in events if e["event"] == "round_end"]
    end = [e for e in events if e["event"] == "run_end"]
    evals = [e for e in events if e["event"] == "eval" and e.get("round", 0) > 0]
    main_evals = [e for e in evals if "split" not in e]  # the adapter in the full model
    emulator = [e for e in evals if e.get("split") == "emulator"]
    row["metrics"] = main_evals[-1]["metrics"] if main_evals else {}
    row["emulator"] = emulator[-1]["metrics"] if emulator else {}
    row["left_owner"] = aggregates[0].get("shipped_once_bytes") if aggregates else None
    row["owner_model"] = aggregates[0].get("owner_model_bytes") if aggregates else None
    row["s_per_round"] = sum(e["seconds"] for e in rounds) / len(rounds) if rounds else None
    row["peak_rss_mb"] = end[0].get("peak_rss_mb") if end else None
    row["uplink_per_client"] = [e["uplink_bytes"] for e in events if e["event"] == "client_train"][:1]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=list(ROWS))
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data-dir")
    parser.add_argument("--per-task", type=int, default=100)
    parser.add_argument("--eval-per-task", type=int, default=10)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--a", type=int, default=2, help="FedOT: adapter blocks at the bottom")
    parser.add_argument("--b", type=int, default=2, help="FedOT: adapter blocks at the top")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--zo-lr", type=float, default=1e-6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="keep the run directories here")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "offsite_zo_smollm2.md"))
    args = parser.parse_args()
    args.ranks = [args.rank]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(args.keep) if args.keep else Path(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        data_path = write_subset(data_dir(args.data_dir), args.per_task, tmp, args.seed)
        for label in args.rows:
            method, extra = ROWS[label]
            overrides = overrides_for(args, method, "none", data_path) + extra
            overrides.append("evaluation.before_training=false")
            if method == "fedot":
                overrides += [f"method.options.a={args.a}", f"method.options.b={args.b}"]
            if method == "fedkseed":
                overrides += [f"training.lr={args.zo_lr}", f"training.lr_min={args.zo_lr}"]
            run_dir = tmp / label
            print(f"== {label}", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "fedpeft", "run", "--config", str(REPO / "configs" / "tiny.yaml"),
                                   "--run-dir", str(run_dir), "--overwrite", *overrides],
                                  capture_output=True, text=True, env={**os.environ})
            row = row_for(run_dir) if proc.returncode == 0 else {"error": proc.stderr.strip().splitlines()[-1:]}
            row.update(label=label, wall=time.perf_counter() - t0)
            print(json.dumps({k: v for k, v in row.items() if k not in ("metrics", "initial_metrics")}), flush=True)
            rows.append(row)
    write_table(args, rows)


def write_table(args, rows: list[dict]) -> None:
    lines = [f"# FedOT and FedKSeed on {args.model}: {args.rounds} rounds, {args.per_round} of {args.clients} clients "
             f"per round, {args.steps} local steps x batch {args.batch}, ARC-Easy + OBQA + BoolQ ({args.per_task} "
             f"train each, {args.eval_per_task} held out each); LoRA r={args.rank} on q/k/v/o for FedIT and FedOT",
             "", "| method | accuracy (full model) | emulator acc | last-round train loss | uplink / round | "
             "downlink / round | left the owner (once per client) | owner's model | s / round | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['label']} | error: {row['error']} |")
            continue
        metrics = row.get("metrics", {})
        emu = row.get("emulator", {})
        acc = accuracy(metrics)
        personal = row.get("personal", {}).get("personal/mean")
        acc_text = f"{acc:.3f}" if acc is not None else "-"
        if personal is not None:
            acc_text += f" (per-client mean {personal:.3f})"
        lines.append(
            f"| {row['label']} | {acc_text} | {f'{accuracy(emu):.3f}' if emu else '-'} | "
            f"{row['loss_last_round']:.3f} | {mb(row['uplink_per_round'])} | {mb(row['downlink_per_round'])} | "
            f"{mb(row['left_owner']) if row['left_owner'] else '- (the whole model)'} | {mb(row['owner_model'])} | "
            f"{row['s_per_round']:.1f} | {row['peak_rss_mb']:.0f} MB |")
    lines += ["", "Command: `python bench/offsite_zo_smollm2.py " + " ".join(sys.argv[1:]) + "` (2 shared CPU cores)."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
