"""Differential privacy: clipping bound, noise scale (statistical, fixed seeds), distributed noise equal
to central noise, adaptive clipping's formulas, epsilon against an independent library, calibration, and
config errors. All pure: no model is loaded."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import dp_accounting
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import RDPAccountant

from fedpeft.config import ConfigError, load_config
from fedpeft.privacy.accountant import ORDERS, RdpLedger, calibrate_noise_multiplier, epsilon_of
from fedpeft.privacy.client_dp import ClientLevelDP, privatize_upload
from fedpeft.privacy.mechanism import (
    adaptive_update_multiplier,
    clip_delta,
    client_noise_std,
    gaussian_noise,
    global_norm,
    next_clip_norm,
)
from fedpeft.strategies.base import ClientUpdate

SHAPES = {"a": (64, 32), "b": (16, 128), "c": (500,)}


def _tensors(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=gen) for k, s in SHAPES.items()}


# --- clipping -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1e-3, 0.05, 1.0, 30.0])
def test_clipped_update_has_norm_at_most_c(scale):
    clip = 2.5
    delta = _tensors(1, scale)
    clipped, norm = clip_delta(delta, clip)
    # independent norm: one flat float64 vector
    flat = torch.cat([clipped[k].double().flatten() for k in SHAPES])
    assert float(flat.norm()) <= clip * (1 + 1e-6)
    raw = float(torch.cat([delta[k].double().flatten() for k in SHAPES]).norm())
    assert norm == pytest.approx(raw, rel=1e-9)
    if raw <= clip:  # below the bound: unchanged
        assert all(torch.equal(clipped[k], delta[k]) for k in SHAPES)
    else:  # above: same direction, norm exactly C
        assert float(flat.norm()) == pytest.approx(clip, rel=1e-5)
        cos = float(flat @ torch.cat([delta[k].double().flatten() for k in SHAPES])) / (float(flat.norm()) * raw)
        assert cos == pytest.approx(1.0, abs=1e-6)


def test_client_upload_is_start_plus_clipped_change():
    start, trained = _tensors(2), _tensors(3)
    info = {"clip": 0.7, "noise_std": 0.0}
    out, metrics = privatize_upload(trained, start, ["a", "b"], info, seed=0)
    change = {k: out[k] - start[k] for k in ("a", "b")}
    assert global_norm(change) <= 0.7 * (1 + 1e-6)
    assert torch.equal(out["c"], trained["c"])  # not uploaded: left as trained (private)
    assert metrics["dp_unclipped"] == 0.0  # the change was far above 0.7


# --- noise ------------------------------------------------------------------------------------------------
def test_noise_has_the_stated_std():
    """200,000 draws: the sample std of N(0, s^2) is within 1% of s (its relative standard error is
    1/sqrt(2n) = 0.16%, so 1% is about 6 standard errors); the mean within 6 s / sqrt(n)."""
    like = {"x": torch.zeros(200_000)}
    s = 0.37
    noise = gaussian_noise(like, s, seed=1234)["x"].double()
    assert float(noise.std()) == pytest.approx(s, rel=0.01)
    assert abs(float(noise.mean())) < 6 * s / math.sqrt(200_000)
    # the same seed gives the same noise, another seed other noise
    assert torch.equal(gaussian_noise(like, s, seed=1234)["x"], gaussian_noise(like, s, seed=1234)["x"])
    assert not torch.equal(gaussian_noise(like, s, seed=1234)["x"], gaussian_noise(like, s, seed=1235)["x"])


def _privacy(mode: str, z: float, clip: float, **extra):
    overrides = [f"privacy.mode={mode}", f"privacy.noise_multiplier={z}", f"privacy.clip_norm={clip}",
                 "federation.num_clients=20", "federation.clients_per_round=4",
                 *[f"privacy.{k}={v}" for k, v in extra.items()]]
    return load_config(None, overrides, check_method=False).privacy


def test_distributed_noise_sum_has_the_central_scale():
    """m clients each adding N(0, (zC)^2/m) give a sum with std zC, the std the server adds in central DP;
    measured on both (fixed seeds, 1% tolerance as above)."""
    z, clip, m, n = 1.3, 0.8, 4, 200_000
    start = {"x": torch.zeros(n)}
    dist = ClientLevelDP(_privacy("distributed", z, clip), 20, m, 10, seed=0)
    info = dist.plan_info()
    assert info["noise_std"] == pytest.approx(z * clip / math.sqrt(m))
    total = torch.zeros(n, dtype=torch.float64)
    for client in range(m):  # zero change: the upload is the noise share alone
        out, _ = privatize_upload(start, start, ["x"], info, seed=100 + client)
        total += out["x"].double()
    assert float(total.std()) == pytest.approx(z * clip, rel=0.01)

    central = ClientLevelDP(_privacy("central", z, clip), 20, m, 10, seed=0)
    assert central.plan_info()["noise_std"] == 0.0  # clients only clip
    updates = [ClientUpdate(client_id=c, tensors={"x": torch.zeros(n)}, num_examples=1) for c in range(m)]
    noised, metrics = central.server_step(1, start, updates)
    mean = sum(u.tensors["x"].double() for u in noised) / m  # what a mean-aggregating method computes
    assert float((mean * m).std()) == pytest.approx(z * clip, rel=0.01)  # noise on the sum: zC
    assert metrics["epsilon"] > 0


def test_local_noise_is_full_scale_per_client():
    assert client_noise_std("local", 1.1, 2.0, 8) == pytest.approx(2.2)
    assert client_noise_std("central", 1.1, 2.0, 8) == 0.0


# --- adaptive clipping ------------------------------------------------------------------------------------
def test_adaptive_update_multiplier_keeps_the_overall_noise():
    z, sigma_b = 1.0, 2.0
    z_delta = adaptive_update_multiplier(z, sigma_b)
    # Andrew et al. Thm 1: the pair (z_delta, sigma_b) composes to z: z^-2 = z_delta^-2 + (2 sigma_b)^-2
    assert z ** -2 == pytest.approx(z_delta ** -2 + (2 * sigma_b) ** -2)
    assert z_delta > z
    with pytest.raises(ValueError, match="count_noise_std"):
        adaptive_update_multiplier(1.0, 0.4)


def test_adaptive_clip_moves_towards_the_quantile():
    assert next_clip_norm(1.0, 0.9, 0.5, 0.2) == pytest.approx(math.exp(-0.08))  # too many unclipped: shrink
    assert next_clip_norm(1.0, 0.1, 0.5, 0.2) == pytest.approx(math.exp(0.08))  # too many clipped: grow
    dp = ClientLevelDP(_privacy("central", 1.0, 1.0, **{"adaptive_clipping.enabled": "true",
                                                       "adaptive_clipping.count_noise_std": 1.0}), 20, 4, 10, seed=3)
    updates = [ClientUpdate(client_id=c, tensors={"x": torch.zeros(3)}, num_examples=1,
                            metrics={"dp_unclipped": 1.0}) for c in range(4)]
    _, metrics = dp.server_step(1, {"x": torch.zeros(3)}, updates)
    b = metrics["unclipped_fraction_noisy"]
    assert dp.clip == pytest.approx(math.exp(-0.2 * (b - 0.5)))
    assert dp.state_dict()["clip"] == dp.clip


# --- accountant -------------------------------------------------------------------------------------------
def _dp_accounting_epsilon(q, z, steps, delta):
    """dp-accounting's RDP accountant (a second, independent implementation), same orders."""
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    accountant = RdpAccountant(list(ORDERS))
    accountant.compose(event)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("q,z,steps", [(0.01, 1.1, 1000), (0.05, 2.0, 200), (0.001, 0.9, 5000)])
