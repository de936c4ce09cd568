"""EIA, embedding inversion: find input embeddings whose bottom-part activations match the observed
ones, then read the nearest token of each optimised embedding.

The attacker knows the bottom part's weights (the pre-trained embeddings and first ``a`` blocks; in
split fine-tuning the bottom LoRA is small or absent) and the observed activations ``h_a``. It minimises
the mean squared error ‖bottom(X) − h_a‖² over X (batch × seq × hidden) with Adam, starting from
random embeddings drawn with the embedding matrix's scale, and maps each row of X to the token whose
embedding is most similar (cosine by default).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedpeft.attacks.cut import bottom_forward, check_cut, input_embedding_matrix, nearest_tokens


class EIAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(600, ge=1)
    lr: float = Field(0.05, gt=0)
    metric: str = Field("cosine", pattern="^(cosine|l2)$")
    seed: int = 0


def eia_attack(model: nn.Module, activations: torch.Tensor, cut: int, attention_mask: torch.Tensor | None = None,
               options: EIAOptions | None = None) -> torch.Tensor:
    """Recovered token ids (batch × seq) from the activations after block ``cut``."""
    options = options or EIAOptions()
    check_cut(model, cut)
    matrix = input_embedding_matrix(model).detach()
    generator = torch.Generator().manual_seed(options.seed)
    start = torch.randn(activations.shape[:-1] + (matrix.shape[1],), generator=generator) * matrix.float().std()
    embeds = start.to(matrix.device, matrix.dtype).requires_grad_(True)
    target = activations.detach()
    optimizer = torch.optim.Adam([embeds], lr=options.lr)
    for _ in range(options.steps):
        optimizer.zero_grad()
        hidden = bottom_forward(model, cut, inputs_embeds=embeds, attention_mask=attention_mask)
        loss = (hidden.float() - target.float()).pow(2).mean()
        loss.backward()
        optimizer.step()
    return nearest_tokens(embeds.detach(), matrix, options.metric)
