"""Cut-layer views of a plain Hugging Face model, without splitting it.

A cut ``a`` means: the bottom part is the embeddings and the first ``a`` transformer blocks, so the
activation crossing that cut is the hidden state *after* block ``a`` (``hidden_states[a]`` of
``output_hidden_states``). Both views below use forward hooks on the model's own block list, so
rotary positions, causal or padding masks and token-type embeddings are exactly the model's:

- ``bottom_forward``: embeddings (or given input embeddings) -> hidden state after block ``a``; the
  forward stops there (the rest of the model does not run).
- ``forward_with_cut``: the whole model, with the hidden state after block ``b`` exposed (for gradients
  with respect to it) or replaced by a given tensor (the top part as a function of its input).

Works on PEFT-wrapped models too (the hooks sit on the base model's blocks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


class _StopForward(Exception):
    """Raised by the bottom hook once the cut activation is captured: nothing above the cut runs."""


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (Llama ``model.layers``, BERT ``encoder.layer``, GPT-2 ``h``):
    the first ``nn.ModuleList`` with ``config.num_hidden_layers`` entries."""
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}: no nn.ModuleList with "
                     f"config.num_hidden_layers={count} entries")


def num_blocks(model: nn.Module) -> int:
    return len(transformer_blocks(model))


def check_cut(model: nn.Module, cut: int, setting: str = "cut") -> int:
    """``cut`` must leave at least one block on each side: 1 ≤ cut ≤ layers − 1."""
    layers = num_blocks(model)
    if not isinstance(cut, int) or isinstance(cut, bool) or not 1 <= cut <= layers - 1:
        raise ValueError(f"{setting}: {cut!r} is outside the model's layers; expected an integer from 1 to "
                         f"{layers - 1} (the model has {layers} transformer blocks; a cut after block a keeps "
                         "embeddings + blocks 1..a below it)")
    return cut


def input_embedding_matrix(model: nn.Module) -> torch.Tensor:
    """The token embedding matrix (vocab × hidden), the attacker's dictionary for nearest-token lookup."""
    return model.get_input_embeddings().weight


def _block_output(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_block_output(output, hidden: torch.Tensor):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _model_inputs(input_ids, inputs_embeds, attention_mask) -> dict:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids and inputs_embeds")
    kwargs = {"attention_mask": attention_mask}
    if input_ids is not None:
        kwargs["input_ids"] = input_ids
    else:
        kwargs["inputs_embeds"] = inputs_embeds
    return kwargs


def bottom_forward(model: nn.Module, cut: int, *, input_ids: torch.Tensor | None = None,
                   inputs_embeds: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden state after block ``cut`` (batch × seq × hidden), differentiable in ``inputs_embeds``."""
    block = transformer_blocks(model)[cut - 1]
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(_block_output(output))
        raise _StopForward

    handle = block.register_forward_hook(hook)
    try:
        model(**_model_inputs(input_ids, inputs_embeds, attention_mask))
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"block {cut} did not run")
    return captured[0]


@contextlib.contextmanager
def cut_hook(model: nn.Module, cut: int, replace: torch.Tensor | None = None) -> Iterator[list[torch.Tensor]]:
    """While active, the hidden state after block ``cut`` is appended to the yielded list at each forward;
    with ``replace``, that hidden state is replaced by ``replace`` first (the top part then runs on it)."""
    seen: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        if replace is not None:
            output = _replace_block_output(output, replace)
        seen.append(_block_output(output))
        return output

    handle = transformer_blocks(model)[cut - 1].register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def second_order_attention():
    """Context for attacks that differentiate a gradient: scaled-dot-product attention on its math
    kernel (the fused CPU/flash kernels have no double backward)."""
    return sdpa_kernel(SDPBackend.MATH)


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy, ``targets`` hard ids (batch × seq) or soft distributions
    (batch × seq × vocab); position t predicts target t+1; ``mask`` (batch × seq) drops padded targets."""
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    shifted = targets[:, 1:]
    if shifted.dim() == 2:
        per_position = -log_probs.gather(-1, shifted.unsqueeze(-1)).squeeze(-1)
    else:
        per_position = -(shifted * log_probs).sum(-1)
    keep = torch.ones_like(per_position) if mask is None else mask[:, 1:].to(per_position.dtype)
    return (per_position * keep).sum() / keep.sum().clamp_min(1)


def nearest_tokens(embeddings: torch.Tensor, matrix: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """For each embedding (… × hidden), the id of the closest row of ``matrix`` (vocab × hidden)."""
    flat = embeddings.reshape(-1, embeddings.shape[-1]).to(matrix.dtype)
    if metric == "cosine":
        scores = nn.functional.normalize(flat, dim=-1) @ nn.functional.normalize(matrix, dim=-1).T
        ids = scores.argmax(-1)
    elif metric == "l2":
        ids = torch.cdist(flat, matrix).argmin(-1)
    else:
        raise ValueError(f"metric: '{metric}' is not a distance; valid: cosine, l2")
    return ids.reshape(embeddings.shape[:-1])
