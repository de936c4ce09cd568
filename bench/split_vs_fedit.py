"""Split learning (sfl) against plain FL (FedIT) on the same config: utility, bytes per round, and the
utility cost of each defence at the cut.

Runs ``fedpeft run`` once per variant (same seed, data, clients and budget) and prints one row each:
the headline metric of the final evaluation, the engine's uplink + downlink bytes per round, and for
split runs the bytes a split deployment sends per round (cut crossings + client adapters, docs/split.md).

    python bench/split_vs_fedit.py --config configs/split/smollm2_sfl.yaml --out /tmp/split_bench \\
        federation.rounds=2 federation.local_steps=4 data.eval_examples_per_task=8
    python bench/split_vs_fedit.py ... --defences      # also sigma / epsilon / alpha at two strengths

Extra arguments are config overrides applied to every variant.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFENCES = [
    ("sfl sigma=0.5", ["method.options.activation_noise=0.5"]),
    ("sfl sigma=2", ["method.options.activation_noise=2.0"]),
    ("sfl d_chi eps=500", ["method.options.dchi_epsilon=500.0"]),
    ("sfl d_chi eps=100", ["method.options.dchi_epsilon=100.0"]),
    ("sfl NoPeek alpha=0.1", ["method.options.nopeek_alpha=0.1"]),
    ("sfl NoPeek alpha=1", ["method.options.nopeek_alpha=1.0"]),
]


def run(config: str, run_dir: Path, overrides: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fedpeft", "run", "--config", config, "--run-dir", str(run_dir),
                           "--overwrite", "output.report=false", *overrides], capture_output=True, text=True,
                          env={**os.environ}, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"run {run_dir} failed:\n{proc.stderr[-3000:]}")
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ends = [e for e in events if e["event"] == "round_end"]
    aggs = [e for e in events if e["event"] == "aggregate"]
    evals = [e for e in events if e["event"] == "eval" and e.get("split") in (None, "global")]
    final = evals[-1]["metrics"] if evals else {}
    headline = next((k for k in ("exact_match", "accuracy") if k in final), next(iter(final), None))
    split = [a["split_wire_bytes"] for a in aggs if "split_wire_bytes" in a]
    last = max((e["round"] for e in events if e["event"] == "client_train"), default=None)
    last_losses = [e["loss"] for e in events if e["event"] == "client_train" and e["round"] == last]
    return {
        "last_round_loss": sum(last_losses) / len(last_losses) if last_losses else None,
        "metric": headline, "value": final.get(headline),
        "engine_bytes_per_round": sum(e["uplink_bytes"] + e["downlink_bytes"] for e in ends) / max(len(ends), 1),
        "split_bytes_per_round": sum(split) / len(split) if split else None,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="an sfl config (configs/split/smollm2_sfl.yaml)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--defences", action="store_true", help="also each defence at two strengths")
    parser.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    args, overrides = parser.parse_known_args()
    variants = [("fedit", ["method.name=fedit", "method.options={}"]), ("sfl", [])]
    if args.defences:
        variants += DEFENCES
    if args.only:
        wanted = {v.strip() for v in args.only.split(",")}
        variants = [v for v in variants if v[0] in wanted]
    print(f"config {args.config}, overrides {' '.join(overrides) or '(none)'}")
    print("| variant | final metric | last-round train loss | engine up+down per round (MB) | split wire per round (MB) | seconds |")
    print("|---|---|---|---|---|---|")
    for name, extra in variants:
        r = run(args.config, args.out / name.replace(" ", "_").replace("=", ""), [*overrides, *extra])
        split = f"{r['split_bytes_per_round'] / 1e6:.3f}" if r["split_bytes_per_round"] is not None else "-"
        value = f"{r['metric']} {r['value']:.3f}" if r["value"] is not None else "-"
        loss = f"{r['last_round_loss']:.3f}" if r["last_round_loss"] is not None else "-"
        print(f"| {name} | {value} | {loss} | {r['engine_bytes_per_round'] / 1e6:.3f} | {split} | {r['seconds']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
