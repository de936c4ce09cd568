"""A small learning-rate sweep: accuracy before and after a few rounds at each client learning rate.

    python bench/lr_sweep.py minilm  [--lrs 5e-4,2e-3,5e-3,2e-2] [--rounds 3] [--threads N]   # classification head on MiniLM, SST-2
    python bench/lr_sweep.py smollm2 [--lrs 5e-4,2e-3,8e-3] [--rounds 3] [--threads N]   # LoRA on SmolLM2, the quickstart's tasks

minilm: all-MiniLM-L6-v2 with a classification head and LoRA r=8 on query/value, SST-2 (2,000 training
records from ../shared/data or $FEDPEFT_DATA_DIR; a seeded sample of 200 of GLUE's 872 validation
records, the same in both evaluations), 4 clients (IID), all 4 every round, 10 local steps of batch
16, constant learning rate. smollm2: configs/quickstart.yaml with ``rounds``
rounds and a constant learning rate. Kept small on purpose (2 CPU cores): it ranks learning rates, it
does not tune them. Writes bench/results/lr_sweep-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from fedpeft.data.builtin import data_dir
from fedpeft.federation.engine import run_experiment

RESULTS = Path(__file__).resolve().parent / "results"

SCENARIOS = {
    "minilm": ("configs/fltac_minilm.yaml", [
        "method.name=fedit", "data.add_generated=[]", "data.max_train_examples_per_task=2000",
        "data.partition={kind: iid, by: label}", "peft.r=8", "peft.alpha=16",
        "federation.num_clients=4", "federation.clients_per_round=4", "federation.local_steps=10",
        "federation.batch_size=16", "evaluation.every_rounds=0", "evaluation.max_examples=200", "seed=0",
    ]),
    "smollm2": ("configs/quickstart.yaml", ["evaluation.every_rounds=0"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(SCENARIOS))
    parser.add_argument("--lrs", default=None, help="comma-separated client learning rates")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (model.threads)")
    args = parser.parse_args()
    config, overrides = SCENARIOS[args.model]
    lrs = [float(x) for x in (args.lrs or ("5e-4,2e-3,5e-3,2e-2" if args.model == "minilm" else "5e-4,2e-3,8e-3")).split(",")]
    if args.threads:
        overrides = [*overrides, f"model.threads={args.threads}"]
    if args.model == "minilm":
        root = data_dir()
        if root is None or not (root / "sst2").is_dir():
            raise SystemExit("minilm sweep needs SST-2: ../shared/data/sst2 or $FEDPEFT_DATA_DIR/sst2")
        overrides = [*overrides, f"data.path={root}"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for lr in lrs:
            start = time.perf_counter()
            summary = run_experiment(config, [*overrides, f"federation.rounds={args.rounds}", f"training.lr={lr}",
                                              f"training.lr_min={lr}", "training.schedule=constant",
                                              "output.progress=false", "output.report=false"],
                                     run_dir=Path(tmp) / f"lr{lr:g}")
            metric = "accuracy" if "accuracy" in summary.final_metrics else "exact_match"
            rows.append({"lr": lr, "metric": metric, "before": summary.initial_metrics.get(metric),
                         "after": summary.final_metrics.get(metric), "seconds": round(time.perf_counter() - start, 1)})
            print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"lr_sweep-{args.model}.json"
    out.write_text(json.dumps({"model": args.model, "rounds": args.rounds, "cpus": os.cpu_count(), "runs": rows}, indent=1))
    print(f"| lr | {rows[0]['metric']} before | after {args.rounds} rounds | seconds |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['lr']:g} | {row['before']:.3f} | {row['after']:.3f} | {row['seconds']} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
