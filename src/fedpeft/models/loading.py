"""A trained model as a user evaluates it: the base model with a saved PEFT adapter applied."""

from __future__ import annotations

import os
from pathlib import Path

from peft import PeftModel
from safetensors.torch import load_file

from fedpeft.models.peft_wrap import set_base_weights
from fedpeft.models.registry import load_base_model


def adapter_dir(adapter: str | os.PathLike) -> Path:
    """The directory holding ``adapter_config.json``: ``adapter`` itself or ``adapter/final`` (a run
    directory); a clear error naming both otherwise."""
    path = Path(adapter)
    for candidate in (path, path / "final"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise FileNotFoundError(f"--adapter: no adapter_config.json in '{adapter}' (nor in '{adapter}/final')")


def load_model_for_eval(model_spec: str, adapter: str | os.PathLike | None = None, dtype: str = "float32"):
    """(model, tokenizer, description): the base model, with a PEFT adapter directory applied when given
    (and the base weights a method changed, saved as ``base_weights.safetensors`` beside it)."""
    path = adapter_dir(adapter) if adapter else None  # before the model loads: a bad path fails fast
    loaded = load_base_model(model_spec, dtype=dtype)
    model, description = loaded.model, loaded.source
    if path is not None:
        model = PeftModel.from_pretrained(model, str(path))
        base_weights = path / "base_weights.safetensors"
        if base_weights.is_file():
            set_base_weights(model, load_file(str(base_weights)))
        model.eval()
        description += f" + adapter {path}"
    return model, loaded.tokenizer, description
