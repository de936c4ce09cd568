"""Client-level DP through the engine (tiny model, in process): the accountant's epsilon per round in
metrics.jsonl equals an independent computation, each client's upload stays within C of the global state,
the budget stops a run before it is exceeded, and the summary carries epsilon."""

from __future__ import annotations

import json

import pytest
import torch
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file

from fedpeft.config import load_config
from fedpeft.federation.engine import run_experiment
from fedpeft.privacy.accountant import ORDERS
from fedpeft.report import write_report

BASE = ["federation.rounds=3", "evaluation.before_training=false", "evaluation.every_rounds=0", "output.report=false"]


def _events(run_dir, kind):
    return [e for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]


def _opacus_epsilon(z, q, steps, delta):
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=z, sample_rate=q)
    return accountant.get_epsilon(delta=delta, alphas=list(ORDERS))


def test_central_dp_logs_epsilon_per_round(tmp_path):
    cfg = load_config("configs/tiny.yaml", BASE + ["privacy.mode=central", "privacy.noise_multiplier=1.2",
                                                   "privacy.clip_norm=0.05"])
    summary = run_experiment(cfg, run_dir=tmp_path / "run")
    events = _events(summary.run_dir, "privacy")
    assert [e["round"] for e in events] == [1, 2, 3]
    q = 2 / 4  # clients_per_round / num_clients of configs/tiny.yaml
    for e in events:
        assert e["epsilon"] == pytest.approx(_opacus_epsilon(1.2, q, e["round"], 1e-5), rel=1e-9)
    assert summary.privacy["epsilon"] == events[-1]["epsilon"]
    [end] = _events(summary.run_dir, "run_end")
    assert end["privacy"]["epsilon"] == events[-1]["epsilon"]
    report = write_report(summary.run_dir).read_text()  # epsilon per round, epsilon vs round / metric plot
    assert "## Differential privacy" in report and f"epsilon = {events[-1]['epsilon']:.4g}" in report
    assert (summary.run_dir / "report" / "privacy.png").is_file()


def test_uploads_are_clipped_and_weighted_equally(tmp_path):
    """Local DP with tiny noise: the global change of a round is the mean of the clients' clipped changes,
    so its norm is at most C (the mean of vectors of norm <= C), plus the noise."""
    clip = 0.02
    cfg = load_config("configs/tiny.yaml", BASE + ["federation.rounds=1", "privacy.mode=local",
                                                   "privacy.noise_multiplier=1e-9", f"privacy.clip_norm={clip}",
                                                   "method.name=ffa_lora"])
    no_dp = load_config("configs/tiny.yaml", BASE + ["federation.rounds=1", "method.name=ffa_lora"])
    summary = run_experiment(cfg, run_dir=tmp_path / "dp")
    plain = run_experiment(no_dp, run_dir=tmp_path / "plain")
    # The initial B is zero (PEFT's init), so the final B is the round's change.
    dp_b = {k: v for k, v in load_file(str(summary.run_dir / "final" / "adapter_model.safetensors")).items() if "lora_B" in k}
    plain_b = {k: v for k, v in load_file(str(plain.run_dir / "final" / "adapter_model.safetensors")).items() if "lora_B" in k}
    norm = lambda s: float(torch.cat([v.double().flatten() for v in s.values()]).norm())  # noqa: E731
    assert norm(plain_b) > 5 * clip  # without DP the change is much larger: clipping did something
    assert norm(dp_b) <= clip * (1 + 1e-5)
    [event] = _events(summary.run_dir, "privacy")
    assert event["mode"] == "local" and event["sample_rate"] == 1.0


def test_budget_stops_before_it_is_exceeded(tmp_path):
    q = 0.5
    after2, after3 = _opacus_epsilon(1.0, q, 2, 1e-5), _opacus_epsilon(1.0, q, 3, 1e-5)
    budget = (after2 + after3) / 2
    cfg = load_config("configs/tiny.yaml", BASE + ["privacy.mode=central", "privacy.noise_multiplier=1.0",
                                                   f"privacy.max_epsilon={budget}"])
    summary = run_experiment(cfg, run_dir=tmp_path / "run")
    assert summary.rounds == 2 and (summary.run_dir / "final").is_dir()
    [stop] = _events(summary.run_dir, "privacy_budget_stop")
    assert stop["round"] == 3 and "privacy.max_epsilon" in stop["reason"]
    assert summary.privacy["epsilon"] == pytest.approx(after2, rel=1e-9) and summary.privacy["epsilon"] <= budget


def test_target_epsilon_calibrates_the_noise(tmp_path):
    cfg = load_config("configs/tiny.yaml", BASE + ["privacy.mode=distributed", "privacy.target_epsilon=8"])
    summary = run_experiment(cfg, run_dir=tmp_path / "run")
    events = _events(summary.run_dir, "privacy")
    assert events[-1]["epsilon"] <= 8 and events[-1]["epsilon"] == pytest.approx(8, rel=0.01)
    assert events[-1]["noise_multiplier"] == events[0]["noise_multiplier"]


def test_dp_sgd_run_accounts_each_client(tmp_path):
    """Record-level DP through the engine: each client's epsilon composes its local steps at q = batch / n_k."""
    cfg = load_config("configs/tiny.yaml", BASE + ["privacy.dp_sgd.enabled=true", "privacy.dp_sgd.delta=1e-3",
                                                   "privacy.dp_sgd.noise_multiplier=1.3"])
    summary = run_experiment(cfg, run_dir=tmp_path / "run")
    [partition] = _events(summary.run_dir, "partition")
    records = {c["client"]: c["examples"] for c in partition["clients"]}
    steps: dict[int, int] = {}
    for e in _events(summary.run_dir, "client_train"):
        steps[e["client"]] = steps.get(e["client"], 0) + e["steps"]
    expected = {c: _opacus_epsilon(1.3, 4 / records[c], s, 1e-3) for c, s in steps.items()}  # batch_size 4
    last = _events(summary.run_dir, "privacy")[-1]
    assert last["dp_sgd_epsilon_max"] == pytest.approx(max(expected.values()), rel=1e-9)
    assert last["dp_sgd_clients"] == len(expected)
    assert summary.privacy["dp_sgd_epsilon_max"] == last["dp_sgd_epsilon_max"]
