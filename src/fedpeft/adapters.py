"""Adapter state: a plain ``dict[str, torch.Tensor]`` on CPU, keyed by the PEFT parameter name.

It is the wire format, the checkpoint format (safetensors) and the unit of aggregation. Keys are the
names of ``model.named_parameters()`` for the adapter parameters, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``; for a classifier also
its head, ``base_model.model.classifier.modules_to_save.default.weight``; for the other ``peft.type``
values their own tensors (``...k_proj.ia3_l.default``, ``prompt_encoder.default.embedding.weight``, ...).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

AdapterState = dict[str, torch.Tensor]


ADAPTER_MARKERS = ("lora_", "ia3_", "hada_", "lokr_", ".modules_to_save.")
"""Name parts of the trained tensors peft adds: LoRA/DoRA/AdaLoRA (``lora_A``, ``lora_B``,
``lora_magnitude_vector``, ``lora_E``), IA3 (``ia3_l``), LoHa (``hada_w1_a``...), LoKr (``lokr_w1``...),
and the trained copy of a new head (``modules_to_save``, e.g. a classifier). AdaLoRA's ``ranknum``
(a constant, never trained) is not adapter state."""

PROMPT_ENCODER_PREFIX = "prompt_encoder."
"""Prompt, P- and prefix tuning: the virtual tokens (and P-tuning's encoder) live in
``prompt_encoder.<adapter>.*``, outside the base model."""


def is_adapter_param(name: str) -> bool:
    """A tensor of the adapter state (what trains, travels and is aggregated) for any ``peft.type``."""
    return name.startswith(PROMPT_ENCODER_PREFIX) or any(marker in name for marker in ADAPTER_MARKERS)


def is_prompt_learning(model: torch.nn.Module) -> bool:
    """True when ``model`` carries virtual tokens or a key/value prefix (prompt, P- or prefix tuning):
    its forward prepends them, so a KV cache built outside peft (shared-prefix scoring, cached decoding)
    would miss or repeat them."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, Mapping):
        return False
    config = configs.get(getattr(model, "active_adapter", "default"))
    return bool(getattr(config, "is_prompt_learning", False))


def adapter_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if is_adapter_param(name)}


def get_adapter_state(model: torch.nn.Module, keys: Iterable[str] | None = None) -> AdapterState:
    """Copy of the adapter parameters (all, or ``keys``) as float32 CPU tensors."""
    params = adapter_parameters(model)
    names = params.keys() if keys is None else keys
    return {name: params[name].detach().to("cpu", torch.float32).clone() for name in names}


def set_adapter_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], strict: bool = False) -> None:
    """Write ``state`` into the model's adapter parameters in place (no new tensors on the model)."""
    params = adapter_parameters(model)
    unknown = [k for k in state if k not in params]
    if unknown:
        raise KeyError(f"adapter state has keys the model does not: {unknown[:3]} (and {max(0, len(unknown) - 3)} more)")
    if strict:
        missing = [k for k in params if k not in state]
        if missing:
            raise KeyError(f"adapter state lacks keys of the model: {missing[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            target = params[name]
            if target.shape != value.shape:
                raise ValueError(f"adapter tensor '{name}' has shape {tuple(value.shape)}, model expects {tuple(target.shape)}")
            target.copy_(value.to(target.dtype))


def set_trainable(model: torch.nn.Module, trainable: Iterable[str] | None) -> list[torch.nn.Parameter]:
    """Only the adapter parameters named in ``trainable`` (all when None) get gradients; returns them."""
    params = adapter_parameters(model)
    chosen = set(params) if trainable is None else set(trainable)
    unknown = chosen - set(params)
    if unknown:
        raise KeyError(f"trainable keys not in the model: {sorted(unknown)[:3]}")
    out = []
    for name, p in params.items():
        p.requires_grad_(name in chosen)
        if name in chosen:
            out.append(p)
    return out


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Exact payload size: sum of dtype size x numel."""
    return sum(t.numel() * t.element_size() for t in state.values())


def state_numel(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in state.values())


def flatten(state: Mapping[str, torch.Tensor], keys: Iterable[str] | None = None) -> torch.Tensor:
    names = sorted(state) if keys is None else list(keys)
    return torch.cat([state[k].reshape(-1).float() for k in names]) if names else torch.zeros(0)


def module_name(key: str) -> str:
    """The LoRA module a parameter belongs to: strips ``.lora_A.<adapter>.weight`` and the like."""
    for marker in (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector."):
        if marker in key:
            return key.split(marker)[0]
    return key


def lora_pairs(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """Module name -> (A key, B key) for every LoRA module in ``state``."""
    pairs: dict[str, dict[str, str]] = {}
    for key in state:
        if ".lora_A." in key:
            pairs.setdefault(module_name(key), {})["A"] = key
        elif ".lora_B." in key:
            pairs.setdefault(module_name(key), {})["B"] = key
    return {m: (d["A"], d["B"]) for m, d in pairs.items() if "A" in d and "B" in d}


def subset(state: Mapping[str, torch.Tensor], keys: Iterable[str]) -> AdapterState:
    return {k: state[k] for k in keys}


def validate_update(reference: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]) -> None:
    """Reject an update whose keys, shapes or values cannot be aggregated into ``reference``."""
    for key, tensor in update.items():
        if key not in reference:
            raise ValueError(f"update carries unknown tensor '{key}'")
        if tuple(tensor.shape) != tuple(reference[key].shape):
            raise ValueError(f"update tensor '{key}' has shape {tuple(tensor.shape)}, expected {tuple(reference[key].shape)}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"update tensor '{key}' holds NaN or inf")
