"""The KV cache's name on either side of transformers' rename: forward takes ``cache`` from transformers
5.24 on (``past_key_values`` before, and in models written against the old name); outputs carry it under
the same name. Log-likelihood scoring and cached generation both read it here."""

from __future__ import annotations

import inspect


def cache_argument(model) -> str:
    """The forward argument that takes a KV cache (of the base model under a peft wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def returned_cache(output):
    """The cache a forward returned, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
