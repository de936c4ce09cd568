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


def test_generation_eval_groups_by_a_record_field(tiny):
    from fedpeft.evaluation.generation import generation_eval

    model, tokenizer = tiny
    # One dataset ("dolly"), two categories, one record without a category: it falls back to its task.
    recs = [{"task": "dolly", "category": c, "instruction": f"q{i}", "output": "x", "val": v}
            for i, (c, v) in enumerate([("qa", 1.0), ("qa", 0.0), ("qa", 1.0), ("sum", 0.5)])]
    recs.append({"task": "dolly", "instruction": "q9", "output": "x", "val": 0.25})
    score = lambda pred, rec: rec["val"]
    res = generation_eval(model, tokenizer, recs, "plain", score=score, metric_name=lambda t: "rougeL",
                          max_new_tokens=2, group_by="category")
    assert res["metrics"] == {"dolly/rougeL": 0.25, "qa/rougeL": pytest.approx(2 / 3), "sum/rougeL": 0.5,
                              "rougeL": pytest.approx(2.75 / 5)}
    capped = generation_eval(model, tokenizer, recs, "plain", score=score, metric_name=lambda t: "rougeL",
                             max_new_tokens=2, group_by="category", max_examples=1)
    assert capped["examples"] == 3 and capped["metrics"]["qa/rougeL"] == 1.0  # the first per group
    plain = generation_eval(model, tokenizer, recs, "plain", score=score, max_new_tokens=2)
    assert set(plain["metrics"]) == {"dolly/exact_match", "exact_match"}