def test_epsilon_equals_opacus_and_dp_accounting(q, z, steps):
    """Our ledger against Opacus's accountant called directly and against dp-accounting's (same orders)."""
    ledger = RdpLedger()
    for _ in range(steps):
        ledger.step(z, q)
    opacus = RDPAccountant()
    for _ in range(steps):
        opacus.step(noise_multiplier=z, sample_rate=q)
    assert ledger.epsilon(1e-5) == pytest.approx(opacus.get_epsilon(delta=1e-5, alphas=list(ORDERS)), rel=1e-9)
    assert ledger.epsilon(1e-5) == pytest.approx(_dp_accounting_epsilon(q, z, steps, 1e-5), rel=1e-6)


@pytest.mark.parametrize("q,z,steps", [(0.5, 1.0, 3), (0.2, 0.8, 40), (0.1, 1.0, 50)])
def test_epsilon_at_large_sampling_rates_is_within_dp_accountings(q, z, steps):
    """At large q dp-accounting drops fractional orders whose series it cannot sum in 1000 terms (it logs
    so); its epsilon is then a minimum over fewer orders: at least ours, and close to it."""
    ours = epsilon_of([[z, q, steps]], 1e-5)
    theirs = _dp_accounting_epsilon(q, z, steps, 1e-5)
    assert ours <= theirs * (1 + 1e-9)
    assert ours == pytest.approx(theirs, rel=5e-3)


