"""A DP run killed mid-round and resumed reports the same epsilon, the same adaptive clip norms and
the same final adapter as the uninterrupted run (the accountant and clip state are in the checkpoint;
the noise is drawn from derived seeds). Harness as in tests/test_resume.py: FEDPEFT_KILL_AT SIGKILLs."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedpeft.federation.engine import KILL_ENV

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
OVERRIDES = ["federation.rounds=2", "evaluation.before_training=false", "output.report=false",
             "privacy.mode=central", "privacy.noise_multiplier=1.0", "privacy.clip_norm=0.05",
             "privacy.adaptive_clipping.enabled=true", "privacy.adaptive_clipping.count_noise_std=1.0"]


def _run(args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "fedpeft", "run", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def _privacy(run_dir):
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in e.items() if k != "time"} for e in events if e["event"] == "privacy"]


def test_kill_and_resume_gives_the_same_epsilon_and_adapter(tmp_path):
    ref = tmp_path / "ref"
    proc = _run(["--config", str(CONFIG), "--run-dir", str(ref), *OVERRIDES])
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    killed = _run(["--config", str(CONFIG), "--run-dir", str(run), *OVERRIDES], {KILL_ENV: "client:2:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = _run(["--resume", str(run)])
    assert resumed.returncode == 0, resumed.stderr
    expected = _privacy(ref)
    assert [e["round"] for e in expected] == [1, 2]
    assert len({e["clip_norm"] for e in expected}) == 2  # the adaptive clip moved every round
    assert _privacy(run) == expected  # epsilon, clip norms, noisy counts: identical
    a = load_file(str(ref / "final" / "adapter_model.safetensors"))
    b = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert f"epsilon {expected[-1]['epsilon']:.3f}" in resumed.stdout + resumed.stderr
