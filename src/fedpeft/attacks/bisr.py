"""BiSR, bidirectional semi-white-box reconstruction (SplitLLM, CCS 2024): the learned inversion
(SIP) gives the starting point, then relaxed tokens are refined by optimisation against both what the
server sees going up (the activations after block ``a``) and coming down (the gradient at block ``b``).

Unknowns: token logits ``Z`` (batch × seq × vocab), started at ``scale · log_softmax(SIP logits)``;
tokens ``softmax(Z)``, input embeddings ``softmax(Z) @ E``. The loss is

    w_f · ‖h_a(Z) − h_a‖² / mean(h_a²)  +  w_b · (1 − cos(∂ℓ(Z)/∂h_b, g_b))

where ``h_a(Z)`` is the bottom part's output on the soft tokens, ``ℓ(Z)`` the language-model loss of
the whole model on them with themselves as soft targets, and ``g_b`` the observed gradient at cut ``b``.
Both terms are scale-free, so the weights compare. Without a gradient only the forward term is used
(BiSR(f)); the attacker knows the pre-trained weights of every part (the LoRA deltas are ignored).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedpeft.attacks.cut import (causal_lm_loss, check_cut, cut_hook, input_embedding_matrix,
                                 second_order_attention)


class BiSROptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(100, ge=1)
    lr: float = Field(0.05, gt=0)
    forward_weight: float = Field(1.0, ge=0)
    backward_weight: float = Field(1.0, ge=0)
    init_scale: float = Field(1.0, gt=0)


def bisr_attack(model: nn.Module, init_logits: torch.Tensor, cut: int, activations: torch.Tensor,
                attention_mask: torch.Tensor | None = None, top_cut: int | None = None,
                top_gradient: torch.Tensor | None = None, options: BiSROptions | None = None) -> torch.Tensor:
    """Recovered token ids (batch × seq), refined from ``init_logits`` (the SIP output)."""
    options = options or BiSROptions()
    check_cut(model, cut)
    use_backward = top_gradient is not None and options.backward_weight > 0
    if use_backward:
        if top_cut is None:
            raise ValueError("top_cut: a top gradient was given without the cut it was observed at")
        check_cut(model, top_cut, "top_cut")
    matrix = input_embedding_matrix(model).detach()
    target = activations.detach().float()
    target_scale = target.pow(2).mean()
    logits_z = (options.init_scale * torch.log_softmax(init_logits.detach().float(), -1)).requires_grad_(True)
    optimizer = torch.optim.Adam([logits_z], lr=options.lr)
    for _ in range(options.steps):
        soft = torch.softmax(logits_z, -1)
        embeds = soft.to(matrix.dtype) @ matrix
        with cut_hook(model, cut) as seen_a, cut_hook(model, top_cut or cut) as seen_b, second_order_attention():
            out = model(inputs_embeds=embeds, attention_mask=attention_mask)
        loss = options.forward_weight * (seen_a[0].float() - target).pow(2).mean() / target_scale
        if use_backward:
            lm_loss = causal_lm_loss(out.logits, soft, attention_mask)
            (predicted,) = torch.autograd.grad(lm_loss, seen_b[0], create_graph=True)
            cos = nn.functional.cosine_similarity(predicted.reshape(-1).float(), top_gradient.reshape(-1).float(), dim=0)
            loss = loss + options.backward_weight * (1 - cos)
        optimizer.zero_grad()
        (logits_z.grad,) = torch.autograd.grad(loss, logits_z)
        optimizer.step()
    return logits_z.detach().argmax(-1)
