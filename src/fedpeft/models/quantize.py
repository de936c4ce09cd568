"""Quantised frozen base models through bitsandbytes (``pip install 'fedpeft[gpu]'``; CUDA only).

``4bit`` is QLoRA's recipe (Dettmers et al. 2023): NF4 weights, double quantisation of the scales,
bfloat16 compute. ``8bit`` is LLM.int8() (outlier threshold 6.0). Checkpoints quantise while loading
(transformers' ``BitsAndBytesConfig``); randomly initialised models (``random:<shape>``, ``tiny-llama``)
have their ``nn.Linear`` layers replaced by bitsandbytes' layers here, the way transformers does it,
and are then marked as k-bit models so that peft's ``prepare_model_for_kbit_training`` and LoRA
dispatch treat them exactly like a quantised checkpoint.

Not verified on a GPU in this repository's CI (no GPU there); ``bench/gpu_check.sh`` runs the GPU tests.
"""

from __future__ import annotations

import torch

COMPUTE_DTYPE = torch.bfloat16
SKIP_MODULES = ("lm_head", "score", "classifier")
"""Output heads stay in full precision, as transformers keeps them."""


def bnb_config(quantization: str):
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=COMPUTE_DTYPE)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    raise ValueError(f"model.quantization must be none, 4bit or 8bit, got {quantization!r}")


def _quantised_linear(linear: torch.nn.Linear, quantization: str, device: torch.device) -> torch.nn.Module:
    import bitsandbytes as bnb

    bias = linear.bias is not None
    weight = linear.weight.data
    if quantization == "4bit":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=COMPUTE_DTYPE,
                                  compress_statistics=True, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=6.0, device="meta")
        # Int8Params quantises on a CPU -> CUDA move.
        layer.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    return layer.to(device)  # the move to CUDA quantises the weight


def quantize_linear_layers(model: torch.nn.Module, quantization: str, device: torch.device) -> torch.nn.Module:
    """Replace every ``nn.Linear`` outside the output head by its bitsandbytes layer, one at a time (the
    full-precision weight of a layer is freed as soon as its quantised copy exists)."""
    if device.type != "cuda":
        raise ValueError(f"model.quantization={quantization} needs a CUDA device, got {device}")
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in SKIP_MODULES]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _quantised_linear(linear, quantization, device))
        del linear
    # What transformers sets on a quantised checkpoint; peft reads these flags.
    model.is_loaded_in_4bit = quantization == "4bit"
    model.is_loaded_in_8bit = quantization == "8bit"
    torch.cuda.empty_cache()
    return model
