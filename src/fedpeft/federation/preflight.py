"""Checks run before the model loads, so that bad input fails in a second, not after the load: the
partition (needs the data, not the model) and the model name (local, cached, or a reachable Hub)."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from urllib.parse import urlparse

from huggingface_hub import constants, try_to_load_from_cache

from fedpeft.config import ExperimentConfig
from fedpeft.data.partition import partition
from fedpeft.models.registry import BUNDLED, ModelNotFoundError, resolve_model_path


def partition_preflight(config: ExperimentConfig, labels: Sequence[object]) -> None:
    """Raise PartitionError (a ValueError naming the setting) when the configured partition cannot be
    made; the same call as ``prepare_client_data``, so it fails there iff it fails here."""
    pcfg = config.data.partition
    partition(labels, config.federation.num_clients, pcfg.kind, config.seed, alpha=pcfg.alpha,
              min_frac=pcfg.min_frac, classes_per_client=pcfg.classes_per_client)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint accepts a TCP connection within ``timeout`` (no request is made)."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def model_preflight(config: ExperimentConfig) -> None:
    """A model name that is neither bundled, nor a local path, nor in the Hugging Face cache needs the Hub:
    when the Hub is off (HF_HUB_OFFLINE) or unreachable, fail now, listing the bundled models, instead of
    after the Hub client's retries (about 48 s)."""
    name = config.model.name
    kind, _ = resolve_model_path(name)  # a missing local path or GGUF file fails here
    if kind != "hub":
        return
    filename = config.model.gguf_file or "config.json"
    try:
        cached = try_to_load_from_cache(name, filename, revision=config.model.revision)
    except ValueError as exc:  # not a valid repository id
        raise ModelNotFoundError(f"model.name '{name}' is not a bundled model, an existing local path, or a valid "
                                 f"Hugging Face id ({exc}). Bundled models: {', '.join(BUNDLED)}") from None
    if isinstance(cached, str):
        return
    offline = constants.HF_HUB_OFFLINE
    if offline or not hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise ModelNotFoundError(
            f"model.name '{name}' is not a bundled model or a local path, is not in the Hugging Face cache, and {why}. "
            "Bundled models (offline): " + "; ".join(f"'{k}': {v}" for k, v in BUNDLED.items()))
