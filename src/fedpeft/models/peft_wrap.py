"""Wrap a base model once with a PEFT LoRA adapter, and edit frozen base weights in place."""

from __future__ import annotations

import torch

from fedpeft.adapters import adapter_parameters
from fedpeft.models.device import resolve_device


def wrap_lora(model: torch.nn.Module, peft_config, seed: int, head: str = "causal_lm"):
    """``peft.get_peft_model`` with LoRA; the random init of A is drawn from ``seed`` so that every
    process (simulation, Flower client, resumed run) builds the same initial adapter.

    With ``head="classification"`` the task type is SEQ_CLS: peft then also trains the new classifier
    head (``modules_to_save``), whose copy is part of the adapter state and travels with it."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=peft_config.r,
        lora_alpha=peft_config.alpha,
        lora_dropout=peft_config.dropout,
        target_modules=list(peft_config.target_modules),
        use_rslora=peft_config.rslora,
        bias="none",
        task_type="SEQ_CLS" if head == "classification" else "CAUSAL_LM",
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        wrapped = get_peft_model(model, config)
    finally:
        torch.random.set_rng_state(state)
    if not adapter_parameters(wrapped):
        raise ValueError(f"peft.target_modules {peft_config.target_modules} matched no module of the model")
    return wrapped


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass (transformers' checkpointing,
    non-reentrant). ``enable_input_require_grads`` makes the embedding output require grad, so a frozen
    base with LoRA inside checkpointed layers still gets adapter gradients under the reentrant variant
    too (without it, every LoRA gradient would silently be None)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"training.gradient_checkpointing=true: {type(base).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    enable = getattr(base, "activation_checkpointing_enable", None)  # transformers >= 5; the old name before
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.enable_input_require_grads()


def _num_labels(cfg, data) -> int | None:
    """Outputs of a classification head: one per class of the data, or one (the scalar reward) for
    ``training.objective=reward``; None for a causal LM."""
    if cfg.model.head != "classification":
        return None
    return 1 if cfg.training.objective == "reward" else len(data.classes())


def load_experiment_model(cfg, data, device: torch.device | None = None):
    """The base model of an experiment config, with the head its data needs (a classifier gets one
    output per class of ``data``), on its device, quantised and checkpointed as configured, wrapped
    with LoRA: what the engine and every Flower node build. Returns (the ``LoadedModel`` with tokenizer
    and load facts, the wrapped model)."""
    from fedpeft.models import registry

    head = cfg.model.head
    device = device if device is not None else resolve_device(cfg.model.device)
    loaded = registry.load_base_model(cfg.model.name, cfg.model.dtype, seed=cfg.seed, revision=cfg.model.revision,
                                      gguf_file=cfg.model.gguf_file,
                                      head="reward" if cfg.training.objective == "reward" else head,
                                      num_labels=_num_labels(cfg, data),
                                      device=device, quantization=cfg.model.quantization,
                                      attention=cfg.model.attention)
    base = loaded.model
    if cfg.model.quantization != "none":
        # QLoRA's preparation: freeze the base, keep norms and the head in float32 for stable training.
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    wrapped = wrap_lora(base, cfg.peft, seed=cfg.seed, head=head)
    if cfg.training.gradient_checkpointing:
        enable_gradient_checkpointing(wrapped)
    return loaded, wrapped


def lora_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Adapter-key module name (as ``adapters.module_name`` gives it) -> the PEFT LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def add_to_base_weight(model: torch.nn.Module, deltas: dict[str, torch.Tensor],
                       master: dict[str, torch.Tensor] | None = None) -> None:
    """W0 <- W0 + delta for each named LoRA module, in place (no copy of the base model is made).

    With ``master`` (a dict the caller keeps for the whole run), a weight held in a lower precision than
    float32 (``model.dtype: bfloat16``) gets a float32 master copy of itself, made at its first merge: the
    delta is added to the master and the weight becomes the master rounded once. Added straight to a
    bfloat16 weight (8 bits of mantissa), a delta under half a unit in the last place of W0 is rounded
    away at every merge, so FLoRA's and FedEx-LoRA's merges would never accumulate; with the master the
    weight stays the nearest bfloat16 to W0 + sum of the deltas."""
    modules = lora_modules(model)
    with torch.no_grad():
        for name, delta in deltas.items():
            if name not in modules:
                raise KeyError(f"base delta for unknown LoRA module '{name}'")
            weight = modules[name].get_base_layer().weight
            if not weight.is_floating_point():
                raise ValueError(f"this method merges updates into the base weights, which a quantised base "
                                 f"({type(weight).__name__} '{name}') cannot hold; use model.quantization=none")
            if tuple(weight.shape) != tuple(delta.shape):
                raise ValueError(f"base delta for '{name}' has shape {tuple(delta.shape)}, weight is {tuple(weight.shape)}")
            if master is not None and weight.dtype != torch.float32:
                kept = master.get(name)
                if kept is None:
                    kept = master[name] = weight.detach().float().clone()
                kept.add_(delta.to(device=kept.device, dtype=torch.float32))
                weight.copy_(kept)
            else:
                weight.add_(delta.to(weight.device, weight.dtype))


def base_weights(model: torch.nn.Module, names, master: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The named base weights as CPU tensors: a float32 master copy where ``master`` keeps one (so a
    checkpoint resumes the exact sum), else the weight itself."""
    modules = lora_modules(model)
    master = master or {}
    return {name: (master[name] if name in master else modules[name].get_base_layer().weight).detach().to("cpu").clone()
            for name in names}


def master_from_saved(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float32 masters a resumed run continues with: saved float32 values of weights the model holds
    in a lower precision (what ``base_weights`` wrote with a master)."""
    modules = lora_modules(model)
    out = {}
    for name, value in weights.items():
        weight = modules[name].get_base_layer().weight
        if value.dtype == torch.float32 and weight.dtype != torch.float32:
            out[name] = value.detach().to(weight.device).clone()
    return out


def set_base_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    modules = lora_modules(model)
    with torch.no_grad():
        for name, value in weights.items():
            modules[name].get_base_layer().weight.copy_(value)
