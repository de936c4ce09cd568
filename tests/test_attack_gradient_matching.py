"""DLG / TAG on tiny-llama: the gradient crossing the top cut gives the targets back, and one FedIT
LoRA step's gradient gives a short input back, both far above chance (1/259 per token for the tiny
byte-level vocabulary, ≈ 0.004; thresholds ≥ 0.6 are over 100× chance) and both drop under Gaussian
noise on the observed gradient (the stand-in defence), to ≤ 0.3."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedpeft.attacks.defences import gaussian_noise, noisy_gradients
from fedpeft.attacks.gradient_matching import (GradientMatchOptions, gradient_distance, lora_gradient_attack,
                                               top_gradient_attack)
from fedpeft.attacks.metrics import token_accuracy
from fedpeft.attacks.observe import observe_lora_gradient, observe_split
from fedpeft.models.registry import tiny_llama


def _frozen_tiny():
    model, tok = tiny_llama(seed=0)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def test_gradient_distances_by_hand():
    p, o = [torch.tensor([1.0, 2.0])], [torch.tensor([0.0, 4.0])]
    assert gradient_distance(p, o, GradientMatchOptions(distance="l2")).item() == pytest.approx(1 + 4)
    assert gradient_distance(p, o, GradientMatchOptions(distance="tag", tag_alpha=0.5)).item() == pytest.approx(5 + 0.5 * 3)
    cos = 8 / (5 ** 0.5 * 4)
    assert gradient_distance(p, o, GradientMatchOptions(distance="cosine")).item() == pytest.approx(1 - cos)


def test_observed_top_gradient_is_the_whole_model_gradient():
    # The gradient at the top cut from observe_split equals the one autograd gives on the unsplit model.
    model, tok = _frozen_tiny()
    batch = tok(["Add 12 and 3."], return_tensors="pt")
    obs = observe_split(model, batch.input_ids, batch.attention_mask, 1, 1)
    kept = {}
    handle = model.model.layers[0].register_forward_hook(lambda m, i, out: kept.setdefault("h", out[0] if isinstance(out, tuple) else out))
    embeds = model.get_input_embeddings()(batch.input_ids).requires_grad_(True)
    out = model(inputs_embeds=embeds, attention_mask=batch.attention_mask, labels=batch.input_ids)
    handle.remove()
    (expected,) = torch.autograd.grad(out.loss, kept["h"])
    torch.testing.assert_close(obs.top_gradient, expected)


@pytest.mark.parametrize("distance", ["l2", "tag"])
def test_top_gradient_attack_recovers_the_targets_and_drops_under_noise(distance):
    model, tok = _frozen_tiny()
    batch = tok(["Add 12 and 3."], return_tensors="pt")
    obs = observe_split(model, batch.input_ids, batch.attention_mask, 1, 1)
    options = GradientMatchOptions(steps=100, distance=distance)
    recovered = top_gradient_attack(model, obs.top_activations, obs.top_gradient, 1, batch.attention_mask, options)
    assert token_accuracy(batch.input_ids[:, 1:], recovered) >= 0.9
    sigma = 5 * float(obs.top_gradient.std())
    noisy = top_gradient_attack(model, obs.top_activations, gaussian_noise(obs.top_gradient, sigma, seed=1), 1,
                                batch.attention_mask, options)
    assert token_accuracy(batch.input_ids[:, 1:], noisy) <= 0.3


def test_tag_on_a_fedit_lora_step_recovers_a_short_input_and_drops_under_noise():
    model, tok = _frozen_tiny()
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    batch = tok(["cat"], return_tensors="pt")
    observed = observe_lora_gradient(peft_model, batch.input_ids, batch.attention_mask)
    options = GradientMatchOptions(steps=300, distance="tag")
    recovered = lora_gradient_attack(peft_model, observed, tuple(batch.input_ids.shape), batch.attention_mask, options)
    assert token_accuracy(batch.input_ids, recovered) >= 0.6
    rms = float(torch.cat([g.reshape(-1) for g in observed.values()]).pow(2).mean().sqrt())
    noisy = lora_gradient_attack(peft_model, noisy_gradients(observed, 5 * rms, seed=1), tuple(batch.input_ids.shape),
                                 batch.attention_mask, options)
    assert token_accuracy(batch.input_ids, noisy) <= 0.34
