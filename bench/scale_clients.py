"""Scale in clients: peak RSS and per-round time with 10, 100 and 1,000 registered clients.

Tiny model, a few clients sampled per round, a method with per-client persistent state (FedSA-LoRA
keeps each client's B in the on-disk client store; ``--method scaffold`` keeps control variates). The
training data is the same for every setting (sized for the largest client count, IID split), so only
the number of registered clients changes. Each setting runs in a fresh subprocess; numbers come from
its metrics.jsonl: peak RSS (run_end), per-round time = median over rounds of round_end.seconds minus
evaluation, and the client store's size on disk.

Goals (issue 8): RSS flat within 10 % from 10 to 1,000 clients; per-round time independent of the
number of registered clients.

    python bench/scale_clients.py
    python bench/scale_clients.py --clients 10 100 1000 10000 --method scaffold
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(args) -> None:
    import torch

    torch.set_num_threads(1)
    from fedpeft.federation.engine import run_experiment
    from fedpeft.report.metrics_io import load_run

    examples_per_task = max(40, (args.max_clients * args.examples_per_client) // 3 + 1)
    overrides = [
        f"federation.num_clients={args.n}", f"federation.clients_per_round={args.per_round}",
        f"federation.rounds={args.rounds}", "federation.local_steps=2", "federation.batch_size=4",
        f"method.name={args.method}", "data.partition.kind=iid", f"data.train_examples_per_task={examples_per_task}",
        "data.eval_examples_per_task=1", "evaluation.every_rounds=0", "evaluation.before_training=false",
        "evaluation.max_new_tokens=2", "output.progress=false", "model.threads=1",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        run_experiment(REPO / "configs" / "tiny.yaml", overrides=overrides, run_dir=run_dir)
        run = load_run(run_dir)
        store = run_dir / "client_store"
        store_bytes = sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) if store.exists() else 0
        store_files = sum(1 for p in store.rglob("*") if p.is_file()) if store.exists() else 0
    rounds = [e["seconds"] - e.get("phase_seconds", {}).get("evaluate", 0.0) for r, e in sorted(run.round_end.items())]
    print("RESULT " + json.dumps({
        "peak_rss_mb": run.peak_rss_mb(), "round_seconds": rounds, "breakdown": run.time_breakdown(),
        "store_bytes": store_bytes, "store_files": store_files, "examples": examples_per_task * 3,
        "wall": run.wall_seconds(), "partition_events": len(run.of("partition")),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--per-round", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--method", default="fedsa_lora")
    parser.add_argument("--examples-per-client", type=int, default=4)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-clients", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    max_clients = max(args.clients)
    print(f"tiny model, method {args.method}, {args.per_round} clients per round, {args.rounds} rounds, "
          f"same data for every setting (IID, >= {args.examples_per_client} examples per client at {max_clients} clients)")
    header = f"{'clients':>8} | {'peak RSS MiB':>12} {'vs first':>8} | {'round s (median)':>16} {'vs first':>8} | {'store files':>11} {'store MB':>8} | {'run s':>6} {'eval s':>6} {'other s':>7}"
    print(header)
    print("-" * len(header))
    first = None
    for n in args.clients:
        cmd = [sys.executable, __file__, "--child", "--n", str(n), "--max-clients", str(max_clients),
               "--per-round", str(args.per_round), "--rounds", str(args.rounds), "--method", args.method,
               "--examples-per-client", str(args.examples_per_client)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{n:>8} | failed (rc {proc.returncode}): {proc.stderr[-1500:]}")
            continue
        r = json.loads(lines[-1][len("RESULT "):])
        # the first round pays one-off warm-up costs; the median over the rest is the steady state
        steady = r["round_seconds"][1:] or r["round_seconds"]
        round_s = statistics.median(steady)
        if first is None:
            first = (r["peak_rss_mb"], round_s)
        print(f"{n:>8} | {r['peak_rss_mb']:>12.0f} {r['peak_rss_mb'] / first[0]:>8.3f} | {round_s:>16.4f} {round_s / first[1]:>8.3f} | "
              f"{r['store_files']:>11} {r['store_bytes'] / 1e6:>8.2f} | {r['wall']:>6.1f} "
              f"{r['breakdown'].get('evaluation', 0):>6.1f} {r['breakdown'].get('other', 0):>7.1f}")
    print("vs first: ratio to the smallest client count (goal: RSS <= 1.10, round time ~ 1.0); "
          "eval s: all evaluations; other s: run time outside model load, training, aggregation, evaluation")


if __name__ == "__main__":
    main()
