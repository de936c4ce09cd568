"""Wrap a base model once with the PEFT adapter of ``peft.type`` (LoRA, DoRA, AdaLoRA, LoHa, LoKr, IA3, prompt,
P- or prefix tuning, all through the ``peft`` library), and edit frozen base weights in place (LoRA only)."""

from __future__ import annotations

import torch

from fedpeft.adapters import adapter_parameters, is_adapter_param
from fedpeft.config import DEFAULT_TARGET_MODULES, IMAGE_PEFT_TYPES
from fedpeft.models.device import resolve_device


def peft_library_config(peft_config, head: str = "causal_lm", total_step: int | None = None):
    """The ``peft`` library's config of ``peft.type`` with that type's options (config.PeftConfig filled
    the type's defaults). ``total_step``: AdaLoRA's schedule length, the local steps of one client job
    (its rank allocation runs inside each job, see :func:`adalora_step_hook`)."""
    import peft

    kind = getattr(peft_config, "type", "lora")  # a section without ``type`` (written before the others) is LoRA
    if head == "image_classification":
        return _image_peft_config(peft_config, kind)
    task_type = {"classification": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}.get(head, "CAUSAL_LM")
    if kind in ("lora", "dora"):
        return peft.LoraConfig(r=peft_config.r, lora_alpha=peft_config.alpha, lora_dropout=peft_config.dropout,
                               target_modules=list(peft_config.target_modules), use_rslora=peft_config.rslora,
                               use_dora=kind == "dora", bias="none", task_type=task_type)
    if kind == "adalora":
        if total_step is None:
            raise ValueError("peft.type=adalora needs the local steps of a client job (its schedule length)")
        return peft.AdaLoraConfig(init_r=peft_config.init_r, target_r=peft_config.target_r, tinit=peft_config.tinit,
                                  tfinal=peft_config.tfinal, deltaT=peft_config.delta_t, total_step=total_step,
                                  orth_reg_weight=peft_config.orth_reg_weight, lora_alpha=peft_config.alpha,
                                  lora_dropout=peft_config.dropout, target_modules=list(peft_config.target_modules),
                                  task_type=task_type)
    if kind == "loha":
        return peft.LoHaConfig(r=peft_config.r, alpha=peft_config.alpha, target_modules=list(peft_config.target_modules),
                               task_type=task_type)
    if kind == "lokr":
        return peft.LoKrConfig(r=peft_config.r, alpha=peft_config.alpha, target_modules=list(peft_config.target_modules),
                               decompose_both=peft_config.decompose_both, decompose_factor=peft_config.decompose_factor,
                               task_type=task_type)
    if kind == "ia3":
        targets = None if peft_config.target_modules is None else list(peft_config.target_modules)
        feedforward = None if peft_config.feedforward_modules is None else list(peft_config.feedforward_modules)
        return peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type=task_type)
    if kind == "prompt_tuning":
        init = peft.PromptTuningInit.TEXT if peft_config.prompt_init == "text" else peft.PromptTuningInit.RANDOM
        return peft.PromptTuningConfig(num_virtual_tokens=peft_config.num_virtual_tokens, prompt_tuning_init=init,
                                       prompt_tuning_init_text=peft_config.prompt_init_text, task_type=task_type)
    if kind == "p_tuning":
        return peft.PromptEncoderConfig(num_virtual_tokens=peft_config.num_virtual_tokens,
                                        encoder_hidden_size=peft_config.encoder_hidden_size,
                                        encoder_reparameterization_type=peft_config.encoder_reparameterization,
                                        encoder_dropout=peft_config.encoder_dropout, task_type=task_type)
    if kind == "prefix_tuning":
        return peft.PrefixTuningConfig(num_virtual_tokens=peft_config.num_virtual_tokens,
                                       prefix_projection=peft_config.prefix_projection,
                                       encoder_hidden_size=peft_config.encoder_hidden_size or 0, task_type=task_type)
    raise ValueError(f"peft.type: unknown adapter type '{kind}'")


def _image_peft_config(peft_config, kind: str):
    """An image classifier's adapter: no task type (peft's PeftModel passes ``pixel_values`` through), the
    classifier trained and saved with the adapter (``modules_to_save``), so it is part of the adapter
    state and aggregated like the factors, as SEQ_CLS does for a text head."""
    import peft

    common = {"r": peft_config.r, "target_modules": list(peft_config.target_modules), "modules_to_save": ["classifier"]}
    if kind in ("lora", "dora"):
        return peft.LoraConfig(lora_alpha=peft_config.alpha, lora_dropout=peft_config.dropout, use_rslora=peft_config.rslora,
                               use_dora=kind == "dora", bias="none", **common)
    if kind == "loha":
        return peft.LoHaConfig(alpha=peft_config.alpha, **common)
    if kind == "lokr":
        return peft.LoKrConfig(alpha=peft_config.alpha, decompose_both=peft_config.decompose_both,
                               decompose_factor=peft_config.decompose_factor, **common)
    raise ValueError(f"peft.type={kind}: an image classifier takes {', '.join(IMAGE_PEFT_TYPES)}")


