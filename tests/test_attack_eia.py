"""EIA on tiny-llama (and tiny-bert) recovers a known input far above chance, and drops under
activation noise. Chance for a token is 1/259 (the tiny byte-level vocabulary) ≈ 0.004, so the
threshold 0.5 is over 100× chance; with noise five times the activations' spread it must fall
below 0.3."""

from __future__ import annotations

import pytest
import torch

from fedpeft.attacks.cut import bottom_forward, check_cut
from fedpeft.attacks.defences import gaussian_noise
from fedpeft.attacks.eia import EIAOptions, eia_attack
from fedpeft.attacks.metrics import token_accuracy
from fedpeft.models.registry import tiny_bert, tiny_llama

TEXT = "Add 12 and 3. The answer is 15."


def _frozen(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_bottom_forward_is_the_hidden_state_after_block_a():
    model, tok = tiny_llama(seed=0, layers=3)
    _frozen(model)
    batch = tok([TEXT], return_tensors="pt")
    states = model(**batch, output_hidden_states=True).hidden_states  # [embeddings, after block 1, ...]
    for cut in (1, 2):
        got = bottom_forward(model, cut, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        torch.testing.assert_close(got, states[cut])


def test_cut_outside_the_layers_is_refused():
    model, _ = tiny_llama(seed=0)
    with pytest.raises(ValueError, match=r"cut: 2 is outside the model's layers; expected an integer from 1 to 1"):
        check_cut(model, 2)
    with pytest.raises(ValueError, match="cut: 0"):
        check_cut(model, 0)


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert])
def test_eia_recovers_the_input_and_drops_under_noise(build):
    model, tok = build(seed=0)
    _frozen(model)
    batch = tok([TEXT], return_tensors="pt")
    with torch.no_grad():
        observed = bottom_forward(model, 1, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    options = EIAOptions(steps=300)
    clean = eia_attack(model, observed, 1, batch.attention_mask, options)
    assert token_accuracy(batch.input_ids, clean) >= 0.5
    sigma = 5 * float(observed.std())  # noise five times the activations' own spread
    noisy = eia_attack(model, gaussian_noise(observed, sigma, seed=1), 1, batch.attention_mask, options)
    assert token_accuracy(batch.input_ids, noisy) < 0.3
