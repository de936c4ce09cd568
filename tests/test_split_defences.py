"""The defences at the cut are applied as stated: Gaussian noise with std sigma on the activations sent up,
d_chi-privacy noise with Gamma(d, 1/epsilon) magnitudes and uniform directions on the input embeddings,
NoPeek's distance correlation (checked against a direct implementation of the definition) whose gradient
reaches the bottom only."""

import numpy as np
import pytest
import torch

from fedpeft.adapters import adapter_parameters
from fedpeft.split.crossings import Defences, SplitModel
from fedpeft.split.defences import dchi_noise, distance_correlation
from fedpeft.split.layout import find_layout
from fedpeft.split.parts import bottom_forward, client_step
from fedpeft.split.spec import parse_cut, split_keys
from tests.test_split_parts import _batch, _wrapped


def test_gaussian_noise_on_the_activations_sent_up_has_the_stated_std():
    model, _ = _wrapped("decoder", 3, dtype=torch.float64)
    batch = _batch("decoder", batch=8, seq=40)
    model.eval()
    with torch.no_grad():
        clean = bottom_forward(model, "1-2", input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    sigma = 0.3
    split = SplitModel(model, parse_cut("1-2"), Defences(activation_sigma=sigma))
    split.reseed(7)
    (sent,) = client_step(split, batch).by_name("act_up")
    noise = (sent.tensor - clean).flatten()  # 8 * 40 * 64 = 20480 draws: the std is within ~1% of sigma
    assert abs(noise.std().item() - sigma) < 0.02 * sigma
    assert abs(noise.mean().item()) < 4 * sigma / noise.numel() ** 0.5
    split.reseed(7)
    (again,) = client_step(split, batch).by_name("act_up")
    assert torch.equal(again.tensor, sent.tensor)  # seeded: the same job draws the same noise
    split.reseed(8)
    (other,) = client_step(split, batch).by_name("act_up")
    assert not torch.allclose(other.tensor, sent.tensor)


def test_dchi_noise_has_gamma_magnitudes_and_uniform_directions():
    d, eps, n = 16, 4.0, 20000
    noise = dchi_noise(torch.Size((n, d)), eps, torch.Generator().manual_seed(0), torch.device("cpu")).double()
    r = noise.norm(dim=-1)
    # Gamma(d, 1/eps): mean d/eps, variance d/eps^2 (standard errors ~0.7% and ~2% here)
    assert abs(r.mean().item() - d / eps) < 0.03 * d / eps
    assert abs(r.var().item() - d / eps**2) < 0.08 * d / eps**2
    u = noise / r.unsqueeze(-1)
    assert u.mean(0).abs().max().item() < 4 / n**0.5 * (1 / d) ** 0.5 * 2  # centred
    cov = (u.T @ u) / n  # isotropic: E[u u^T] = I / d
    assert torch.allclose(cov, torch.eye(d, dtype=cov.dtype) / d, atol=0.01)


def test_dchi_privacy_perturbs_the_input_embeddings_by_that_noise():
    model, _ = _wrapped("decoder", 3, dtype=torch.float64)
    batch = _batch("decoder", batch=8, seq=40)
    eps = 20.0
    clean = model.get_input_embeddings()(batch["input_ids"]).detach()
    split = SplitModel(model, parse_cut("0-2"), Defences(dchi_epsilon=eps))  # cut 1 = the embeddings themselves
    (sent,) = client_step(split, batch).by_name("act_up")
    r = (sent.tensor - clean).norm(dim=-1).flatten()
    d = clean.shape[-1]
    assert abs(r.mean().item() - d / eps) < 0.03 * d / eps  # 320 tokens; sd of the mean ~0.7%
    assert torch.equal(split.inputs, clean)  # NoPeek's inputs are the clean embeddings


def _dcor_by_definition(x: np.ndarray, z: np.ndarray) -> float:
    """Szekely, Rizzo & Bakirov (2007), written out with loops: a_kl = |X_k - X_l|, double centring,
    dCov^2 = mean(A * B), dCor = sqrt(dCov^2(X,Z) / sqrt(dVar^2(X) dVar^2(Z)))."""
    n = len(x)

    def centred(v):
        d = np.array([[np.linalg.norm(v[k] - v[m]) for m in range(n)] for k in range(n)])
        out = np.empty_like(d)
        for k in range(n):
            for m in range(n):
                out[k, m] = d[k, m] - d[k].mean() - d[:, m].mean() + d.mean()
        return out

    a, b = centred(x), centred(z)
    return float(np.sqrt((a * b).mean() / np.sqrt((a * a).mean() * (b * b).mean())))


def test_distance_correlation_matches_the_definition():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5))
    z = np.tanh(x @ rng.normal(size=(5, 3))) + 0.5 * rng.normal(size=(12, 3))
    got = distance_correlation(torch.tensor(x), torch.tensor(z)).item()
    assert got == pytest.approx(_dcor_by_definition(x, z), abs=1e-5)
    # dCor is 1 for a similarity transform and near 0 for independent samples
    rot, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    assert distance_correlation(torch.tensor(x), torch.tensor(2.0 * x @ rot + 3.0)).item() == pytest.approx(1.0, abs=1e-5)
    big_x, big_z = rng.normal(size=(400, 4)), rng.normal(size=(400, 4))
    independent = distance_correlation(torch.tensor(big_x), torch.tensor(big_z)).item()
    dependent = distance_correlation(torch.tensor(big_x), torch.tensor(big_x + 0.3 * big_z)).item()
    assert independent < 0.25  # the V-statistic's small-sample bias keeps it above 0
    assert dependent > 0.9


def test_nopeek_adds_its_gradient_to_the_bottom_only():
    alpha = 0.7
    model, _ = _wrapped("decoder", 4, dtype=torch.float64)
    batch = _batch("decoder", batch=4, seq=9)
    spec = parse_cut("2-3")
    params = adapter_parameters(model)
    parts = split_keys(params, find_layout(model).blocks_prefix, spec)

    plain = SplitModel(model, spec)
    model.zero_grad(set_to_none=True)
    plain_step = client_step(plain, batch)
    base = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    plain.remove()

    # Independent: the gradient of alpha * dCor(embeddings, bottom output) on the bottom's parameters.
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
    h = bottom_forward(model, spec, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    (alpha * distance_correlation(embeds, h)).backward()
    penalty = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}

    split = SplitModel(model, spec, Defences(nopeek_alpha=alpha))
    model.zero_grad(set_to_none=True)
    step = client_step(split, batch)
    got = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    assert set(penalty) == set(parts["bottom"]) and parts["bottom"]
    for name, value in got.items():
        expected = base[name] + penalty.get(name, 0.0)
        # float64: J^T(g_task + g_nopeek) against J^T g_task + J^T g_nopeek, computed separately; they agree
        # to ~1e-7 of the gradient's scale (cancellation inside J^T g_nopeek), not to the last bit
        assert torch.allclose(value, expected, rtol=0, atol=1e-5 * expected.abs().max().item()), name
    assert any(penalty[n].abs().sum() > 1e-6 for n in penalty)
    # The server's gradient sent down is the task's; NoPeek's part is added on the client.
    (g_plain,) = plain_step.by_name("grad_down")
    (g_nopeek,) = step.by_name("grad_down")
    assert torch.allclose(g_plain.tensor, g_nopeek.tensor, atol=1e-14)
    assert len(split.meter.nopeek) == 1 and 0 < split.meter.nopeek[0].item() <= alpha