def _check_image_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """A clear error naming peft.target_modules when none of them is a Linear layer of the vision model
    (transformers >= 5 names a ViT's attention projections q_proj / k_proj / v_proj / o_proj; 4.x named
    them query / key / value)."""
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] != "classifier"})
    if not set(targets) & set(linear):
        raise ValueError(f"peft.target_modules={targets} matched no layer of the vision model; its Linear layers "
                         f"are {linear} (seed 001 adapts the query and value projections)")


def wrap_peft(model: torch.nn.Module, peft_config, seed: int, head: str = "causal_lm", total_step: int | None = None,
              tokenizer=None):
    """``peft.get_peft_model`` with the adapter of ``peft.type``; its random init is drawn from ``seed`` so
    that every process (simulation, Flower client, resumed run) builds the same initial adapter.

    With ``head="classification"`` the task type is SEQ_CLS: peft then also trains the new classifier
    head (``modules_to_save``), whose copy is part of the adapter state and travels with it. With
    ``head="seq2seq"`` it is SEQ_2_SEQ_LM (T5: the adapter sits in encoder and decoder alike, prompt-learning
    types prepend to the encoder's input), and the causal default targets become the architecture's own
    (:func:`seq2seq_targets`).
    ``tokenizer`` is needed only by prompt tuning initialised from text."""
    from peft import get_peft_model

    if head == "seq2seq":
        peft_config = seq2seq_targets(model, peft_config)
    config = peft_library_config(peft_config, head=head, total_step=total_step)
    if head == "image_classification":
        _check_image_targets(model, list(peft_config.target_modules))
    if getattr(config, "prompt_tuning_init_text", None) is not None:
        config.tokenizer_name_or_path = getattr(tokenizer, "name_or_path", None)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if getattr(peft_config, "type", "lora") == "prompt_tuning" and peft_config.prompt_init == "text":
            wrapped = _prompt_tuning_from_text(model, config, tokenizer)
        else:
            wrapped = get_peft_model(model, config)
    finally:
        torch.random.set_rng_state(state)
    if not adapter_parameters(wrapped):
        raise ValueError(f"peft.target_modules {peft_config.target_modules} matched no module of the model")
    return wrapped


