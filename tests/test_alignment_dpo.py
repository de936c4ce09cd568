"""DPO/IPO against hand computations; the reference is the base model (adapters disabled) on the tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft.alignment.dpo import (
    batch_preference_loss,
    collate_pairs,
    encode_pair,
    preference_loss,
    reference_logprobs,
    sequence_logprobs,
)
from fedpeft.config import PeftConfig
from fedpeft.models.peft_wrap import wrap_lora
from fedpeft.models.registry import tiny_llama
from helpers import PREFERENCE_PAIRS as PAIRS


def test_dpo_and_ipo_match_a_hand_computation():
    # Pair 1: policy (-5, -7), reference (-6, -6): h = (-5 + 6) - (-7 + 6) = 2.
    # Pair 2: policy (-4, -3), reference (-4, -4): h = 0 - 1 = -1.
    pc, pr = torch.tensor([-5.0, -4.0]), torch.tensor([-7.0, -3.0])
    rc, rr = torch.tensor([-6.0, -4.0]), torch.tensor([-6.0, -4.0])
    beta = 0.1
    dpo = preference_loss(pc, pr, rc, rr, beta=beta, kind="dpo")
    # -log σ(0.2) = log(1 + e^-0.2); -log σ(-0.1) = log(1 + e^0.1)
    assert float(dpo.loss) == pytest.approx((math.log(1 + math.exp(-0.2)) + math.log(1 + math.exp(0.1))) / 2, rel=1e-6)
    assert dpo.chosen_rewards.tolist() == pytest.approx([0.1, 0.0])
    assert dpo.rejected_rewards.tolist() == pytest.approx([-0.1, 0.1])
    assert dpo.margin == pytest.approx((0.2 + -0.1) / 2)
    assert dpo.accuracy == 0.5
    ipo = preference_loss(pc, pr, rc, rr, beta=beta, kind="ipo")
    # 1/(2β) = 5: ((2 - 5)² + (-1 - 5)²) / 2 = (9 + 36) / 2
    assert float(ipo.loss) == pytest.approx(22.5)


def test_bad_kind_and_beta_are_errors():
    t = torch.zeros(1)
    with pytest.raises(ValueError, match="kind 'kto' is unknown; valid: dpo, ipo"):
        preference_loss(t, t, t, t, kind="kto")
    with pytest.raises(ValueError, match="beta = 0.0; expected a number > 0"):
        preference_loss(t, t, t, t, beta=0.0)


def _models(seed=0):
    base, tokenizer = tiny_llama(seed=seed)
    policy = wrap_lora(tiny_llama(seed=seed)[0], PeftConfig(), seed=seed)
    # LoRA B starts at zero (the adapter is a no-op); give it values so the policy differs from the base.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return base, policy, tokenizer


def _batch(tokenizer):
    pairs = [encode_pair(r, tokenizer, "plain", 64) for r in PAIRS]
    return collate_pairs(pairs, tokenizer.pad_token_id)


def test_sequence_logprobs_equal_the_models_own_token_loss():
    base, _, tokenizer = _models()
    batch = _batch(tokenizer)
    logps = sequence_logprobs(base, batch["input_ids"], batch["attention_mask"], batch["labels"]).detach()
    for row in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        ids, labels = batch["input_ids"][row:row + 1, :n], batch["labels"][row:row + 1, :n]
        with torch.no_grad():
            mean_nll = base(input_ids=ids, labels=labels).loss  # transformers' own shifted cross-entropy
        n_targets = int((labels[0, 1:] != -100).sum())
        assert float(logps[row]) == pytest.approx(-float(mean_nll) * n_targets, rel=1e-5)


def test_reference_logprobs_are_the_base_models_and_carry_no_grad():
    base, policy, tokenizer = _models()
    batch = _batch(tokenizer)
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    with torch.no_grad():
        expected = sequence_logprobs(base, *args)
    ref = reference_logprobs(policy, *args)
    assert torch.allclose(ref, expected, atol=1e-5)
    assert not ref.requires_grad
    # The adapter is active again afterwards: the policy's log-probs differ from the base's.
    assert not torch.allclose(sequence_logprobs(policy, *args), expected, atol=1e-3)


def test_reference_needs_a_peft_model():
    base, _, tokenizer = _models()
    batch = _batch(tokenizer)
    with pytest.raises(TypeError, match="disable_adapter"):
        reference_logprobs(base, batch["input_ids"], batch["attention_mask"], batch["labels"])


def test_pairs_that_do_not_fit_are_dropped_and_chosen_rows_come_first():
    _, _, tokenizer = _models()
    assert encode_pair({"prompt": "p", "chosen": "x" * 100, "rejected": "y"}, tokenizer, "plain", 32) is None
    pair = encode_pair(PAIRS[0], tokenizer, "raw", 64)
    batch = collate_pairs([pair], tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2
    assert batch["input_ids"][0, : len(pair[0].input_ids)].tolist() == pair[0].input_ids


@pytest.mark.parametrize("kind", ["dpo", "ipo"])
def test_training_on_the_loss_raises_the_preference_margin(kind):
    torch.manual_seed(0)
    _, policy, tokenizer = _models()
    batch = _batch(tokenizer)
    params = [p for n, p in policy.named_parameters() if p.requires_grad]
    before = batch_preference_loss(policy, batch, beta=0.5, kind=kind)
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for _ in range(15):
        optimizer.zero_grad()
        batch_preference_loss(policy, batch, beta=0.5, kind=kind).loss.backward()
        optimizer.step()
    after = batch_preference_loss(policy, batch, beta=0.5, kind=kind)
    assert float(after.loss) < float(before.loss)
    assert after.margin > before.margin
    assert after.accuracy == 1.0
