"""Engine overhead: a run's wall time over the pure local-training compute it contains, and the
glibc malloc lead (``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000``).

Each run is a fresh subprocess (so the allocator setting applies from process start) executing
``fedpeft.federation.engine.run_experiment``; the numbers come from the run's own metrics.jsonl:

* ``train``: sum of ``client_train.seconds`` (the local trainer's K steps: batches, forward,
  backward, clipping, optimizer) = the pure local-training compute;
* ``run/train``: ``run_end.seconds`` / train (includes model load, evaluation, checkpoints);
* ``loop/train``: sum over rounds of (``round_end.seconds`` - evaluation) + checkpoint time, / train:
  what the round loop adds around local training (the engine's own overhead);
* ``ms/step``: train / optimizer steps; ``peak RSS`` from run_end.

Allocator modes: ``default`` (glibc as is, ``FEDPEFT_MALLOC=default``), ``env`` (the two variables
set for the subprocess), ``mallopt`` (``fedpeft.metering.allocator.tune_malloc()`` called first).

    python bench/engine_overhead.py                          # tiny model and SmolLM2-135M, 3 modes
    python bench/engine_overhead.py --models tiny --modes default env --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "tiny": (REPO / "configs" / "tiny.yaml", [
        "federation.rounds=4", "federation.local_steps=8", "federation.batch_size=8",
        "evaluation.every_rounds=0", "evaluation.before_training=false", "data.eval_examples_per_task=1",
        "evaluation.max_new_tokens=2",
    ]),
    "smollm2": (REPO / "configs" / "quickstart.yaml", [
        "federation.rounds=2", "federation.clients_per_round=2", "federation.local_steps=4", "federation.batch_size=4",
        "evaluation.every_rounds=0", "evaluation.before_training=false", "data.eval_examples_per_task=1",
        "evaluation.max_new_tokens=2", "data.train_examples_per_task=100",
    ]),
}
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}


def child(args) -> None:
    if args.mode == "mallopt":
        from fedpeft.metering.allocator import tune_malloc

        assert tune_malloc(), "mallopt tuning not applied"
    import torch

    torch.set_num_threads(args.threads)
    from fedpeft.federation.engine import run_experiment
    from fedpeft.report.metrics_io import load_run

    config, overrides = MODELS[args.model]
    overrides = [*overrides, f"model.threads={args.threads}", "output.progress=false", *args.override]
    with tempfile.TemporaryDirectory() as tmp:
        run_experiment(config, overrides=overrides, run_dir=Path(tmp) / "run")
        run = load_run(Path(tmp) / "run")
    breakdown = run.time_breakdown()
    loop = sum(e["seconds"] - e["phase_seconds"].get("evaluate", 0.0) + e["phase_seconds"].get("checkpoint", 0.0)
               for e in run.round_end.values())
    steps = sum(e.get("steps", 0) for e in run.client_train)
    print("RESULT " + json.dumps({"wall": run.wall_seconds(), "train": run.train_seconds(), "loop": loop, "steps": steps,
                                  "peak_rss_mb": run.peak_rss_mb(), "breakdown": breakdown}))


def launch(model: str, mode: str, threads: int, override: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    if mode == "env":
        env.update(MALLOC_ENV)
    elif mode == "default":
        env["FEDPEFT_MALLOC"] = "default"
    cmd = [sys.executable, __file__, "--child", "--model", model, "--mode", mode, "--threads", str(threads)]
    for item in override:
        cmd += ["--override", item]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    process_seconds = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{model}/{mode} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["process"] = process_seconds
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--modes", nargs="+", default=["default", "env", "mallopt"], choices=["default", "env", "mallopt"])
    parser.add_argument("--repeats", type=int, default=1, help="runs per (model, mode); medians are shown")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--override", action="append", default=[], help="extra config override key=value")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    header = (f"{'model':8} {'malloc':8} | {'process s':>9} {'run s':>7} {'train s':>7} | {'run/train':>9} {'loop/train':>10} | "
              f"{'ms/step':>8} {'steps':>5} | {'peak RSS MiB':>12}")
    print(f"torch threads {args.threads}; repeats {args.repeats} (medians)")
    print(header)
    print("-" * len(header))
    per_step: dict[tuple[str, str], float] = {}
    details: dict[tuple[str, str], dict] = {}
    for model in args.models:
        # repeats outermost, modes interleaved: load from other processes spreads over all modes alike
        results: dict[str, list[dict]] = {mode: [] for mode in args.modes}
        for _ in range(args.repeats):
            for mode in args.modes:
                results[mode].append(launch(model, mode, args.threads, args.override))
        for mode in args.modes:
            runs = results[mode]
            med = {k: statistics.median(r[k] for r in runs) for k in ("process", "wall", "train", "loop", "peak_rss_mb")}
            steps = runs[0]["steps"]
            per_step[(model, mode)] = 1000 * med["train"] / steps
            details[(model, mode)] = sorted(runs, key=lambda r: r["wall"])[len(runs) // 2]["breakdown"]
            print(f"{model:8} {mode:8} | {med['process']:>9.2f} {med['wall']:>7.2f} {med['train']:>7.2f} | "
                  f"{med['wall'] / med['train']:>9.3f} {med['loop'] / med['train']:>10.3f} | "
                  f"{per_step[(model, mode)]:>8.1f} {steps:>5} | {med['peak_rss_mb']:>12.0f}")
    print()
    print("where the run's wall time went (the run of median wall time of each setting), seconds:")
    for (model, mode), parts in details.items():
        print(f"  {model:8} {mode:8} " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    for model in args.models:
        base = per_step.get((model, "default"))
        for mode in ("env", "mallopt"):
            if base and (model, mode) in per_step:
                print(f"{model}: per-step time {mode} / default = {per_step[(model, mode)] / base:.3f}")


if __name__ == "__main__":
    main()
