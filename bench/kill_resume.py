"""Random SIGKILLs through the CLI on the tiny model: every killed run, resumed with the same command,
must end bit-identical to an uninterrupted run of the same method.

Each trial starts ``fedpeft run --config configs/tiny.yaml --resume DIR ...`` (``--config`` with
``--resume`` starts the run in DIR when it holds none yet, and resumes it otherwise), SIGKILLs it after a
random delay (a third of the kills fall in the first second, before or while the run directory is
made), possibly kills the resume too, and finally lets the same command finish. It then compares the
final adapter (and FLoRA's changed base weights) with the method's uninterrupted reference, bit for bit,
and the sequence of client_train events (no round lost or logged twice).

    PYTHONPATH=src python bench/kill_resume.py --kills 20 --out bench/results/kill_resume.json

Prints kills / resumes / bit-identical per method and in total.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny.yaml"
OVERRIDES = ["federation.rounds=3", "evaluation.every_rounds=1", "evaluation.before_training=false"]
METHOD_OVERRIDES = {"scaffold": ["training.optimizer=sgd"]}  # SCAFFOLD's controls assume plain SGD steps


def command(run_dir: Path, method: str) -> list[str]:
    return [sys.executable, "-m", "fedpeft", "run", "--config", str(CONFIG), "--resume", str(run_dir),
            *OVERRIDES, f"method.name={method}", *METHOD_OVERRIDES.get(method, [])]


def finals(run_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("adapter_model.safetensors", "base_weights.safetensors"):
        path = run_dir / "final" / name
        if path.is_file():
            out.update({f"{name}:{k}": v for k, v in load_file(str(path)).items()})
    return out


def train_events(run_dir: Path) -> list:
    events = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "client_train":
            events.append((event["round"], event["client"], event["job"], event["losses"]))
    return events


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and len(a) > 0 and all(torch.equal(a[k], b[k]) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="Trials (each kills at least once).")
    parser.add_argument("--methods", default="fedit,scaffold,flora,fedsa_lora")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    methods = args.methods.split(",")
    work = Path(tempfile.mkdtemp(prefix="fedpeft-kill-"))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    references, durations = {}, {}
    for method in methods:
        start = time.perf_counter()
        proc = subprocess.run(command(work / f"ref-{method}", method), env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"reference run of {method} failed:\n{proc.stderr}")
        durations[method] = time.perf_counter() - start
        references[method] = (finals(work / f"ref-{method}"), train_events(work / f"ref-{method}"))
        print(f"reference {method}: {durations[method]:.1f} s", flush=True)
    stats = {m: {"trials": 0, "kills": 0, "early_kills": 0, "resumes": 0, "bit_identical": 0, "events_identical": 0,
                 "failed_resumes": 0} for m in methods}
    failures = []
    for trial in range(args.kills):
        method = methods[trial % len(methods)]
        run_dir = work / f"trial-{trial:03d}"
        s = stats[method]
        s["trials"] += 1
        attempts = 1 + (rng.random() < 0.3)  # sometimes kill the resume as well
        for attempt in range(attempts):
            early = attempt == 0 and rng.random() < 1 / 3
            delay = rng.uniform(0.0, 1.0) if early else rng.uniform(0.0, durations[method] * 0.9)
            proc = subprocess.Popen(command(run_dir, method), env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                s["kills"] += 1
                s["early_kills"] += early
            proc.wait()
            if attempt > 0:
                s["resumes"] += 1
        final = subprocess.run(command(run_dir, method), env=env, capture_output=True, text=True)
        s["resumes"] += 1
        if final.returncode != 0:
            s["failed_resumes"] += 1
            failures.append({"trial": trial, "method": method, "stderr": final.stderr[-2000:]})
            continue
        ref_final, ref_events = references[method]
        same = identical(ref_final, finals(run_dir))
        same_events = train_events(run_dir) == ref_events
        s["bit_identical"] += same
        s["events_identical"] += same_events
        if not (same and same_events):
            failures.append({"trial": trial, "method": method, "bit_identical": same, "events_identical": same_events})
        print(f"trial {trial} {method}: kills so far {s['kills']}, identical {same}, events {same_events}", flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    total = {k: sum(s[k] for s in stats.values()) for k in next(iter(stats.values()))}
    print(json.dumps({"per_method": stats, "total": total}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "overrides": OVERRIDES, "per_method": stats,
                                        "total": total, "failures": failures}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    if failures:
        raise SystemExit(f"{len(failures)} trial(s) not identical: {failures}")


if __name__ == "__main__":
    main()
