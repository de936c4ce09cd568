"""Utility against privacy: the final metric of FedIT and FFA-LoRA without DP and under client-level
central DP-FedAvg at three noise multipliers, with the epsilon each spent.

    PYTHONPATH=src python bench/dp_tradeoff.py [--model minilm|smollm2] [--rounds 4] [--noise 0.5,1,2]
        [--clip 1.0] [--methods fedit,ffa_lora] [--threads N]

minilm (default, offline): all-MiniLM-L6-v2 with a classification head and LoRA r=4 on query/value, the
generated sentiment and topic tasks (400 training records each, 100 evaluation records each), 40
clients (IID), 20 sampled per round (q = 0.5), 5 local steps of batch 16, constant learning rate 5e-3,
accuracy. smollm2: configs/quickstart.yaml's set-up with 20 clients, 10 a round (q = 0.5), exact match.
DP: clip norm C on each client's update, noise z C on the sum, delta 1e-3 (< 1/40), epsilon from the
RDP accountant over the rounds run. Small on purpose (2 shared CPU cores): it shows the shape of the
trade-off, not tuned numbers. Writes bench/results/dp_tradeoff-<model>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fedpeft.federation.engine import run_experiment

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]

SCENARIOS = {
    "minilm": ("configs/fltac_minilm.yaml", "accuracy", [
        "data.source=generated", "data.add_generated=[]", "data.tasks=[sentiment,topic]",
        "data.train_examples_per_task=400", "data.eval_examples_per_task=100",
        "data.partition={kind: iid, by: task}", "method.options={}",
        "federation.num_clients=40", "federation.clients_per_round=20", "federation.local_steps=5",
        "federation.batch_size=16", "training.lr=5e-3", "training.lr_min=5e-3", "training.schedule=constant",
        "evaluation.every_rounds=0", "evaluation.before_training=true", "seed=0",
    ]),
    "smollm2": ("configs/quickstart.yaml", "exact_match", [
        "federation.num_clients=20", "federation.clients_per_round=10", "federation.local_steps=4",
        "evaluation.every_rounds=0", "data.eval_examples_per_task=10",
    ]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SCENARIOS), default="minilm")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--noise", default="0.5,1,2", help="comma-separated noise multipliers z")
    parser.add_argument("--clip", type=float, default=1.0, help="clip norm C of each client's update")
    parser.add_argument("--methods", default="fedit,ffa_lora")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    config, metric, overrides = SCENARIOS[args.model]
    overrides = [*overrides, f"federation.rounds={args.rounds}", "output.report=false", "output.progress=false"]
    if args.threads:
        overrides.append(f"model.threads={args.threads}")
    settings = [None] + [float(z) for z in args.noise.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            for z in settings:
                privacy = [] if z is None else ["privacy.mode=central", f"privacy.noise_multiplier={z}",
                                                f"privacy.clip_norm={args.clip}", "privacy.delta=1e-3"]
                start = time.perf_counter()
                summary = run_experiment(str(REPO / config), [*overrides, f"method.name={method}", *privacy],
                                         run_dir=Path(tmp) / f"{method}-{z}")
                row = {"method": method, "noise_multiplier": z, "clip_norm": None if z is None else args.clip,
                       "epsilon": summary.privacy["epsilon"] if summary.privacy else None,
                       "delta": 1e-3 if z is not None else None, "before": summary.initial_metrics.get(metric),
                       metric: summary.final_metrics.get(metric), "seconds": time.perf_counter() - start}
                rows.append(row)
                print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"dp_tradeoff-{args.model}.json"
    out.write_text(json.dumps({"args": vars(args), "metric": metric, "rows": rows}, indent=1))
    print(f"\n| method | z | C | epsilon (delta 1e-3) | {metric} before | {metric} after | s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        eps = "no DP" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        print(f"| {r['method']} | {r['noise_multiplier'] or '-'} | {r['clip_norm'] or '-'} | {eps} | "
              f"{r['before']:.3f} | {r[metric]:.3f} | {r['seconds']:.0f} |")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
