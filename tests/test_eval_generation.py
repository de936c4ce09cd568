"""Batched greedy generation: left padding gives what one-by-one greedy decoding gives; stop strings cut."""

from __future__ import annotations

import pytest
import torch

from fedpeft.evaluation.generation import generate
from fedpeft.models.registry import tiny_llama

torch.set_num_threads(1)

PROMPTS = ["Add 12 and 30.\n", "Reverse: a b c d\n", "Hi\n", "Write the word 'apple' in capital letters, please.\n"]


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = tiny_llama(seed=0)
    model.eval()
    return model, tokenizer


def greedy_by_hand(model, tokenizer, prompt: str, steps: int) -> str:
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(ids).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_batched_left_padded_generation_equals_greedy_by_hand(tiny):
    model, tokenizer = tiny
    side = tokenizer.padding_side
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=4)
    assert tokenizer.padding_side == side  # restored
    assert batched == [greedy_by_hand(model, tokenizer, p, 6) for p in PROMPTS]
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=1) == batched


def test_stop_strings_cut_the_output(tiny):
    model, tokenizer = tiny
    [full] = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=8)
    assert len(full) >= 3
    stop = full[2:4]
    [cut] = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=8, stop=[stop, "never-there"])
    assert cut == full[:full.find(stop)]
