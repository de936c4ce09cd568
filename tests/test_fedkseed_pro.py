"""FedKSeed-Pro (``method.options.seed_sampling: pro``): the sampling distribution is the softmax of the
min-max normalised mean clipped |g| per seed, the clients' picks follow it, it travels (metered) with the
plan, and it survives a kill and resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedpeft.adapters import get_adapter_state
from fedpeft.config import ConfigError, load_config
from fedpeft.federation.engine import run_experiment
from fedpeft.models.registry import tiny_llama
from fedpeft.strategies.base import ClientUpdate
from fedpeft.strategies.fedkseed import (
    G_KEY,
    INDEX_KEY,
    PROBS_KEY,
    FedKSeed,
    pick_seed,
    sampling_cdf,
    seed_probabilities,
)
from helpers import TINY_CONFIG, check_fedkseed_bytes, kill_and_resume, reference_run, run_events


def _pro(**options) -> FedKSeed:
    strategy = FedKSeed(options={"seed": 5, "k": 8, "seed_sampling": "pro", **options})
    strategy.round_lr = 1e-3
    return strategy


def _upload(client, pairs, n=10):
    idx, g = zip(*pairs)
    return ClientUpdate(client, {INDEX_KEY: torch.tensor(idx, dtype=torch.uint8),
                                 G_KEY: torch.tensor(g, dtype=torch.float32)}, n)


def _expected(history: dict[int, list[float]], k: int, clip: float, initial: float) -> list[float]:
    """Independent: each seed's list [initial, g...], mean of |clip(.)|, min-max to [0, 1], softmax."""
    means = []
    for j in range(k):
        values = [initial] + history.get(j, [])
        means.append(sum(abs(max(-clip, min(clip, v))) for v in values) / len(values))
    lo, hi = min(means), max(means)
    norm = [(m - lo) / (hi - lo) if hi > lo else 0.0 for m in means]
    z = sum(math.exp(x) for x in norm)
    return [math.exp(x) / z for x in norm]


def test_probabilities_equal_an_independent_computation_from_a_known_history():
    strategy = _pro(pro_clip=3.0, pro_initial=0.5)
    model, _ = tiny_llama(layers=1)
    strategy.prepare_model(get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")))
    assert np.allclose(strategy.probabilities(), 1 / 8, rtol=0, atol=1e-15)  # nothing seen yet: uniform
    rounds = [[_upload(0, [(1, 2.0), (3, -10.0)]), _upload(1, [(1, -0.25), (6, 0.0)])],
              [_upload(0, [(3, 1.5), (7, -4.0), (1, 0.125)])]]
    history: dict[int, list[float]] = {}
    for r, updates in enumerate(rounds, 1):
        strategy.aggregate(r, get_adapter_state(strategy.model), updates)
        for u in updates:
            for j, g in zip(u.tensors[INDEX_KEY].tolist(), u.tensors[G_KEY].tolist()):
                history.setdefault(j, []).append(g)
    expected = _expected(history, 8, clip=3.0, initial=0.5)
    assert strategy.probabilities().tolist() == pytest.approx(expected, rel=1e-12, abs=0)
    # Seed 7's list [0.5, |-4| clipped to 3] has the largest mean (1.75; seed 3: [0.5, 3, 1.5] -> 1.67), seed 6's
    # [0.5, 0] the smallest: they get the largest and the smallest probability, in ratio e.
    p = strategy.probabilities()
    assert np.argmax(p) == 7 and np.argmin(p) == 6 and p[7] / p[6] == pytest.approx(math.e)
    # The plan carries exactly these, as float32, metered as downlink (K x 4 bytes).
    plan = strategy.configure_client(3, 2, get_adapter_state(strategy.model), None)
    assert plan.control[PROBS_KEY].dtype == torch.float32 and plan.control[PROBS_KEY].numel() == 8
    assert plan.control[PROBS_KEY].tolist() == pytest.approx(expected, rel=1e-6)


def test_picks_follow_a_skewed_distribution():
    k = 8
    abs_sum = np.array([0.1, 0.1, 5.0, 0.1, 2.0, 0.1, 0.1, 0.1])  # one value each, two seeds stand out
    p = seed_probabilities(abs_sum, np.ones(k))
    assert p[2] / p[0] == pytest.approx(math.e) and p[2] > p[4] > p[0]
    cdf = sampling_cdf(torch.from_numpy(p).float(), k)
    picks = np.random.default_rng(0)
    n = 40000
    counts = np.bincount([pick_seed(picks, k, cdf) for _ in range(n)], minlength=k)
    sigma = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(counts / n - p) < 5 * sigma), (counts / n, p)


def test_a_client_draws_only_seeds_with_probability():
    cdf = sampling_cdf(torch.tensor([0.0, 0.0, 1.0, 0.0]), 4)
    picks = np.random.default_rng(3)
    assert {pick_seed(picks, 4, cdf) for _ in range(200)} == {2}
    with pytest.raises(ValueError, match=PROBS_KEY):
        sampling_cdf(torch.tensor([0.5, -0.1, 0.6]), 3)


def test_uniform_mode_sends_nothing_extra_and_keeps_no_pro_state():
    strategy = FedKSeed(options={"seed": 5, "k": 8})
    assert strategy.opts.seed_sampling == "uniform"
    plan = strategy.configure_client(1, 0, {}, None)
    assert PROBS_KEY not in plan.control and "pro_abs_sum" not in strategy.state_dict()
    with pytest.raises(ConfigError, match="method.options.pro_clip"):
        load_config("configs/tiny.yaml", ["method.name=fedkseed", "method.options.pro_clip=0"])


# --- through the engine -----------------------------------------------------------------------------
def test_engine_downlink_carries_the_probabilities_every_round(tmp_path):
    steps, k = 3, 300
    run_experiment("configs/tiny.yaml", ["method.name=fedkseed", f"method.options.k={k}",
                                         "method.options.seed_sampling=pro", "federation.rounds=3",
                                         f"federation.local_steps={steps}", "evaluation.every_rounds=0",
                                         "evaluation.before_training=false"], run_dir=tmp_path / "run")
    entry = 2 + 4  # int16 index (K = 300) + float32 scalar
    check_fedkseed_bytes(tmp_path / "run", steps, entry, per_plan=k * 4)  # + K float32 probabilities
    aggregates = run_events(tmp_path / "run", "aggregate")
    assert aggregates[-1]["seed_prob_max"] > aggregates[-1]["seed_prob_min"]


def test_kill_and_resume_sends_the_same_probabilities(tmp_path):
    overrides = ["method.name=fedkseed", "method.options.k=16",
                 "method.options.seed_sampling=pro", "federation.rounds=2", "federation.local_steps=4",
                 "training.lr=0.01", "evaluation.every_rounds=0"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    reference_run(TINY_CONFIG, overrides, ref)
    kill_and_resume(TINY_CONFIG, overrides, killed, "client:2:1")
    # Round 2's picks depend on the history of round 1 restored from the checkpoint.
    train = lambda d: [(e["round"], e["client"], e["losses"]) for e in run_events(d, "client_train")]
    assert train(ref) == train(killed)
    agg = lambda d: [(e["seed_prob_max"], e["seed_prob_min"], e["distinct_seeds"]) for e in run_events(d, "aggregate")]
    assert agg(ref) == agg(killed)
    assert [e["metrics"] for e in run_events(ref, "eval")] == [e["metrics"] for e in run_events(killed, "eval")]
