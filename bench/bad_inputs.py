"""Bad input through the CLI: each case must end with a clear ``error:`` line (exit 2, or 1 for the
machine's faults), no traceback, and before any model loads (no ``run_start`` event is logged: the
engine logs it right after the model load).

    PYTHONPATH=src python bench/bad_inputs.py --out bench/results/bad_inputs.md

Prints a markdown table: input, exit code, seconds, model loaded, traceback, first error line.
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

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


def cases(work: Path) -> list[tuple[str, list[str], dict]]:
    (work / "empty.yaml").write_text("# nothing here\n")
    (work / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    (work / "latin1.jsonl").write_bytes(b'{"instruction": "a", "response": "b"}\n{"instruction": "caf\xe9", "response": "c"}\n')
    (work / "a-file").write_text("")
    used = work / "used"  # a directory holding a run
    used.mkdir()
    (used / "config.yaml").write_text(Path(TINY).read_text())
    (used / "metrics.jsonl").write_text("")
    damaged = work / "damaged"  # a run whose only checkpoint is damaged
    (damaged / "checkpoints" / "round_0001").mkdir(parents=True)
    (damaged / "config.yaml").write_text(Path(TINY).read_text())
    (damaged / "metrics.jsonl").write_text("")
    (damaged / "checkpoints" / "LATEST").write_text("round_0001")
    (damaged / "checkpoints" / "round_0001" / "strategy.pt").write_bytes(b"\x80\x04N.")
    run = ["--config", TINY, "--run-dir"]
    return [
        ("training.max_grad_norm=-1", [*run, str(work / "r1"), "training.max_grad_norm=-1"], {}),
        ("training.max_grad_norm=0", [*run, str(work / "r2"), "training.max_grad_norm=0"], {}),
        ("training.lr=.inf", [*run, str(work / "r3"), "training.lr=.inf"], {}),
        ("training.lr=nan", [*run, str(work / "r3b"), "training.lr=nan"], {}),
        ("training.lr_min=0.5 (> lr)", [*run, str(work / "r4"), "training.lr_min=0.5"], {}),
        ("federation.rounds=true", [*run, str(work / "r5"), "federation.rounds=true"], {}),
        ("output.progress=1", [*run, str(work / "r6"), "output.progress=1"], {}),
        ("seed=-1", [*run, str(work / "r7"), "seed=-1"], {}),
        ("seed=2**40", [*run, str(work / "r8"), f"seed={2**40}"], {}),
        ("federation.num_client=3 (typo)", [*run, str(work / "r9"), "federation.num_client=3"], {}),
        ("clients_per_round > num_clients", [*run, str(work / "r10"), "federation.clients_per_round=9"], {}),
        ("empty config file", ["--config", str(work / "empty.yaml"), "--run-dir", str(work / "r11")], {}),
        ("non-UTF-8 config file", ["--config", str(work / "latin1.yaml"), "--run-dir", str(work / "r12")], {}),
        ("non-UTF-8 data file", [*run, str(work / "r13"), f"data.source={work / 'latin1.jsonl'}",
                                 "data.task=instruction", "data.partition.kind=iid"], {}),
        ("data.source missing file", [*run, str(work / "r14"), f"data.source={work / 'nope.jsonl'}"], {}),
        ("output.dir is a file", ["--config", TINY, f"output.dir={work / 'a-file'}"], {}),
        ("infeasible pathological partition", [*run, str(work / "r15"), "data.partition.kind=pathological",
                                               "data.partition.classes_per_client=1", "federation.num_clients=2"], {}),
        ("unknown model name, HF_HUB_OFFLINE=1", [*run, str(work / "r16"), "model.name=nobody/no-such-model"],
         {"HF_HUB_OFFLINE": "1"}),
        ("unknown model name, no network", [*run, str(work / "r17"), "model.name=nobody/no-such-model"], {}),
        ("model.name=./missing-dir", [*run, str(work / "r18"), "model.name=./missing-dir"], {}),
        ("new run into a used directory", [*run, str(used)], {}),
        ("--config disagreeing with --resume", ["--config", str(REPO / "configs" / "quickstart.yaml"), "--resume",
                                                str(used)], {}),
        ("--resume of a non-run directory", ["--resume", str(work)], {}),
        ("--resume, only checkpoint damaged", ["--resume", str(damaged)], {}),
    ]


def model_loaded(args: list[str]) -> bool:
    for flag in ("--run-dir", "--resume"):
        if flag in args:
            log = Path(args[args.index(flag) + 1]) / "metrics.jsonl"
            if log.is_file():
                return any(json.loads(line).get("event") == "run_start" for line in log.read_text().splitlines() if line)
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedpeft-bad-"))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rows = ["| input | exit | seconds | model loaded | traceback | message |", "|---|---|---|---|---|---|"]
    tracebacks = loaded = 0
    for name, cli, extra in cases(work):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "fedpeft", "run", *cli], env={**env, **extra}, cwd=work,
                              capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - start
        lines = proc.stderr.splitlines()
        first = next((i for i, line in enumerate(lines) if line.startswith("error")), None)
        error = " ".join(x.strip() for x in lines[first:first + 3]) if first is not None else proc.stderr[-200:]
        trace = "Traceback" in proc.stderr
        was_loaded = model_loaded(cli)
        tracebacks += trace
        loaded += was_loaded
        message = error.replace("|", "\\|").replace(str(work), "$W")[:220]
        rows.append(f"| {name} | {proc.returncode} | {seconds:.1f} | {'yes' if was_loaded else 'no'} | "
                    f"{'yes' if trace else 'no'} | {message} |")
        print(rows[-1], flush=True)
    summary = f"\n{len(rows) - 2} inputs, {tracebacks} tracebacks, {loaded} loaded the model first."
    print(summary)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"Command: `PYTHONPATH=src python bench/bad_inputs.py --out {args.out}`\n\n"
                            + "\n".join(rows) + "\n" + summary + "\n")


if __name__ == "__main__":
    main()
