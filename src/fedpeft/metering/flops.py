"""Training FLOPs estimates from token counts and parameter counts (stated rules, not measurements).

Rules (per token of a forward + backward pass; a multiply-add counts as 2 FLOPs):

* **Full fine-tuning** (Kaplan et al. 2020): ``6 x N`` per token: forward ``2N``, backward ``4N``
  (gradient w.r.t. activations ``2N`` and w.r.t. weights ``2N``), N = parameters touched.
* **LoRA / frozen base** (the rule we report): ``4 x N_base + 6 x N_lora`` per token. The frozen base
  still costs its forward ``2 N_base`` and the activation-gradient half of its backward ``2 N_base``
  (needed to reach the adapters of earlier layers), but no weight gradients; the adapter parameters
  cost the full ``6 N_lora``.

Attention's sequence-length term (``~ 2 x n_layers x seq_len x d_model`` per token, forward) is left
out, as in both rules; it is small for the short sequences of federated fine-tuning. ``N_base`` should
exclude the input embedding table (a lookup, not a matmul) when the caller knows it; passing the total
parameter count overestimates by at most that table's share.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a type only: the FLOPs rules stay importable without torch (reports use them)
    import torch


def full_training_flops(tokens: float, params: int) -> float:
    """``6 x tokens x params``: forward + full backward over every parameter touched."""
    return 6.0 * float(tokens) * float(params)


def lora_training_flops(tokens: float, base_params: int, lora_params: int) -> float:
    """``tokens x (4 x base_params + 6 x lora_params)``: frozen base, trainable adapters."""
    return float(tokens) * (4.0 * float(base_params) + 6.0 * float(lora_params))


def forward_flops(tokens: float, params: int) -> float:
    """``2 x tokens x params``: inference / evaluation forward passes."""
    return 2.0 * float(tokens) * float(params)


def logical_numel(p: torch.Tensor) -> int:
    """Parameters a tensor stands for: bitsandbytes' 4-bit weights pack two values per byte of storage."""
    return p.numel() * 2 if type(p).__name__ == "Params4bit" else p.numel()


def count_parameters(model: torch.nn.Module, exclude_embeddings: bool = True) -> tuple[int, int]:
    """(frozen base parameters, trainable parameters) of ``model``, each tensor counted once.

    With ``exclude_embeddings`` the input embedding table is left out of the base count (a lookup costs
    no matmul FLOPs); a tied output head is then not counted either, which undercounts the head's
    ``2 x vocab x d`` matmul for tied models. Callers wanting the simple rule pass ``False``.
    """
    embedding_ids: set[int] = set()
    if exclude_embeddings and hasattr(model, "get_input_embeddings"):
        try:
            emb = model.get_input_embeddings()
            if emb is not None:
                embedding_ids = {id(p) for p in emb.parameters()}
        except (AttributeError, NotImplementedError):
            pass
    base = trainable = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += p.numel()
        elif id(p) not in embedding_ids:
            base += logical_numel(p)
    return base, trainable
