"""DP-SGD through Opacus in the local trainer: each example's gradient (computed here one example at a
time, independently of Opacus) is clipped to max_grad_norm before the sum; the added noise has std
sigma * max_grad_norm / batch; an adapter part Opacus cannot handle is a clear error; the shared model
keeps no hooks; a delta too large for the clients' record counts is refused before the model loads."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedpeft.config import load_config
from fedpeft.data.dataset import load_experiment_data
from fedpeft.federation.local_trainer import train_local
from fedpeft.privacy.dp_sgd import DPSGDUnsupported, check_opacus_modules
from fedpeft.privacy.run_privacy import RunPrivacy
from fedpeft.strategies.base import ClientPlan

VOCAB, DIM = 13, 5


class TinyLM(nn.Module):
    """A frozen embedding and a trainable Linear head (what a LoRA factor is to Opacus)."""

    def __init__(self, vocab=VOCAB, dim=DIM) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        self.emb.weight.data = torch.randn(vocab, dim, generator=g)
        self.emb.weight.requires_grad_(False)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight.data = torch.randn(vocab, dim, generator=g)

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        return type("Out", (), {"logits": self.head(self.emb(input_ids))})()


def batch(lengths, total, seed=0, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(lengths), total), generator=g)
    labels = ids.clone()
    mask = torch.zeros(len(lengths), total)
    for i, n in enumerate(lengths):
        labels[i, n:] = -100
        labels[i, : n // 2] = -100  # a prompt
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def example_gradient(model: TinyLM, b, i: int) -> torch.Tensor:
    """d/dW of example i's mean cross-entropy over its supervised next tokens (plain autograd)."""
    model.zero_grad()
    logits = model.head(model.emb(b["input_ids"][i:i + 1]))[0, :-1]
    targets = b["labels"][i, 1:]
    keep = targets != -100
    nn.functional.cross_entropy(logits[keep], targets[keep]).backward()
    return model.head.weight.grad.clone()


def dp_step(model, b, sigma, clip, seed=0):
    before = model.head.weight.detach().clone()
    params = {"head.weight": model.head.weight}
    train_local(model, params, iter([b]), ClientPlan(0, {}), steps=1, grad_accumulation=1, lr=1.0,
                optimizer_name="sgd", max_grad_norm=None,
                dp_sgd={"noise_multiplier": sigma, "max_grad_norm": clip, "expected_batch_size": len(b["input_ids"]),
                        "seed": seed})
    return before - model.head.weight.detach()  # lr 1, SGD: the step's gradient


def test_each_example_gradient_is_clipped_before_the_sum():
    b = batch([12, 9, 6, 12], 12)
    reference = TinyLM()
    grads = [example_gradient(reference, b, i) for i in range(4)]
    norms = [float(g.norm()) for g in grads]
    clip = sorted(norms)[1] * 1.01  # two examples under the bound, two over it
    expected = sum(g * min(1.0, clip / n) for g, n in zip(grads, norms)) / 4
    model = TinyLM()
    got = dp_step(model, b, sigma=0.0, clip=clip)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    # the bound itself: every example's share of the step is at most clip / batch
    assert all(float((g * min(1.0, clip / n)).norm()) <= clip * (1 + 1e-6) for g, n in zip(grads, norms))
    assert sum(n > clip for n in norms) == 2
    # Opacus's hooks are gone: the model is the plain model again
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())
    assert not hasattr(model, "autograd_grad_sample_hooks")


def test_dp_sgd_noise_has_std_sigma_clip_over_batch():
    """64 x 600 coordinates: (noisy step - noiseless step) * batch ~ N(0, (sigma C)^2); sample std within
    6 standard errors (6 / sqrt(2n) = 2.2%)."""
    vocab, dim = 600, 64
    b = batch([10, 8, 10], 10, vocab=vocab)
    sigma, clip = 1.5, 0.3
    quiet = dp_step(TinyLM(vocab, dim), b, sigma=0.0, clip=clip)
    noisy = dp_step(TinyLM(vocab, dim), b, sigma=sigma, clip=clip, seed=7)
    noise = ((noisy - quiet) * 3).double().flatten()
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=6 / math.sqrt(2 * noise.numel()))
    again = dp_step(TinyLM(vocab, dim), b, sigma=sigma, clip=clip, seed=7)
    assert torch.equal(again, noisy)  # seeded: a resumed round draws the same noise


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(DIM))

    def forward(self, x):
        return x * self.gain


def test_a_module_opacus_cannot_handle_is_a_clear_error():
    model = nn.Sequential(nn.Linear(DIM, DIM), Scale())
    with pytest.raises(DPSGDUnsupported, match=r"module '1' \(type Scale, trainable gain\)"):
        check_opacus_modules(model)
    model[1].gain.requires_grad_(False)  # frozen: nothing for DP-SGD to do there
    check_opacus_modules(model)


def test_delta_must_be_below_one_over_the_largest_client():
    cfg = load_config("configs/tiny.yaml", ["privacy.dp_sgd.enabled=true", "privacy.dp_sgd.delta=0.2"])
    data = load_experiment_data(cfg)
    with pytest.raises(ValueError, match=r"privacy.dp_sgd.delta=0.2 must be below 1 / \(records of the largest client\)"):
        RunPrivacy(cfg, data.labels())
    RunPrivacy(load_config("configs/tiny.yaml", ["privacy.dp_sgd.enabled=true"]), data.labels())
