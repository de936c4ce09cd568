"""Federated preference objectives through the engine (``training.objective``): reward-model pairwise
accuracy per reward loss, and DPO/IPO before/after, on the generated preference set (SmolLM2-135M,
small budget: 4 clients, 2 per round, 2 rounds of 3 local steps of 4 pairs; 24 held-out pairs, so one
pair is 0.042).

    python bench/alignment_federated.py --json bench/results/alignment_federated.json
    python bench/alignment_federated.py --losses logsigmoid hinge --kinds dpo     # a subset

Each row is one ``fedpeft run`` of configs/alignment/reward_smollm2.yaml (``training.loss=<name>``) or
configs/alignment/dpo_smollm2.yaml (``training.objective=dpo|ipo``); "before" is the round-0 evaluation
(reward: the new random head; DPO/IPO: policy = reference, every implicit reward 0, so 0.0), "after" the
final one. The round-0 evaluation runs once per config (every reward loss starts from the same seeded
head, every DPO/IPO run from policy = reference), the later runs reuse it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fedpeft.alignment.names import REWARD_LOSS_PARAMS
from fedpeft.federation.engine import run_experiment

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "alignment"


def one(config: Path, overrides: list[str], out: Path) -> dict:
    start = time.perf_counter()
    summary = run_experiment(config, overrides + ["output.report=false"], run_dir=out, overwrite=True)
    return {"overrides": overrides, "before": summary.initial_metrics, "after": summary.final_metrics,
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", nargs="*", default=list(REWARD_LOSS_PARAMS))
    parser.add_argument("--kinds", nargs="*", default=["dpo", "ipo"], help="preference objectives to run after the reward losses")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        before: dict = {}
        for i, loss in enumerate(args.losses):
            again = [] if i == 0 else ["evaluation.before_training=false"]
            r = one(CONFIGS / "reward_smollm2.yaml", [f"training.loss={loss}", *again], Path(tmp) / f"reward-{loss}")
            before = r["before"] = r["before"] or before
            rows.append({"name": f"reward/{loss}", "metric": "pairwise_accuracy", **r})
            print(json.dumps(rows[-1]), flush=True)
        if args.kinds:
            for i, kind in enumerate(args.kinds):
                again = [] if i == 0 else ["evaluation.before_training=false"]
                r = one(CONFIGS / "dpo_smollm2.yaml", [f"training.objective={kind}", *again], Path(tmp) / kind)
                before = r["before"] = r["before"] or (before if i else {})
                rows.append({"name": f"{kind} (beta 0.1)", "metric": "preference_accuracy", **r})
                print(json.dumps(rows[-1]), flush=True)
    print("\n| run | accuracy before | accuracy after | reward margin after | seconds |\n|---|---|---|---|---|")
    for row in rows:
        m = row["metric"]
        print(f"| {row['name']} | {row['before'].get(m, float('nan')):.3f} | {row['after'][m]:.3f} | "
              f"{row['after']['reward_margin']:.3f} | {row['seconds']:.0f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
