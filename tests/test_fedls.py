"""FedLS: scores and probabilities as stated, masks that follow them (statistically, fixed seed), only
masked-in modules trained and uploaded, the momentum buffer of each seed variant applied exactly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedpeft.adapters import state_bytes
from fedpeft.strategies.base import ClientUpdate, TrainResult
from fedpeft.strategies.fedls import module_keys, norm_and_entropy, sampling_probabilities, sample_mask
from strategy_fakes import MemoryStore, make

PREFIX = "base_model.model.model.layers.{}.self_attn.q_proj"


def five_module_state(seed=0, zero_b=False):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(5):
        out[f"{PREFIX.format(i)}.lora_A.default.weight"] = torch.randn(2, 3, generator=g)
        out[f"{PREFIX.format(i)}.lora_B.default.weight"] = torch.zeros(4, 2) if zero_b else torch.randn(4, 2, generator=g)
    return out


def train_round(strategy, round_idx, glob, clients=(0, 1, 2), seed=0, sizes=(10, 20, 30)):
    """configure_round, then each client moves its trainable tensors by a seeded random step."""
    plans = strategy.configure_round(round_idx, list(clients), glob, MemoryStore())
    updates = []
    for plan in plans:
        g = torch.Generator().manual_seed(seed * 1000 + round_idx * 10 + plan.client_id)
        trained = {k: v + (0.1 * torch.randn(v.shape, generator=g) if k in plan.trainable else 0) for k, v in glob.items()}
        result = TrainResult(steps=1, examples_seen=1, num_examples=sizes[plan.client_id], mean_loss=1.0,
                             last_loss=1.0, lr=0.1, seconds=0.0)
        updates.append(strategy.client_update(round_idx, plan, trained, result, None))
    return plans, updates, strategy.aggregate(round_idx, glob, updates)


def test_norm_entropy_and_probabilities():
    assert norm_and_entropy([torch.ones(4)]) == pytest.approx((2.0, math.log(4)))
    assert norm_and_entropy([torch.tensor([3.0, 0, 0, 0])]) == pytest.approx((3.0, 0.0))
    assert norm_and_entropy([torch.zeros(3)]) == (0.0, 0.0)
    # s = (l / max l) * (H / max H); p = clip(rho * s, min, max)
    p = sampling_probabilities([1, 2, 4], [1.0, 0.5, 1.0], rho=0.9, min_prob=0.3, max_prob=0.8)
    np.testing.assert_allclose(p, [0.3, 0.3, 0.8])
    p = sampling_probabilities([2, 4], [1.0, 1.0], rho=1.0, min_prob=0.1, max_prob=1.0)
    np.testing.assert_allclose(p, [0.5, 1.0])


def test_masks_follow_the_stated_probabilities_over_many_rounds():
    """Statistics set so p = (0.4, 0.4, 0.6, 0.8, 0.9); 4000 rounds with a fixed seed; each module's
    frequency within 4 standard errors of p_i, pairs independent, and the draw is reproducible."""
    strategy = make("fedls", rho=1.0, min_prob=0.4, max_prob=0.9, seed=11)
    glob = five_module_state()
    modules = list(module_keys(glob))
    strategy.stats = {m: (float(i + 1), 1.0) for i, m in enumerate(modules)}  # s = l / 5
    want = np.array([0.4, 0.4, 0.6, 0.8, 0.9])
    n = 4000
    masks = np.array([[strategy.round_mask(t, glob)[m] for m in modules] for t in range(2, n + 2)], dtype=float)
    np.testing.assert_allclose([strategy.probs[m] for m in modules], want)
    freq = masks.mean(axis=0)
    assert np.all(np.abs(freq - want) < 4 * np.sqrt(want * (1 - want) / n)), freq
    joint = (masks[:, 2] * masks[:, 3]).mean()
    assert abs(joint - 0.6 * 0.8) < 4 * math.sqrt(0.48 * 0.52 / n)
    again = np.array([[strategy.round_mask(t, glob)[m] for m in modules] for t in range(2, 50)], dtype=float)
    np.testing.assert_array_equal(again, masks[:48])
    other = make("fedls", rho=1.0, min_prob=0.4, max_prob=0.9, seed=12)
    other.stats = strategy.stats
    assert not np.array_equal([[other.round_mask(t, glob)[m] for m in modules] for t in range(2, 50)], again)


def test_mask_is_never_empty():
    """A draw that selects nothing takes the most probable module (the first on ties)."""
    assert sample_mask(np.array([0.0, 0.0, 0.0]), seed=0, round_idx=1).tolist() == [True, False, False]
    assert sample_mask(np.array([0.0, 1e-9, 0.0]), seed=0, round_idx=1).tolist() == [False, True, False]
    assert all(sample_mask(np.full(4, 0.01), seed=0, round_idx=t).sum() >= 1 for t in range(100))


def test_round_one_trains_everything_then_only_the_mask_is_trained_and_uploaded():
    strategy = make("fedls", min_prob=0.5, max_prob=0.5, seed=3)
    glob = strategy.init_global(five_module_state(zero_b=True))
    plans, updates, agg = train_round(strategy, 1, glob)
    assert all(set(p.trainable) == set(glob) == set(p.upload) for p in plans)
    assert agg.metrics["uplink_ratio"] == 1.0
    glob = agg.global_state
    for t in range(2, 6):
        plans, updates, agg = train_round(strategy, t, glob)
        trained = set(plans[0].trainable)
        assert all(set(p.trainable) == trained == set(p.upload) for p in plans)  # one mask for all clients
        assert all(set(u.tensors) == trained for u in updates)  # untrained modules are not in the uplink
        assert agg.metrics["uplink_ratio"] == pytest.approx(state_bytes({k: glob[k] for k in trained}) / state_bytes(glob))
        assert agg.metrics["uplink_bytes_per_client"] == state_bytes(updates[0].tensors)
        # modules come whole: A and B together
        assert {k.rsplit(".lora_", 1)[0] for k in trained} == {k.rsplit(".lora_", 1)[0] for k in trained if ".lora_A." in k}
        glob = agg.global_state


def _mixed_round(strategy, glob, start=2):
    """The first round index >= start whose mask trains some modules and leaves others out."""
    for t in range(start, start + 200):
        mask = strategy.round_mask(t, glob)
        if 0 < sum(mask.values()) < len(mask):
            return t
    raise AssertionError("no mixed mask")


@pytest.mark.parametrize("variant,beta,mu", [("all_momentum", 0.05, 0.5), ("left_out_momentum", 0.1, 0.8),
                                             ("no_momentum", 0.0, 0.0)])
@pytest.mark.parametrize("momentum_delta", ["last", "round"])
def test_momentum_update_of_each_variant_is_exact(variant, beta, mu, momentum_delta):
    strategy = make("fedls", variant=variant, min_prob=0.5, max_prob=0.5, seed=5, momentum_delta=momentum_delta)
    glob0 = strategy.init_global(five_module_state(zero_b=True))
    _, updates1, agg1 = train_round(strategy, 1, glob0)
    glob1 = agg1.global_state
    weights = np.array([10, 20, 30]) / 60
    avg1 = {k: sum(float(w) * u.tensors[k] for w, u in zip(weights, updates1)) for k in glob0}
    delta1 = {k: avg1[k] - glob0[k] for k in glob0}
    for k in glob0:  # first round: theta = average, buffer = Delta
        torch.testing.assert_close(glob1[k], avg1[k])
        torch.testing.assert_close(strategy.buffer[k], delta1[k])
    t = _mixed_round(strategy, glob1)
    b1 = {k: v.clone() for k, v in strategy.buffer.items()}
    plans, updates2, agg2 = train_round(strategy, t, glob1, seed=1)
    trained = set(plans[0].trainable)
    assert trained and trained != set(glob1)
    avg2 = {k: sum(float(w) * u.tensors[k] for w, u in zip(weights, updates2)) for k in trained}
    for k in glob1:
        got = agg2.global_state[k]
        if k in trained:
            d = avg2[k] - glob1[k]
            if variant == "all_momentum":
                torch.testing.assert_close(got, avg2[k] + beta * b1[k])
                torch.testing.assert_close(strategy.buffer[k], mu * b1[k] + (1 - mu) * d)
            else:
                torch.testing.assert_close(got, avg2[k])
                torch.testing.assert_close(strategy.buffer[k], b1[k])
        else:
            # masked out: exactly the momentum update (or nothing), no client contribution
            d = delta1[k] if momentum_delta == "last" else torch.zeros_like(b1[k])
            if variant == "no_momentum":
                assert torch.equal(got, glob1[k])
                torch.testing.assert_close(strategy.buffer[k], b1[k])
            else:
                torch.testing.assert_close(got, glob1[k] + beta * b1[k], rtol=0, atol=1e-7)
                torch.testing.assert_close(strategy.buffer[k], mu * b1[k] + (1 - mu) * d)


def test_scores_come_from_the_last_aggregated_update():
    strategy = make("fedls", seed=0)
    glob = strategy.init_global(five_module_state(zero_b=True))
    _, updates, agg = train_round(strategy, 1, glob)
    for m, keys in module_keys(glob).items():
        want = norm_and_entropy([agg.global_state[k] - glob[k] for k in keys])
        assert strategy.stats[m] == pytest.approx(want)


def test_composes_with_a_server_optimizer_on_trained_modules_only():
    strategy = make("fedls", server_optimizer="fedadam", variant="left_out_momentum", min_prob=0.5, max_prob=0.5, seed=5)
    glob = strategy.init_global(five_module_state(zero_b=True))
    _, _, agg = train_round(strategy, 1, glob)
    glob1 = agg.global_state
    t = _mixed_round(strategy, glob1)
    m_before = {k: v.clone() for k, v in strategy.server_optimizer.m.items()}
    b1 = {k: v.clone() for k, v in strategy.buffer.items()}
    plans, _, agg2 = train_round(strategy, t, glob1, seed=2)
    trained = set(plans[0].trainable)
    for k in glob1:
        if k in trained:
            assert not torch.equal(strategy.server_optimizer.m[k], m_before[k])
        else:
            assert torch.equal(strategy.server_optimizer.m[k], m_before[k])
            torch.testing.assert_close(agg2.global_state[k], glob1[k] + 0.1 * b1[k], rtol=0, atol=1e-7)


def test_state_round_trip_reproduces_the_next_round():
    import io

    a = make("fedls", seed=9, min_prob=0.3, max_prob=0.7)
    glob = a.init_global(five_module_state(zero_b=True))
    for t in (1, 2):
        glob = train_round(a, t, glob)[2].global_state
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make("fedls", seed=9, min_prob=0.3, max_prob=0.7)
    b.load_state_dict(torch.load(buf, weights_only=False))
    ra, rb = train_round(a, 3, glob)[2], train_round(b, 3, glob)[2]
    for k in glob:
        assert torch.equal(ra.global_state[k], rb.global_state[k])


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="variant"):
        make("fedls", variant="heavy")
    with pytest.raises(ValueError, match="min_prob"):
        make("fedls", min_prob=0.9, max_prob=0.5)


def test_engine_runs_fedls_on_the_tiny_model(tmp_path):
    from fedpeft.federation.engine import run_experiment

    summary = run_experiment("configs/tiny.yaml", [
        "method.name=fedls", "method.options.min_prob=0.3", "method.options.max_prob=0.6",
        "federation.rounds=3", "evaluation.every_rounds=0", "evaluation.before_training=false",
    ], run_dir=tmp_path / "run")
    events = [json.loads(x) for x in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    full = next(e for e in events if e["event"] == "run_start")["adapter_bytes"]
    agg = {e["round"]: e for e in events if e["event"] == "aggregate"}
    assert agg[1]["uplink_ratio"] == 1.0 and agg[1]["modules_trained"] == agg[1]["modules_total"] == 4
    for e in events:
        if e["event"] == "client_train":
            assert e["uplink_bytes"] == round(agg[e["round"]]["uplink_ratio"] * full)
            assert e["downlink_bytes"] == full
    assert not [e for e in events if e["event"] == "client_failed"]
