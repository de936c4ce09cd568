"""fedpeft sweep: the grid is exactly the product, random points are seeded, successive halving promotes
the top 1/eta (checked with a fake objective), bad specs are refused naming the key, and a killed sweep
resumes without rerunning finished trials (an interrupted trial continues from its checkpoint)."""

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import fedpeft.strategies  # noqa: F401  (the method check of every trial config)
from fedpeft.config import ConfigError
from fedpeft.sweep.halving import promote, rung_rounds, successive_halving
from fedpeft.sweep.results import rank_correlation
from fedpeft.sweep.runner import KILL_ENV as SWEEP_KILL_ENV, SweepRunner
from fedpeft.sweep.space import random_points
from fedpeft.sweep.spec import load_sweep
from fedpeft.federation.engine import KILL_ENV

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


def _spec(tmp_path, **fields):
    data = {"base": TINY, "overrides": ["federation.rounds=1", "evaluation.before_training=false"], **fields}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --- points ----------------------------------------------------------------------------------------------
def test_grid_enumerates_exactly_the_product(tmp_path):
    space = {"training.lr": [0.01, 0.003, 0.001], "peft.r": [2, 4], "federation.local_steps": [1, 3]}
    sweep = load_sweep(_spec(tmp_path, strategy="grid", space=space))
    expected = [{"training.lr": a, "peft.r": b, "federation.local_steps": c}
                for a in space["training.lr"] for b in space["peft.r"] for c in space["federation.local_steps"]]
    assert sweep.points == expected and len(sweep.points) == 12
    # each trial's validated config carries its point, the rest of the base unchanged
    for point, cfg in zip(sweep.points, sweep.configs):
        assert (cfg.training.lr, cfg.peft.r, cfg.federation.local_steps) == tuple(point.values())
        assert cfg.model.name == "tiny-llama" and cfg.federation.rounds == 1


def test_random_points_are_seeded_and_within_bounds():
    space = {"training.lr": {"loguniform": [1e-4, 1e-2]}, "peft.r": {"choice": [2, 4, 8]},
             "federation.local_steps": {"int": [1, 3]}, "peft.dropout": {"uniform": [0.0, 0.2]}}
    a, b = random_points(space, 50, seed=7), random_points(space, 50, seed=7)
    assert a == b
    assert a != random_points(space, 50, seed=8)
    assert all(1e-4 <= p["training.lr"] <= 1e-2 and p["peft.r"] in (2, 4, 8) and 0.0 <= p["peft.dropout"] <= 0.2
               for p in a)
    assert {p["federation.local_steps"] for p in a} == {1, 2, 3}  # both ends of int included
    # log-uniform: about half the draws below the geometric midpoint 1e-3 (not the arithmetic one)
    below = sum(p["training.lr"] < 1e-3 for p in random_points(space, 400, seed=1))
    assert 150 < below < 250


# --- successive halving with a fake objective --------------------------------------------------------------
def test_halving_promotes_the_top_one_over_eta():
    calls = []

    def objective(trial, rounds):  # a pure function: trial 5 best, quality grows with rounds
        calls.append((trial, rounds))
        return abs(trial - 5) + 10.0 / rounds

    result = successive_halving(list(range(8)), objective, min_rounds=1, eta=2, lower_is_better=True)
    assert result.rounds == [1, 2, 4, 8]
    rung_trials = [sorted(rung) for rung in result.rungs]
    # independent ranking: sort by distance to 5, ties by index; keep floor(n / 2)
    by_distance = sorted(range(8), key=lambda t: (abs(t - 5), t))
    assert rung_trials[0] == list(range(8))
    assert rung_trials[1] == sorted(by_distance[:4]) == [3, 4, 5, 6]
    assert rung_trials[2] == sorted(by_distance[:2]) == [4, 5]
    assert rung_trials[3] == [5] and result.best == 5
    assert calls == [(t, 1) for t in range(8)] + [(t, 2) for t in (3, 4, 5, 6)] + [(4, 4), (5, 4), (5, 8)]


