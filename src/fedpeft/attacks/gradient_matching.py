"""Gradient matching (DLG, TAG): find inputs/labels whose gradient equals the observed one.

The attacker's unknowns are relaxed one-hot tokens: logits ``Z`` (batch × seq × vocab), tokens
``softmax(Z)``. For a causal LM the labels are the input shifted by one, so the same soft tokens are
both the input (embeddings ``softmax(Z) @ E``) and the soft targets of the loss. The gradient the soft
tokens produce is compared with the observed one by

- ``l2`` (DLG, Zhu et al. 2019): Σ ‖g' − g‖²;
- ``tag`` (TAG, Deng et al. 2021): Σ ‖g' − g‖² + α Σ |g' − g| (the L1 term with weight ``tag_alpha``);
- ``cosine`` (as in LAMP / Geiping et al.): 1 − cos(g', g) over all tensors concatenated;

minimised over ``Z`` with Adam (second-order gradients through the model), and the recovered tokens are
``argmax Z``. Two observations:

- ``top_gradient_attack``: split learning's gradient with respect to the activations at the top cut
  ``b``, which the client sends down. The server knows those activations (it computed them) and is
  assumed to know the top part's weights (pre-trained; a small top LoRA is ignored). Only the labels
  are unknown, so this recovers the *targets*: tokens 1..T−1 of the input.
- ``lora_gradient_attack``: plain FL's (FedIT) upload of one SGD step, i.e. the gradient with respect to
  the LoRA factors (update / −lr). The attacker knows the global model it sent, batch size and length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedpeft.attacks.cut import (causal_lm_loss, check_cut, cut_hook, input_embedding_matrix,
                                 second_order_attention)
from fedpeft.attacks.observe import trainable_parameters


class GradientMatchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(300, ge=1)
    lr: float = Field(0.1, gt=0)
    distance: str = Field("tag", pattern="^(l2|tag|cosine)$")
    tag_alpha: float = Field(0.01, ge=0)
    seed: int = 0


def gradient_distance(predicted: Sequence[torch.Tensor], observed: Sequence[torch.Tensor],
                      options: GradientMatchOptions) -> torch.Tensor:
    """The matching loss between two lists of gradients (see the module docstring)."""
    if options.distance == "cosine":
        p = torch.cat([g.reshape(-1).float() for g in predicted])
        o = torch.cat([g.reshape(-1).float() for g in observed])
        return 1 - torch.nn.functional.cosine_similarity(p, o, dim=0)
    diffs = [(p.float() - o.float()) for p, o in zip(predicted, observed)]
    loss = sum(d.pow(2).sum() for d in diffs)
    if options.distance == "tag":
        loss = loss + options.tag_alpha * sum(d.abs().sum() for d in diffs)
    return loss


def _start(shape: tuple[int, ...], options: GradientMatchOptions, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(options.seed)
    return (torch.randn(shape, generator=generator) * 0.1).to(device).requires_grad_(True)


def top_gradient_attack(model: nn.Module, top_activations: torch.Tensor, top_gradient: torch.Tensor, top_cut: int,
                        attention_mask: torch.Tensor | None = None,
                        options: GradientMatchOptions | None = None,
                        init_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Recovered target tokens (batch × (seq − 1)), aligned with ``input_ids[:, 1:]``, from the gradient
    crossing the top cut ``b`` (the hidden state after block ``b``)."""
    options = options or GradientMatchOptions()
    check_cut(model, top_cut, "top_cut")
    batch, seq = top_activations.shape[:2]
    mask = torch.ones(batch, seq, dtype=torch.long, device=top_activations.device) if attention_mask is None else attention_mask
    vocab = input_embedding_matrix(model).shape[0]
    hidden = top_activations.detach().clone().requires_grad_(True)
    placeholder = torch.zeros(batch, seq, dtype=torch.long, device=hidden.device)  # replaced at the cut
    with cut_hook(model, top_cut, replace=hidden), second_order_attention():
        logits = model(input_ids=placeholder, attention_mask=mask).logits  # one forward: the top is fixed
    logits_z = init_logits.detach().clone().requires_grad_(True) if init_logits is not None else \
        _start((batch, seq, vocab), options, hidden.device)
    optimizer = torch.optim.Adam([logits_z], lr=options.lr)
    for _ in range(options.steps):
        soft = torch.softmax(logits_z, dim=-1)
        loss = causal_lm_loss(logits, soft, mask)
        (predicted,) = torch.autograd.grad(loss, hidden, create_graph=True)
        distance = gradient_distance([predicted], [top_gradient], options)
        optimizer.zero_grad()
        (logits_z.grad,) = torch.autograd.grad(distance, logits_z)
        optimizer.step()
    return logits_z.detach().argmax(-1)[:, 1:]


def lora_gradient_attack(model: nn.Module, observed: dict[str, torch.Tensor], shape: tuple[int, int],
                         attention_mask: torch.Tensor | None = None,
                         options: GradientMatchOptions | None = None) -> torch.Tensor:
    """Recovered input tokens (batch × seq) from the gradient of one local step with respect to the
    trainable parameters (``observed``: name → gradient, as ``observe.observe_lora_gradient`` gives)."""
    options = options or GradientMatchOptions()
    params = [(name, p) for name, p in trainable_parameters(model) if name in observed]
    if not params:
        raise ValueError("the observed update names none of the model's trainable parameters; "
                         f"first observed names: {sorted(observed)[:3]}")
    matrix = input_embedding_matrix(model).detach()
    batch, seq = shape
    mask = torch.ones(batch, seq, dtype=torch.long, device=matrix.device) if attention_mask is None else attention_mask
    targets = [observed[name] for name, _ in params]
    logits_z = _start((batch, seq, matrix.shape[0]), options, matrix.device)
    optimizer = torch.optim.Adam([logits_z], lr=options.lr)
    for _ in range(options.steps):
        soft = torch.softmax(logits_z, dim=-1)
        with second_order_attention():
            out = model(inputs_embeds=(soft.to(matrix.dtype) @ matrix), attention_mask=mask)
        loss = causal_lm_loss(out.logits, soft, mask)
        predicted = torch.autograd.grad(loss, [p for _, p in params], create_graph=True)
        distance = gradient_distance(predicted, targets, options)
        optimizer.zero_grad()
        (logits_z.grad,) = torch.autograd.grad(distance, logits_z)
        optimizer.step()
    return logits_z.detach().argmax(-1)