def test_epsilon_of_the_full_gaussian_in_closed_form():
    """q = 1: T compositions of the Gaussian mechanism have RDP T a / (2 z^2); epsilon is the best order
    of the improved RDP-to-DP conversion (Balle et al. 2020): r - (log d + log a)/(a - 1) + log((a - 1)/a)."""
    z, steps, delta = 2.0, 5, 1e-6
    a = np.array(ORDERS)
    eps = steps * a / (2 * z * z) - (np.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    assert epsilon_of([[z, 1.0, steps]], delta) == pytest.approx(float(eps.min()), rel=1e-6)


def test_ledger_state_round_trips_and_merges_equal_steps():
    ledger = RdpLedger()
    for z in (1.0, 1.0, 1.5, 1.0):
        ledger.step(z, 0.1)
    assert ledger.history == [[1.0, 0.1, 2], [1.5, 0.1, 1], [1.0, 0.1, 1]]
    again = RdpLedger.from_state(ledger.state_dict())
    assert again.epsilon(1e-5) == ledger.epsilon(1e-5)


def test_calibration_reaches_the_target():
    z = calibrate_noise_multiplier(2.0, 1e-5, 0.1, 50)
    assert epsilon_of([[z, 0.1, 50]], 1e-5) <= 2.0
    assert epsilon_of([[z * 0.99, 0.1, 50]], 1e-5) > 2.0  # not much more noise than needed


# --- config -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,expected", [
    (["privacy.mode=central", "privacy.noise_multiplier=0"], "privacy.noise_multiplier: Input should be greater than 0 (got 0)"),
    (["privacy.mode=central", "privacy.noise_multiplier=-1"], "privacy.noise_multiplier"),
    (["privacy.clip_norm=0"], "privacy.clip_norm: Input should be greater than 0 (got 0)"),
    (["privacy.mode=central", "privacy.noise_multiplier=1", "privacy.delta=0.25"],
     "privacy.delta=0.25 must be below 1 / federation.num_clients = 0.25"),
    (["privacy.mode=local"], "needs exactly one of privacy.noise_multiplier"),
    (["privacy.mode=central", "privacy.noise_multiplier=1", "privacy.target_epsilon=2"], "needs exactly one"),
    (["privacy.mode=distributed", "privacy.noise_multiplier=1", "privacy.adaptive_clipping.enabled=true"],
     "needs privacy.mode=central"),
    (["privacy.mode=central", "privacy.noise_multiplier=1", "method.name=flora"], "use privacy.mode=local"),
    (["privacy.mode=local", "privacy.noise_multiplier=1", "method.name=scaffold"], "refuses client-level DP"),
    (["privacy.mode=central", "privacy.noise_multiplier=1", "federation.robust.rule=median"], "robust"),
    (["privacy.dp_sgd.noise_multiplier=0"], "privacy.dp_sgd.noise_multiplier"),
    (["privacy.mode=secret"], "privacy.mode"),
])
def test_bad_privacy_config_is_a_clear_error(overrides, expected):
    import fedpeft.strategies  # noqa: F401 (the method checks)

    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config("configs/tiny.yaml", overrides)


def test_methods_that_compose_are_accepted():
    import fedpeft.strategies  # noqa: F401

    for method in ("fedit", "fedprox", "ffa_lora", "fedsa_lora"):
        for mode in ("central", "distributed", "local"):
            load_config("configs/tiny.yaml", [f"method.name={method}", f"privacy.mode={mode}", "privacy.noise_multiplier=1"])
    load_config("configs/tiny.yaml", ["method.name=fedit", "method.server_optimizer.name=fedadam",
                                      "privacy.mode=central", "privacy.noise_multiplier=1"])
    load_config("configs/tiny.yaml", ["method.name=flora", "privacy.mode=local", "privacy.noise_multiplier=1"])


def test_default_config_has_privacy_off():
    cfg = load_config("configs/tiny.yaml", check_method=False)
    assert not cfg.privacy.enabled and cfg.privacy.mode == "none" and not cfg.privacy.dp_sgd.enabled


def test_budget_smaller_than_one_round_is_refused_before_training():
    with pytest.raises(ValueError, match="a single round already spends"):
        ClientLevelDP(_privacy("central", 0.5, 1.0, max_epsilon=0.1), 20, 4, 10, seed=0)


def test_dp_configs_validate():
    import fedpeft.strategies  # noqa: F401

    ffa = load_config("configs/dp/ffa_lora_dp.yaml")
    fedit = load_config("configs/dp/fedit_dp.yaml")
    assert ffa.method.name == "ffa_lora" and fedit.method.name == "fedit"
    assert ffa.privacy == fedit.privacy and ffa.privacy.dp_sgd.enabled
    # the client-level variant the config's header gives
    load_config("configs/dp/ffa_lora_dp.yaml", ["privacy.dp_sgd.enabled=false", "privacy.mode=central",
                                                "privacy.noise_multiplier=1.0", "privacy.clip_norm=0.5"])