def test_halving_eta3_higher_is_better_and_max_rounds():
    scores = {i: s for i, s in enumerate([0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7, 0.4, 0.6])}
    assert promote(scores, 3, lower_is_better=False) == [1, 4, 6]
    assert promote({0: math.nan, 1: 0.2, 2: 0.1}, 2, lower_is_better=True) == [2]  # a failed trial ranks last
    assert rung_rounds(2, 3, None, 9) == [2, 6, 18]
    assert rung_rounds(2, 3, 10, 9) == [2, 6]


def test_rank_correlation_against_hand_computation():
    # ranks x: 1 2 3 4, ranks y: 4 3 1 2 -> d = -3 -1 2 2, sum d^2 = 18, rho = 1 - 6*18/(4*15) = -0.8
    assert rank_correlation([0.1, 0.2, 0.3, 0.4], [0.9, 0.5, 0.1, 0.3]) == pytest.approx(-0.8)
    assert rank_correlation([0.1, 0.2, 0.3], [0.0, 0.0, 0.0]) is None  # one side constant


# --- bad specs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, words", [
    ({"strategy": "grid", "space": {"training.lrr": [0.1]}}, ["training.lrr", "training.lr"]),
    ({"strategy": "grid", "space": {"federation.num_client": [2]}}, ["federation.num_client", "federation.num_clients"]),
    ({"strategy": "grid", "space": {}}, ["space", "empty"]),
    ({"strategy": "bayes", "space": {"training.lr": [0.1]}}, ["strategy", "bayes", "grid, random, halving"]),
    ({"strategy": "random", "space": {"training.lr": [0.1]}}, ["n_trials"]),
    ({"strategy": "grid", "space": {"training.lr": {"loguniform": [1e-4, 1e-2]}}}, ["training.lr", "grid"]),
    ({"strategy": "grid", "space": {"training.lr": {"normal": [0, 1]}}}, ["training.lr", "normal", "loguniform"]),
    ({"strategy": "grid", "space": {"training.lr": [0.01, -1.0]}}, ["training.lr", "-1.0"]),
])
def test_bad_specs_name_the_field(tmp_path, fields, words):
    with pytest.raises((ConfigError, ValueError)) as err:
        load_sweep(_spec(tmp_path, **fields))
    for word in words:
        assert word in str(err.value)


# --- the runner with a fake trial: halving rows, memoised results, a changed spec refused -----------------
def test_runner_halving_with_fake_trials_and_no_rerun(tmp_path):
    spec = _spec(tmp_path, strategy="halving", space={"training.lr": [0.01, 0.02, 0.03, 0.04]},
                 halving={"min_rounds": 1, "eta": 2})
    ran = []

    def fake_trial(config, run_dir):  # best lr 0.03; the metric rises with rounds
        ran.append((config.training.lr, config.federation.rounds))
        run_dir.mkdir(parents=True)
        metric = 1.0 - abs(config.training.lr - 0.03) * 10 + config.federation.rounds / 100
        return {"final_metrics": {"exact_match": metric}, "seconds": 0.0, "val_loss": 1.0 - metric}

    result = SweepRunner(load_sweep(spec), tmp_path / "sw", fake_trial).run()
    assert ran == [(0.01, 1), (0.02, 1), (0.03, 1), (0.04, 1), (0.02, 2), (0.03, 2), (0.03, 4)]
    assert [r["trial"] for r in result["rows"]] == ["t000-r1", "t001-r1", "t002-r1", "t003-r1", "t001-r2",
                                                    "t002-r2", "t002-r4"]
    assert result["best"]["trial"] == "t002-r4"
    assert result["spearman"] == pytest.approx(-1.0)  # val_loss = 1 - metric: perfectly opposite ranks
    text = (tmp_path / "sw" / "results.md").read_text()
    assert "val_loss" in text and "exact_match" in text and "-1.000" in text
    assert (tmp_path / "sw" / "results.csv").read_text().count("\n") == 8 and (tmp_path / "sw" / "sweep.png").is_file()
    ran.clear()
    SweepRunner(load_sweep(spec), tmp_path / "sw", fake_trial).run()  # everything recorded: nothing reruns
    assert ran == []
    other = _spec(tmp_path, strategy="halving", space={"training.lr": [0.01, 0.05]})
    with pytest.raises(ConfigError, match="another spec"):
        SweepRunner(load_sweep(other), tmp_path / "sw", fake_trial)


