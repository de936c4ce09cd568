"""SIP and BiSR on tiny-llama, cut after block 1. The inversion model is trained on auxiliary text of
other generated tasks (uppercase, sort, count) and attacked on arithmetic records (the victims'),
so the attacker never sees a victim record. Chance per token is 1/259 ≈ 0.004.

- SIP recovers ≥ 0.5 of the tokens (over 100× chance) and falls to ≤ 0.3 with activation noise of
  five times the activations' spread.
- BiSR, started from a weak SIP (5 training steps) on activations with noise of twice their spread,
  beats that SIP by at least 0.2 when it also uses the (clean) gradient at the top cut: the backward
  term carries what the noise hid. With noise on both the activations and the gradient it drops ≤ 0.3.
"""

from __future__ import annotations

import pytest
import torch

from fedpeft.attacks.bisr import BiSROptions, bisr_attack
from fedpeft.attacks.defences import gaussian_noise
from fedpeft.attacks.metrics import token_accuracy
from fedpeft.attacks.observe import observe_split
from fedpeft.attacks.sip import SIPOptions, sip_attack, sip_logits, train_inversion_model
from fedpeft.data.generated import generate_task
from fedpeft.models.registry import tiny_llama


def _texts(task: str, count: int, seed: int) -> list[str]:
    return [f"{r['instruction']} {r['output']}" for r in generate_task(task, count, seed)]


@pytest.fixture(scope="module")
def setting():
    model, tok = tiny_llama(seed=0)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    aux = _texts("uppercase", 16, 1) + _texts("sort_numbers", 16, 1) + _texts("count_items", 16, 1)
    batches = []
    for i in range(0, len(aux), 16):
        encoded = tok(aux[i:i + 16], return_tensors="pt", padding=True)
        batches.append({"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask})
    victim = tok(_texts("arithmetic", 1, 5), return_tensors="pt")
    obs = observe_split(model, victim.input_ids, victim.attention_mask, 1, 1)
    return model, batches, victim, obs


def test_sip_recovers_the_victims_text_and_drops_under_noise(setting):
    model, batches, victim, obs = setting
    inversion = train_inversion_model(model, 1, batches, SIPOptions(steps=100))
    assert token_accuracy(victim.input_ids, sip_attack(inversion, obs.activations)) >= 0.5
    noisy = gaussian_noise(obs.activations, 5 * float(obs.activations.std()), seed=1)
    assert token_accuracy(victim.input_ids, sip_attack(inversion, noisy)) <= 0.3


def test_sip_without_auxiliary_data_is_refused(setting):
    model = setting[0]
    with pytest.raises(ValueError, match="SIP needs auxiliary data"):
        train_inversion_model(model, 1, [])


def test_bisr_improves_on_its_sip_start_and_drops_when_both_directions_are_noised(setting):
    model, batches, victim, obs = setting
    weak = train_inversion_model(model, 1, batches, SIPOptions(steps=5))
    std_a, std_g = float(obs.activations.std()), float(obs.top_gradient.std())
    noisy = gaussian_noise(obs.activations, 2 * std_a, seed=1)
    start = sip_logits(weak, noisy)
    sip_accuracy = token_accuracy(victim.input_ids, start.argmax(-1))
    options = BiSROptions(steps=40)
    refined = bisr_attack(model, start, 1, noisy, victim.attention_mask, 1, obs.top_gradient, options)
    assert token_accuracy(victim.input_ids, refined) >= sip_accuracy + 0.2

    very_noisy = gaussian_noise(obs.activations, 5 * std_a, seed=1)
    start = sip_logits(weak, very_noisy)
    defended = bisr_attack(model, start, 1, very_noisy, victim.attention_mask, 1,
                           gaussian_noise(obs.top_gradient, 5 * std_g, seed=2), options)
    assert token_accuracy(victim.input_ids, defended) <= 0.3
