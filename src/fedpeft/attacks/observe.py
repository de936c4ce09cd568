"""What an honest-but-curious server sees, computed on a plain model for the victim's batch.

The split engine meters these same tensors; this module produces them without it, so the attacks can
be run and tested on any Hugging Face model:

- split learning: the activations crossing the bottom cut ``a`` (client → server), the activations at
  the top cut ``b`` (server → client) and the gradient of the client's loss with respect to them
  (client → server);
- plain FL (FedIT): the gradient of one local step with respect to the trainable (LoRA) parameters,
  which is what one SGD step uploads (update = −lr · gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedpeft.attacks.cut import bottom_forward, causal_lm_loss, cut_hook


@dataclass
class SplitObservation:
    activations: torch.Tensor          # hidden state after block a (batch × seq × hidden)
    top_activations: torch.Tensor      # hidden state after block b
    top_gradient: torch.Tensor         # d loss / d top_activations
    attention_mask: torch.Tensor


def observe_split(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, cut: int,
                  top_cut: int) -> SplitObservation:
    """The victim's step on a causal LM (labels = the input, shifted): the tensors crossing both cuts."""
    with torch.no_grad():
        activations = bottom_forward(model, cut, input_ids=input_ids, attention_mask=attention_mask)
        top = bottom_forward(model, top_cut, input_ids=input_ids, attention_mask=attention_mask)
    # The top part runs on the received activations as a leaf tensor: its gradient is what goes back.
    top = top.clone().requires_grad_(True)
    with cut_hook(model, top_cut, replace=top):
        out = model(input_ids=input_ids, attention_mask=attention_mask)
    loss = causal_lm_loss(out.logits, input_ids, attention_mask)
    (gradient,) = torch.autograd.grad(loss, top)
    return SplitObservation(activations.detach(), top.detach(), gradient.detach(), attention_mask)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def observe_lora_gradient(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradient of one local step's loss with respect to every trainable parameter (the LoRA factors
    of a PEFT model): for one SGD step this is the uploaded update divided by −lr."""
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters: nothing is uploaded to attack")
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    loss = causal_lm_loss(out.logits, input_ids, attention_mask)
    grads = torch.autograd.grad(loss, [p for _, p in params])
    return {name: g.detach() for (name, _), g in zip(params, grads)}