def seq2seq_targets(model: torch.nn.Module, peft_config):
    """``peft_config`` with the architecture's LoRA targets (peft's table: T5 -> q, v) in place of the causal
    default (q/k/v/o_proj, which an encoder-decoder such as T5 does not have), so ``model.name:
    google/flan-t5-small`` needs no peft.target_modules. Targets the user chose that match are kept; a list
    that matches nothing still fails in :func:`wrap_peft` naming peft.target_modules."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as LORA_TARGETS

    targets = getattr(peft_config, "target_modules", None)
    if targets is None or list(targets) != list(DEFAULT_TARGET_MODULES):
        return peft_config
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    own = LORA_TARGETS.get(getattr(model.config, "model_type", ""))
    if own is None or any(t in leaves for t in targets):
        return peft_config
    return peft_config.model_copy(update={"target_modules": list(own)})


def wrap_lora(model: torch.nn.Module, peft_config, seed: int, head: str = "causal_lm"):
    """:func:`wrap_peft` (its former name, when LoRA was the only type)."""
    return wrap_peft(model, peft_config, seed, head=head)


def _prompt_tuning_from_text(model, config, tokenizer):
    """Prompt tuning initialised from text with the run's own tokenizer (peft would load one by name,
    which the bundled and tiny models do not have on the Hub): random init, then the virtual tokens'
    embeddings set to the text's token embeddings, repeated to fill ``num_virtual_tokens``."""
    import peft
    from peft import get_peft_model

    if tokenizer is None:
        raise ValueError("peft.prompt_init=text needs the model's tokenizer")
    text = config.prompt_tuning_init_text
    config.prompt_tuning_init = peft.PromptTuningInit.RANDOM
    config.prompt_tuning_init_text = None
    wrapped = get_peft_model(model, config)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"peft.prompt_init_text {text!r} has no tokens")
    n = config.num_virtual_tokens
    ids = torch.tensor((ids * (n // len(ids) + 1))[:n])
    embedding = wrapped.prompt_encoder[wrapped.active_adapter].embedding
    with torch.no_grad():
        embedding.weight.copy_(wrapped.word_embeddings(ids.to(wrapped.word_embeddings.weight.device)).float())
    return wrapped


def adalora_step_hook(model: torch.nn.Module):
    """For an AdaLoRA model, the start of one client job's local rank allocation: the allocator's
    importance scores are reset (allocation is local to each job, nothing of another client's scores
    carries over) and the returned ``hook(step)`` (1-based, called after each optimizer step while the
    gradients are still there) runs peft's ``update_and_allocate``, which zeroes the singular values E
    of the least important triplets down to the scheduled budget. None for any other adapter type.
    The rank pattern peft records in the shared config is cleared at the job's end
    (:func:`end_adalora_job`): the global adapter keeps every triplet (see docs/peft_types.md)."""
    base = getattr(model, "base_model", None)
    allocator = getattr(base, "rankallocator", None)
    if allocator is None:
        return None
    allocator.reset_ipt()
    for config in base.peft_config.values():
        config.rank_pattern = None

    def hook(step: int, _loss=None) -> None:
        base.update_and_allocate(step - 1)

    return hook


def end_adalora_job(model: torch.nn.Module) -> None:
    base = getattr(model, "base_model", None)
    if getattr(base, "rankallocator", None) is None:
        return
    base.rankallocator.reset_ipt()
    for config in base.peft_config.values():
        config.rank_pattern = None


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
    if cfg.model.head == "image_classification":
        return len(data.classes())
    if cfg.model.head != "classification":
        return None
    return 1 if cfg.training.objective == "reward" else len(data.classes())


def load_experiment_model(cfg, data, device: torch.device | None = None):
    """The base model of an experiment config, with the head its data needs (a classifier gets one
    output per class of ``data``), on its device, quantised and checkpointed as configured, wrapped
    with LoRA: what the engine and every Flower node build. Returns (the ``LoadedModel`` with tokenizer
    and load facts, the wrapped model)."""
    from fedpeft.models import registry

    head = registry.model_head(cfg.model)  # seq2seq for an encoder-decoder (config.json), before weights load
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
    wrapped = wrap_peft(base, cfg.peft, seed=cfg.seed, head=head, total_step=cfg.federation.local_steps,
                        tokenizer=loaded.tokenizer)
    if cfg.training.gradient_checkpointing:
        enable_gradient_checkpointing(wrapped)
    return loaded, wrapped


def lora_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Adapter-key module name (as ``adapters.module_name`` gives it) -> the PEFT LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def base_tensor(model: torch.nn.Module, modules: dict[str, torch.nn.Module], name: str) -> torch.nn.Parameter:
    """The base weight ``name`` stands for: a LoRA module's frozen base weight (``name`` a key of
    ``modules``, FLoRA / FedEx-LoRA), else the model's parameter of that name (FedOT's fully trained
    adapter blocks: every parameter of a block, norms included). Adapter tensors are not base weights."""
    if name in modules:
        return modules[name].get_base_layer().weight
    try:
        param = model.get_parameter(name)
    except AttributeError:
        param = None
    if param is None or is_adapter_param(name):
        raise KeyError(f"base weight '{name}' is neither a LoRA module nor a base parameter of the model")
    return param


def add_to_base_weight(model: torch.nn.Module, deltas: dict[str, torch.Tensor],
                       master: dict[str, torch.Tensor] | None = None) -> None:
    """W0 <- W0 + delta for each named LoRA module (or base parameter: ``base_tensor``), in place (no
    copy of the base model is made).

    With ``master`` (a dict the caller keeps for the whole run), a weight held in a lower precision than
    float32 (``model.dtype: bfloat16``) gets a float32 master copy of itself, made at its first merge: the
    delta is added to the master and the weight becomes the master rounded once. Added straight to a
    bfloat16 weight (8 bits of mantissa), a delta under half a unit in the last place of W0 is rounded
    away at every merge, so FLoRA's and FedEx-LoRA's merges would never accumulate; with the master the
    weight stays the nearest bfloat16 to W0 + sum of the deltas."""
    modules = lora_modules(model)
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = base_tensor(model, modules, name)
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
    return {name: (master[name] if name in master else base_tensor(model, modules, name)).detach().to("cpu").clone()
            for name in names}


def master_from_saved(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float32 masters a resumed run continues with: saved float32 values of weights the model holds
    in a lower precision (what ``base_weights`` wrote with a master)."""
    modules = lora_modules(model)
    out = {}
    for name, value in weights.items():
        weight = base_tensor(model, modules, name)
        if value.dtype == torch.float32 and weight.dtype != torch.float32:
            out[name] = value.detach().to(weight.device).clone()
    return out


def set_base_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    modules = lora_modules(model)
    with torch.no_grad():
        for name, value in weights.items():
            base_tensor(model, modules, name).copy_(value)
