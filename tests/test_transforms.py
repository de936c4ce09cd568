"""Update transforms (optax's shape): each against an independent computation of what it states."""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft.metering.compression import max_error, payload_bytes
from fedpeft.strategies.transforms import (
    add_gaussian_noise,
    apply_updates,
    chain,
    clip_by_global_norm,
    compress,
    load_state_fields,
    scale,
    scale_by_adam,
    state_fields,
    trace,
)


def upd(**values):
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}


def test_chain_applies_in_order_and_keeps_one_state_per_transform():
    t = chain(trace(0.5), scale(2.0))
    state = t.init({})
    assert isinstance(state, tuple) and len(state) == 2
    out1, state = t.update(upd(w=[1.0, -2.0]), state)
    out2, state = t.update(upd(w=[3.0, 0.0]), state)
    # m1 = u1, m2 = 0.5 m1 + u2; output 2 m
    assert out1["w"].tolist() == [2.0, -4.0]
    assert out2["w"].tolist() == [2 * (0.5 * 1 + 3), 2 * (0.5 * -2 + 0)]


def test_update_is_pure():
    t = scale_by_adam(0.9, 0.99, 1e-3)
    state0 = t.init({})
    u = upd(w=[1.0, 2.0])
    _, state1 = t.update(u, state0)
    assert state0 == {"m": {}, "v": {}} and u["w"].tolist() == [1.0, 2.0]
    again, _ = t.update(u, state0)  # the old state still gives the same step
    first, _ = t.update(u, state0)
    assert torch.equal(again["w"], first["w"]) and set(state1["m"]) == {"w"}


def test_partial_updates_step_only_their_keys():
    t = trace(0.9)
    _, s = t.update(upd(a=[1.0]), t.init({}))
    _, s2 = t.update(upd(b=[2.0]), s)
    assert torch.equal(s2["m"]["a"], s["m"]["a"]) and s2["m"]["b"].tolist() == [2.0]
    with pytest.raises(ValueError, match="tensor 'a' changed shape"):
        t.update(upd(a=[1.0, 2.0]), s2)


def test_clip_by_global_norm_scales_the_whole_update_to_the_bound():
    u = upd(a=[3.0, 0.0], b=[[0.0], [4.0]])  # global norm 5
    out, _ = clip_by_global_norm(2.5).update(u, {})
    assert out["a"].tolist() == [1.5, 0.0] and out["b"].tolist() == [[0.0], [2.0]]
    norm = math.sqrt(sum(float(v.pow(2).sum()) for v in out.values()))
    assert norm == pytest.approx(2.5)
    same, _ = clip_by_global_norm(10.0).update(u, {})  # inside the ball: unchanged
    assert all(torch.equal(same[k], u[k]) for k in u)
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        clip_by_global_norm(0.0)


def test_gaussian_noise_has_the_stated_spread_and_is_reproducible_from_its_seed():
    t = add_gaussian_noise(2.0, seed=7)
    zeros = {"a": torch.zeros(200_000), "b": torch.zeros(50)}
    out, state = t.update(zeros, t.init({}))
    x = out["a"].double()
    # sample std of 200k N(0, 4) draws: within 1 % of 2 (its standard error is about 0.16 %)
    assert float(x.std()) == pytest.approx(2.0, rel=0.01) and abs(float(x.mean())) < 0.02
    assert state == {"noise_count": 1}
    again, _ = t.update(zeros, t.init({}))
    assert torch.equal(again["a"], out["a"])  # same seed, same call index: same noise
    nxt, state2 = t.update(zeros, state)
    assert not torch.equal(nxt["a"], out["a"]) and state2 == {"noise_count": 2}  # a new call draws anew
    assert not torch.equal(out["a"][:50], out["b"])  # keys draw apart
    other, _ = add_gaussian_noise(2.0, seed=8).update(zeros, {"noise_count": 0})
    assert not torch.equal(other["a"], out["a"])
    # resume: the state saved as fields and loaded into a fresh init draws what the running one draws
    resumed = load_state_fields(t.init({}), state_fields(state))
    assert torch.equal(t.update(zeros, resumed)[0]["a"], nxt["a"])


def test_clip_then_noise_is_the_gaussian_mechanism():
    """DP composition: clip to C, add N(0, (z C)^2); the difference from the clipped update is the noise alone."""
    c, z = 1.0, 0.5
    u = upd(a=[3.0, 4.0])  # norm 5 -> clipped to [0.6, 0.8]
    mech = chain(clip_by_global_norm(c), add_gaussian_noise(z * c, seed=3))
    out, _ = mech.update(u, mech.init({}))
    noise_only, _ = add_gaussian_noise(z * c, seed=3).update({"a": torch.zeros(2)}, {"noise_count": 0})
    assert (out["a"] - torch.tensor([0.6, 0.8])).tolist() == pytest.approx(noise_only["a"].tolist(), abs=1e-6)


@pytest.mark.parametrize("scheme", ["none", "fp16", "bf16", "int8", "int8_channel"])
def test_compress_returns_what_the_receiver_sees_and_the_bytes_sent(scheme):
    g = torch.Generator().manual_seed(0)
    u = {"lora_A": torch.randn(4, 16, generator=g), "lora_B": torch.randn(32, 4, generator=g) * 1e-2}
    out, state = compress(scheme).update(u, {"bytes": 0})
    assert state["bytes"] == payload_bytes(u, scheme)
    n = 4 * 16 + 32 * 4
    assert state["bytes"] == {"none": 4 * n, "fp16": 2 * n, "bf16": 2 * n, "int8": n + 2 * 4, "int8_channel": n + 4 * 8}[scheme]
    for k in u:
        assert out[k].dtype == torch.float32
        assert bool(((out[k] - u[k]).abs() <= max_error(u[k], scheme)).all())


def test_apply_updates_adds_key_by_key():
    params = upd(a=[1.0, 2.0], b=[5.0])
    out = apply_updates(params, upd(a=[0.5, -1.0]))
    assert set(out) == {"a"} and out["a"].tolist() == [1.5, 1.0]
    with pytest.raises(KeyError, match="'c'"):
        apply_updates(params, upd(c=[1.0]))
