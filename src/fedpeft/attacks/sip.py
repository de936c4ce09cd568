"""SIP, learned inversion: a small model trained on *auxiliary* public text to map cut-layer
activations back to tokens, then applied to the victims' activations.

The attacker runs the bottom part (it knows its pre-trained weights) on its own auxiliary texts, which
gives (activation, token) pairs, and fits an inversion model by cross-entropy: per position a
LayerNorm → Linear → GELU → Linear head over the vocabulary, optionally preceded by one bidirectional
transformer-encoder layer so a position can read its neighbours (``context``). The auxiliary data must
be a different dataset from the victims' (the attacker never sees client text).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedpeft.attacks.cut import bottom_forward, check_cut, input_embedding_matrix


class SIPOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(300, ge=1)
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    hidden: int = Field(256, ge=1)
    context: bool = False
    seed: int = 0


class InversionModel(nn.Module):
    """Activations (batch × seq × hidden) → token logits (batch × seq × vocab)."""

    def __init__(self, hidden_size: int, vocab_size: int, width: int, context: bool):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        heads = next(h for h in (4, 2, 1) if hidden_size % h == 0)
        self.context = nn.TransformerEncoderLayer(hidden_size, heads, width, dropout=0.0, batch_first=True) \
            if context else None
        self.head = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, vocab_size))

    def forward(self, activations: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(activations.float())
        if self.context is not None:
            pad = None if attention_mask is None else attention_mask == 0
            x = self.context(x, src_key_padding_mask=pad)
        return self.head(x)


def auxiliary_activations(model: nn.Module, cut: int, batches: Sequence[dict[str, torch.Tensor]]):
    """(activations, token ids, mask) of the auxiliary batches after block ``cut``, concatenated along
    the batch (each batch padded to the longest sequence overall)."""
    if not batches:
        raise ValueError("SIP needs auxiliary data: no auxiliary batch was given")
    length = max(b["input_ids"].shape[1] for b in batches)
    acts, ids, masks = [], [], []
    for b in batches:
        with torch.no_grad():
            h = bottom_forward(model, cut, input_ids=b["input_ids"], attention_mask=b["attention_mask"]).float()
        pad = length - h.shape[1]
        acts.append(nn.functional.pad(h, (0, 0, 0, pad)))
        ids.append(nn.functional.pad(b["input_ids"], (0, pad)))
        masks.append(nn.functional.pad(b["attention_mask"], (0, pad)))
    return torch.cat(acts), torch.cat(ids), torch.cat(masks)


def train_inversion_model(model: nn.Module, cut: int, batches: Sequence[dict[str, torch.Tensor]],
                          options: SIPOptions | None = None) -> InversionModel:
    """Fit the inversion model on the auxiliary batches' activations at ``cut`` (cross-entropy on the
    non-padded positions, Adam, seeded init and batch order)."""
    options = options or SIPOptions()
    check_cut(model, cut)
    acts, ids, masks = auxiliary_activations(model, cut, batches)
    vocab = input_embedding_matrix(model).shape[0]
    generator = torch.Generator().manual_seed(options.seed)
    state = torch.random.get_rng_state()
    torch.manual_seed(options.seed)
    try:
        inversion = InversionModel(acts.shape[-1], vocab, options.hidden, options.context).to(acts.device)
    finally:
        torch.random.set_rng_state(state)
    optimizer = torch.optim.Adam(inversion.parameters(), lr=options.lr)
    for _ in range(options.steps):
        rows = torch.randint(0, acts.shape[0], (min(options.batch_size, acts.shape[0]),), generator=generator)
        logits = inversion(acts[rows], masks[rows])
        keep = masks[rows].bool()
        loss = nn.functional.cross_entropy(logits[keep], ids[rows][keep])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return inversion.eval()


def sip_logits(inversion: InversionModel, activations: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return inversion(activations, attention_mask)


def sip_attack(inversion: InversionModel, activations: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Recovered token ids (batch × seq): the inversion model's most likely token at each position."""
    return sip_logits(inversion, activations, attention_mask).argmax(-1)
