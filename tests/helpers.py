"""Pieces several test files share: ``fedpeft run`` in a child process, the kill-and-resume harness
(``FEDPEFT_KILL_AT`` makes the run SIGKILL itself at a named point), a run directory's final adapter and
events, and a few preference pairs. Import as ``from helpers import ...`` (pytest puts tests/ on the path)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedpeft.federation.engine import KILL_ENV, run_experiment

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"

# Preference records (prompt, preferred and dispreferred completion) for the alignment tests.
PREFERENCE_PAIRS = [
    {"prompt": "Add 2 and 3.", "chosen": "5", "rejected": "6"},
    {"prompt": "Is 14 even or odd?", "chosen": "even", "rejected": "odd"},
    {"prompt": "Reverse: a b c", "chosen": "c b a", "rejected": "a b c"},
]


def run_cli(args, env_extra: dict | None = None, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m fedpeft run ARGS`` in a fresh process (a SIGKILL there does not touch the tests)."""
    return subprocess.run([sys.executable, "-m", "fedpeft", "run", *map(str, args)],
                          env={**os.environ, **(env_extra or {})}, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)


def reference_run(config, overrides, run_dir: Path) -> Path:
    """The uninterrupted run to compare a resumed one with, in this process (no interpreter start-up to
    pay; the configs the resume tests use fix ``model.threads``, so the arithmetic is the child's)."""
    run_experiment(config, [str(o) for o in overrides], run_dir=run_dir)
    return Path(run_dir)


def kill_and_resume(config, overrides, run_dir: Path, kill_at: str = "client:2:1") -> subprocess.CompletedProcess:
    """``fedpeft run --config CONFIG OVERRIDES --run-dir RUN_DIR`` killed by SIGKILL at ``kill_at``
    (``client:ROUND:NTH``, ``checkpoint:ROUND``, ...), then ``fedpeft run --resume RUN_DIR`` in a fresh
    process, which must finish; returns that resumed process. The killed run must have died by the signal
    and left no final adapter."""
    killed = run_cli(["--config", config, *overrides, "--run-dir", run_dir], {KILL_ENV: kill_at})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (Path(run_dir) / "final").exists()
    resumed = run_cli(["--resume", run_dir])
    assert resumed.returncode == 0, resumed.stderr
    return resumed


def final_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "final" / "adapter_model.safetensors"))


def assert_same_tensors(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    """Same names, and every tensor bit-identical (``torch.equal``)."""
    assert want.keys() == got.keys()
    for key, tensor in want.items():
        assert torch.equal(tensor, got[key]), key


def run_events(run_dir: Path, kind: str | None = None) -> list[dict]:
    """The events of RUN_DIR/metrics.jsonl, all or those with ``event == kind``. Strict, unlike the
    library's readers, which skip a line cut by a kill: in a finished run every line must parse."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [e for e in map(json.loads, lines) if kind is None or e["event"] == kind]


def check_fedkseed_bytes(run_dir: Path, steps: int, entry: int, per_plan: int = 0) -> None:
    """FedKSeed's byte formulas on every ``client_train`` event: the upload is ``steps`` entries of ``entry``
    bytes (seed index + float32 g); the download is the history entries the client missed since the round
    it last trained in (it starts in sync with round 1) plus ``per_plan`` bytes every plan carries."""
    synced: dict[int, int] = {}
    per_round: dict[int, int] = {}
    for event in run_events(run_dir, "client_train"):
        r, c = event["round"], event["client"]
        assert event["uplink_bytes"] == steps * entry
        missed = sum(per_round.get(t, 0) for t in range(synced.get(c, 1), r))
        assert event["downlink_bytes"] == missed * entry + per_plan
        synced[c] = r
        per_round[r] = per_round.get(r, 0) + steps