# --- a real sweep, killed twice, resumed -------------------------------------------------------------------
def _sweep(spec, out, env_extra):
    env = {**os.environ, **env_extra}
    env.pop(KILL_ENV, None) if KILL_ENV not in env_extra else None
    return subprocess.run([sys.executable, "-m", "fedpeft", "sweep", str(spec), "--dir", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)


def _run_starts(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "run_start"]


def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    spec = _spec(tmp_path, strategy="grid", space={"training.lr": [0.01, 0.005, 0.001]},
                 overrides=["federation.rounds=2", "evaluation.before_training=false", "evaluation.every_rounds=0"])
    out = tmp_path / "sw"
    first = _sweep(spec, out, {SWEEP_KILL_ENV: "after:t000"})  # killed once t000 is recorded
    assert first.returncode == -9, first.stderr[-2000:]
    second = _sweep(spec, out, {KILL_ENV: "client:2:1"})  # t001 killed inside its round 2
    assert second.returncode == -9, second.stderr[-2000:]
    state = json.loads((out / "sweep_state.json").read_text())
    assert sorted(state["trials"]) == ["t000"]
    third = _sweep(spec, out, {})
    assert third.returncode == 0, third.stderr[-2000:]
    trials = out / "trials"
    assert sorted(p.name for p in trials.iterdir()) == ["t000", "t001", "t002"]
    assert len(_run_starts(trials / "t000")) == 1  # finished before the kills: never rerun
    starts = _run_starts(trials / "t001")
    assert [s["resumed_from_round"] for s in starts] == [0, 1]  # continued from its round-1 checkpoint
    assert len(_run_starts(trials / "t002")) == 1
    rows = list(itertools.islice((out / "results.csv").read_text().splitlines(), 1, None))
    assert [r.split(",")[0] for r in rows] == ["t000", "t001", "t002"]
    assert all(math.isfinite(float(r.split(",")[3])) for r in rows)  # a validation loss per trial


def test_stopped_trial_is_reported_and_not_retried_and_one_sweep_per_directory(tmp_path):
    from fedpeft.federation.run_dir import RunDirError
    from fedpeft.federation.transport import RunStopped

    spec = _spec(tmp_path, strategy="grid", space={"training.lr": [0.01, 0.02]})
    ran = []

    def trial(config, run_dir):
        ran.append(config.training.lr)
        if config.training.lr == 0.01:
            raise RunStopped("round 1: no client update was accepted")
        return {"final_metrics": {"exact_match": 0.5}, "seconds": 0.0, "val_loss": 2.0}

    runner = SweepRunner(load_sweep(spec), tmp_path / "sw", trial)
    with pytest.raises(RunDirError, match="in use"):
        SweepRunner(load_sweep(spec), tmp_path / "sw", trial)
    result = runner.run()
    assert [(r["trial"], r["status"], r["metric"]) for r in result["rows"]] == [("t000", "stopped", None),
                                                                               ("t001", "finished", 0.5)]
    assert result["best"]["trial"] == "t001"
    SweepRunner(load_sweep(spec), tmp_path / "sw", trial).run()  # the lock was released; nothing reruns
    assert ran == [0.01, 0.02]


def test_cli_refuses_an_unknown_space_key_before_any_trial(tmp_path):
    from typer.testing import CliRunner

    from fedpeft.cli import app

    spec = _spec(tmp_path, strategy="grid", space={"training.lrr": [0.1]})
    result = CliRunner().invoke(app, ["sweep", str(spec), "--dir", str(tmp_path / "sw")])
    assert result.exit_code == 2
    assert "training.lrr" in result.output and "did you mean 'training.lr'" in result.output
    assert not (tmp_path / "sw").exists()
