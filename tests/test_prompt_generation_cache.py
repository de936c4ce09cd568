"""Cached, batched greedy decoding with a prompt-learning adapter (evaluation/generation.py) gives the
same tokens as decoding by full forwards of the PEFT model without a cache, one prompt at a time; and
the virtual tokens / key-value prefix change the output."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from fedpeft.adapters import adapter_parameters  # noqa: E402
from fedpeft.config import PeftConfig  # noqa: E402
from fedpeft.evaluation.generation import generate, generate_by_full_forwards  # noqa: E402
from fedpeft.models.peft_wrap import wrap_peft  # noqa: E402
from fedpeft.models.registry import tiny_llama  # noqa: E402

OPTIONS = {"prompt_tuning": {"num_virtual_tokens": 4},
           "p_tuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 16},
           "prefix_tuning": {"num_virtual_tokens": 4}}
# different lengths, so a batch is left-padded between the virtual tokens and the shorter prompts
PROMPTS = ["abc", "hello world, how are you today?", "x", "12 + 30 =", "reverse: stone"]


def adapted(kind: str, seed: int):
    base, tok = tiny_llama()
    model = wrap_peft(base, PeftConfig(type=kind, **OPTIONS[kind]), seed=0)
    draw(model, seed)
    return model, tok


def draw(model, seed: int) -> None:
    """Random adapter tensors, large enough to move the tiny model's argmax."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g))


def plain_greedy(model, tok, prompt: str, steps: int) -> list[int]:
    """The base model alone (no virtual tokens), by full forwards."""
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, start:].tolist()


@pytest.mark.parametrize("kind", list(OPTIONS))
def test_cached_batched_decoding_equals_full_forwards(kind):
    model, tok = adapted(kind, seed=1)
    reference = generate_by_full_forwards(model, tok, PROMPTS, max_new_tokens=12)
    assert any(len(tok(t, add_special_tokens=False)["input_ids"]) >= 8 for t in reference)  # long enough to matter
    assert generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=8) == reference
    assert generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=1) == reference
    assert generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=2) == reference


@pytest.mark.parametrize("kind", list(OPTIONS))
def test_stop_strings_cut_the_same_text(kind):
    model, tok = adapted(kind, seed=2)
    full = generate_by_full_forwards(model, tok, PROMPTS, max_new_tokens=12)
    stop = [next(t for t in full if len(t) > 4)[2:4]]  # a string one of the continuations contains
    reference = generate_by_full_forwards(model, tok, PROMPTS, max_new_tokens=12, stop=stop)
    assert any(r != f for r, f in zip(reference, full))  # the stop string did cut something
    assert generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=8, stop=stop) == reference


@pytest.mark.parametrize("kind", list(OPTIONS))
def test_virtual_tokens_change_the_output(kind):
    """Other virtual tokens / another prefix give other continuations, and none is the base model's own."""
    model, tok = adapted(kind, seed=3)
    first = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=8)
    draw(model, seed=4)
    assert generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=8) != first
    base = model.get_base_model()
    alone = [tok.decode(plain_greedy(base, tok, prompt, 12), skip_special_tokens=True) for prompt in PROMPTS]
    assert alone != first
