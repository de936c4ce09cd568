"""Which model family a run trains, decided from the model's config alone, before any weight loads.

``model.head`` names the family: ``causal_lm`` (a decoder generates the answer after the prompt),
``classification`` (a sequence-classification head), ``seq2seq`` (an encoder-decoder such as T5 /
Flan-T5: the encoder reads the prompt, the decoder generates the answer). An encoder-decoder
checkpoint is recognised by ``is_encoder_decoder`` in its ``config.json``, so ``model.name:
google/flan-t5-base`` runs as ``seq2seq`` under the default head; a head the model cannot have is
refused naming model.head (:func:`effective_head`). The names of tiny and bundled models are resolved by
``models/registry.py`` (``is_encoder_decoder``, ``model_head``); this module only reads configs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

SEQ2SEQ = "seq2seq"


def model_is_encoder_decoder(model) -> bool:
    """A loaded model (or its peft wrapper, which forwards ``config``) is an encoder-decoder."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def config_is_encoder_decoder(config: Mapping[str, Any]) -> bool:
    """A transformers ``config.json`` (as a dict) describes an encoder-decoder model: its
    ``is_encoder_decoder`` flag, which T5, BART and their kin set (a missing flag: not one)."""
    return bool(config.get("is_encoder_decoder", False))


def hub_config(name: str, revision: str | None = None, fetch: bool = False) -> dict | None:
    """A hub id's ``config.json`` from the local Hugging Face cache, or (``fetch``, the Hub not switched off)
    downloaded alone; None when it is not to be had (the weights' load then reports why)."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json", revision=revision)
    except ValueError:  # not a valid repository id
        return None
    if not isinstance(cached, str) and fetch and not constants.HF_HUB_OFFLINE:
        try:
            cached = hf_hub_download(name, "config.json", revision=revision)
        except Exception as exc:  # offline, no such repository, no config.json: the load itself fails clearly
            log.debug("config.json of %s not fetched: %s", name, exc)
            return None
    if not isinstance(cached, str):
        return None
    with open(cached, encoding="utf-8") as f:
        return json.load(f)


def effective_head(head: str, encoder_decoder: bool | None, name: str) -> str:
    """The head a model runs with: ``seq2seq`` for an encoder-decoder under ``causal_lm`` (the default) or
    ``seq2seq``; the configured head otherwise. ``encoder_decoder`` None (not known yet) keeps ``head``.
    Refused: a classification head on an encoder-decoder, ``seq2seq`` on a model that is not one."""
    if encoder_decoder is None:
        return head
    if encoder_decoder:
        if head in ("causal_lm", SEQ2SEQ):
            return SEQ2SEQ
        raise ValueError(f"model.head={head}: model.name '{name}' is an encoder-decoder model (its config.json sets "
                         f"is_encoder_decoder), which fedpeft trains as a generator: set model.head=seq2seq (or leave "
                         f"the default causal_lm) with training.objective=sft")
    if head == SEQ2SEQ:
        raise ValueError(f"model.head=seq2seq needs an encoder-decoder model (config.json with is_encoder_decoder: "
                         f"true, e.g. T5 / Flan-T5 or tiny-t5); model.name '{name}' is not one: use "
                         "model.head=causal_lm")
    return head
