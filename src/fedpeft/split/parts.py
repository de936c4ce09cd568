"""The small API other code (the attacks) calls on a split model.

- ``bottom_forward(model, cut, ...)``: the activations the bottom part sends up at cut 1, computed by
  running only the bottom (the forward stops at cut 1), differentiable with respect to ``inputs_embeds``
  and the bottom's parameters (embedding inversion optimises the inputs through it). No defence: in
  evaluation mode the defences are off; call it on ``model.eval()`` for the clean map.
- ``client_step(split, batch)``: one client forward/backward through the split model, returning the loss
  and every tensor that crossed the cuts (activations up at cut 1 and down at cut 2, gradients up at
  cut 2 and down at cut 1), as the server (or the client) saw them. Parameter gradients stay in ``.grad``.

Both work for decoders (tiny-llama, SmolLM2) and encoders with a classification head (tiny-bert, MiniLM).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedpeft.split.crossings import Crossing, SplitModel
from fedpeft.split.layout import find_layout
from fedpeft.split.spec import CutSpec, check_cut, parse_cut


class _ReachedCut(Exception):
    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("reached cut 1")
        self.hidden = hidden


def bottom_forward(model: torch.nn.Module, cut: CutSpec | str, *, input_ids: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                   **model_kwargs) -> torch.Tensor:
    """The input of block ``a`` (the activations at cut 1) for these inputs: shape (batch, seq, hidden)."""
    spec = parse_cut(cut) if isinstance(cut, str) else cut
    layout = find_layout(model)
    check_cut(spec, layout.num_blocks)

    def stop(module, args, kwargs):
        raise _ReachedCut(args[0] if args else kwargs["hidden_states"])

    handle = layout.blocks[spec.first].register_forward_pre_hook(stop, with_kwargs=True, prepend=True)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **model_kwargs)
    except _ReachedCut as reached:
        return reached.hidden
    finally:
        handle.remove()
    raise RuntimeError(f"the forward never reached block {spec.first} (cut 1 of '{spec}')")


@dataclass
class StepRecord:
    loss: torch.Tensor
    crossings: list[Crossing]

    def by_name(self, name: str) -> list[Crossing]:
        return [c for c in self.crossings if c.name == name]


def client_step(split: SplitModel, batch: Mapping[str, torch.Tensor], keep_tensors: bool = True) -> StepRecord:
    """One forward and backward of ``batch`` (input_ids, attention_mask, labels) through ``split``'s model
    in training mode, recording every crossing. The caller zeroes gradients and restores the mode."""
    model = split.model
    model.train()
    with split.recording(keep_tensors=keep_tensors) as crossings:
        out = model(**dict(batch))
        out.loss.backward()
    return StepRecord(loss=out.loss.detach(), crossings=list(crossings))
