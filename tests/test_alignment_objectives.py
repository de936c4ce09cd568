"""Reward-model and DPO objectives through the local trainer (``train_local(loss_fn=...)``), tiny models."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import LlamaForSequenceClassification

from fedpeft.adapters import adapter_parameters
from fedpeft.alignment.dpo import collate_pairs, encode_pair
from fedpeft.alignment.objectives import PreferenceObjective, evaluate_pairs, pair_rewards
from fedpeft.alignment.preference import generated_preferences
from fedpeft.config import PeftConfig
from fedpeft.federation.local_trainer import train_local
from fedpeft.models.peft_wrap import wrap_lora
from fedpeft.models.registry import tiny_llama
from fedpeft.strategies.base import ClientPlan

PAIRS, _ = generated_preferences(["arithmetic", "parity"], 4, 2, seed=0)
# A preference a 2-layer random model can learn in a few steps: the chosen answer is always a polite
# word, the rejected one a rude word (the generated pairs need arithmetic, which it cannot learn).
EASY = [{"prompt": p["prompt"], "chosen": "thanks", "rejected": "go away"} for p in PAIRS]


def _reward_model(seed=0):
    causal, tokenizer = tiny_llama(seed=seed)
    config = causal.config
    config.num_labels = 1
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    return wrap_lora(model, PeftConfig(), seed=seed, head="classification"), tokenizer


def _batches(pairs, tokenizer, size=4):
    encoded = [encode_pair(p, tokenizer, "plain", 64) for p in pairs]
    return [collate_pairs(encoded[i:i + size], tokenizer.pad_token_id) for i in range(0, len(encoded), size)]


def _train(model, objective, batches, steps, lr):
    params = {n: p for n, p in adapter_parameters(model).items() if p.requires_grad}
    return train_local(model, params, itertools.cycle(batches), ClientPlan(0, {}), steps=steps, grad_accumulation=1,
                       lr=lr, max_grad_norm=None, loss_fn=objective)


def test_reward_is_the_last_real_tokens_logit_whatever_the_padding():
    model, tokenizer = _reward_model()
    model.eval()
    [batch] = _batches(PAIRS[:3], tokenizer, size=3)
    chosen, rejected = pair_rewards(model, batch)
    with torch.no_grad():
        for row, reward in enumerate(torch.cat([chosen, rejected])):
            n = int(batch["attention_mask"][row].sum())
            alone = model(input_ids=batch["input_ids"][row:row + 1, :n]).logits[0, 0]
            assert float(reward) == pytest.approx(float(alone), abs=1e-5)


def test_reward_model_head_is_part_of_the_adapter_state():
    model, _ = _reward_model()
    keys = [k for k in adapter_parameters(model) if "score" in k]
    assert keys, "the scalar head must travel with the adapter (modules_to_save)"


@pytest.mark.parametrize("loss", ["logsigmoid", "hinge", "dice"])
def test_reward_training_through_the_local_trainer_ranks_the_pairs(loss):
    model, tokenizer = _reward_model()
    objective = PreferenceObjective("reward", loss=loss)
    batches = _batches(EASY, tokenizer)
    before = evaluate_pairs(model, objective, batches)
    result, losses = _train(model, objective, batches, steps=30, lr=1e-2)
    after = evaluate_pairs(model, objective, batches)
    assert after["pairs"] == len(EASY)
    assert after["pairwise_accuracy"] == 1.0 and after["reward_margin"] > before["reward_margin"]
    assert losses[-1] < losses[0]


def test_dpo_objective_through_the_local_trainer():
    causal, tokenizer = tiny_llama(seed=0)
    model = wrap_lora(causal, PeftConfig(), seed=0)
    objective = PreferenceObjective("dpo", beta=0.5)
    batches = _batches(EASY, tokenizer)
    before = evaluate_pairs(model, objective, batches)
    # The adapter starts as a no-op (B = 0): the policy equals the reference, every margin is 0.
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-6) and before["pairwise_accuracy"] == 0.0
    _train(model, objective, batches, steps=20, lr=1e-2)
    after = evaluate_pairs(model, objective, batches)
    assert after["pairwise_accuracy"] == 1.0 and after["reward_margin"] > 0


def test_objective_errors_list_the_valid_values():
    with pytest.raises(ValueError, match="reward loss 'l2' is unknown; valid: logsigmoid, bce"):
        PreferenceObjective("reward", loss="l2")
    with pytest.raises(ValueError, match="'sft' is not a preference objective; valid: reward, dpo, ipo"):
        PreferenceObjective("sft")
    with pytest.raises(ValueError, match="training.beta = -1"):
        PreferenceObjective("ipo", beta=-1)
    causal, tokenizer = tiny_llama(seed=0)
    [batch] = _batches(PAIRS[:2], tokenizer)
    with pytest.raises(ValueError, match="one output per sequence"):
        pair_rewards(causal, batch)
