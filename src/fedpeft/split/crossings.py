"""The cuts inside ONE shared model: what crosses them is recorded, metered and defended.

``SplitModel(model, cut, defences)`` installs three hooks on the model it is given:

- on the input embeddings: the clean token embeddings are kept for NoPeek; with d_chi-privacy the
  noisy ones go on (the client's own input privatisation);
- at cut 1 (input of block a): an autograd function whose forward is what the client sends up (the
  bottom's output, plus Gaussian noise when sigma > 0: ``act_up``) and whose backward receives the
  gradient the server sends down (``grad_down``), to which the client adds NoPeek's own gradient;
- at cut 2 (input of block b; the output of the last block when b = L): forward = what the server sends
  down (``act_down``), backward = the gradient the client sends up (``grad_up``).

An identity autograd function at a cut is exactly SplitLLM's detach-and-send: the part above computes
with a leaf that holds the received values, and the part below runs its backward from the received
gradient. So one ``loss.backward()`` of the whole model is the three-stage split backward (test:
``tests/test_split_parts.py`` checks the gradients against an explicit three-stage backward and against
the model without cuts). Every crossing's bytes are ``numel * element_size`` =
batch * seq * hidden * dtype size.

Recording and defences act only while the model is in training mode (``model.train()``): evaluation and
generation run the plain model. Gradient checkpointing would rerun the hooks in the backward (twice
metered, fresh noise), so a SplitModel refuses a checkpointed model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from fedpeft.split.defences import dchi_privatise, distance_correlation, gaussian_noise
from fedpeft.split.layout import Layout, find_layout
from fedpeft.split.spec import CutSpec, check_cut

CROSSINGS = ("act_up", "act_down", "grad_up", "grad_down")
"""act_up: cut 1, client -> server; act_down: cut 2, server -> client; grad_up: cut 2, client -> server;
grad_down: cut 1, server -> client."""


@dataclass(frozen=True)
class Defences:
    activation_sigma: float = 0.0
    """Std of the Gaussian noise added to the activations sent up at cut 1 (0: none)."""
    dchi_epsilon: float | None = None
    """d_chi-privacy epsilon on the input embeddings (None: none; smaller = more noise)."""
    nopeek_alpha: float = 0.0
    """Weight of NoPeek's dCor(input embeddings, cut-1 activations) in the client's loss (0: none)."""


@dataclass
class Crossing:
    name: str
    """One of CROSSINGS."""
    cut: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    tensor: torch.Tensor | None = None
    """The values that crossed (detached), kept only while recording with ``keep_tensors``."""


@dataclass
class CutMeter:
    """Bytes that crossed each cut since the last ``reset``; ``forwards`` counts micro-batch forwards."""

    bytes: Counter = field(default_factory=Counter)
    forwards: int = 0
    forward_bytes: list[int] = field(default_factory=list)
    """Bytes of all four crossings of each micro-batch, in order."""
    nopeek: list[torch.Tensor] = field(default_factory=list)

    def step_bytes(self, steps: int) -> list[int]:
        """Bytes per optimizer step: the micro-batches grouped evenly over ``steps``."""
        if steps <= 0 or len(self.forward_bytes) % steps:
            return []
        per = len(self.forward_bytes) // steps
        return [sum(self.forward_bytes[i * per:(i + 1) * per]) for i in range(steps)]

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


def crossing_bytes(t: torch.Tensor) -> int:
    """Bytes of one crossing tensor: numel * element size (batch * seq * hidden * dtype size)."""
    return t.numel() * t.element_size()


class _Cut(torch.autograd.Function):
    """Identity across a cut (plus the sender's noise in forward); both directions reported to ``site``."""

    @staticmethod
    def forward(ctx, h, site):
        ctx.site = site
        sent = site.send_forward(h)
        ctx.save_for_backward(h)
        return sent

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        return ctx.site.send_backward(grad, h), None


class _Site:
    def __init__(self, owner: SplitModel, cut: int) -> None:
        self.owner, self.cut = owner, cut

    def send_forward(self, h: torch.Tensor) -> torch.Tensor:
        defences = self.owner.defences
        sent = h
        if self.cut == 1 and defences.activation_sigma > 0:
            sent = gaussian_noise(h, defences.activation_sigma, self.owner.generator_for(h.device))
        sent = sent.clone() if sent is h else sent
        self.owner.record("act_up" if self.cut == 1 else "act_down", self.cut, sent)
        return sent

    def send_backward(self, grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        self.owner.record("grad_down" if self.cut == 1 else "grad_up", self.cut, grad)
        alpha = self.owner.defences.nopeek_alpha
        inputs = self.owner.inputs
        if self.cut == 1 and alpha > 0 and inputs is not None:
            # NoPeek's loss is the client's own: its gradient joins the server's at the bottom's output.
            with torch.enable_grad():
                hz = h.detach().requires_grad_(True)
                penalty = alpha * distance_correlation(inputs, hz)
                (extra,) = torch.autograd.grad(penalty, hz)
            self.owner.meter.nopeek.append(penalty.detach())
            grad = grad + extra.to(grad.dtype)
        return grad


class SplitModel:
    """Cuts installed in ``model`` (see the module docstring). ``remove()`` takes the hooks out."""

    def __init__(self, model: torch.nn.Module, cut: CutSpec, defences: Defences | None = None,
                 layout: Layout | None = None) -> None:
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if getattr(base, "is_activation_checkpointing", False):
            raise ValueError("split learning (method 'sfl') cannot run with training.gradient_checkpointing=true: "
                             "the recomputed forward would cross the cuts twice (metered twice, fresh noise)")
        self.layout = layout or find_layout(model)
        self.cut = check_cut(cut, self.layout.num_blocks)
        self.defences = defences or Defences()
        self.meter = CutMeter()
        self.keep_tensors = False
        self._recording = False
        self.records: list[Crossing] = []
        self.batches: list[dict[str, torch.Tensor]] = []
        """While recording with tensors: each training forward's inputs (input_ids, attention_mask, labels),
        the ground truth an attack is scored against."""
        self.inputs: torch.Tensor | None = None
        self._seed = 0
        self._generators: dict[str, torch.Generator] = {}
        self._sites = (_Site(self, 1), _Site(self, 2))
        blocks = self.layout.blocks
        self._handles = [
            model.register_forward_pre_hook(self._on_model_inputs, with_kwargs=True),
            self.layout.embeddings.register_forward_hook(self._on_embeddings),
            blocks[self.cut.first].register_forward_pre_hook(self._pre_hook(0), with_kwargs=True),
        ]
        if self.cut.second < len(blocks):
            self._handles.append(blocks[self.cut.second].register_forward_pre_hook(self._pre_hook(1), with_kwargs=True))
        else:
            self._handles.append(blocks[-1].register_forward_hook(self._post_hook))

    # --- control --------------------------------------------------------------------------------------
    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reseed(self, seed: int) -> None:
        """Defence noise from now on is drawn from ``seed`` (the strategy reseeds per client job)."""
        self._seed = int(seed)
        self._generators = {}

    def reset_meter(self) -> CutMeter:
        meter, self.meter = self.meter, CutMeter()
        return meter

    @contextmanager
    def recording(self, keep_tensors: bool = True) -> Iterator[list[Crossing]]:
        """Collect every crossing (with its values when ``keep_tensors``) inside the block."""
        self.start_recording(keep_tensors)
        try:
            yield self.records
        finally:
            self.stop_recording()

    def start_recording(self, keep_tensors: bool = True) -> None:
        self.records, self.batches, self.keep_tensors, self._recording = [], [], keep_tensors, True

    def stop_recording(self) -> list[Crossing]:
        self.keep_tensors = self._recording = False
        return self.records

    def generator_for(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[key]

    def _active(self, module: torch.nn.Module) -> bool:
        return module.training and torch.is_grad_enabled()

    def record(self, name: str, cut: int, t: torch.Tensor) -> None:
        nbytes = crossing_bytes(t)
        self.meter.bytes[name] += nbytes
        if name == "act_up":
            self.meter.forwards += 1
            self.meter.forward_bytes.append(0)
        if self.meter.forward_bytes:
            self.meter.forward_bytes[-1] += nbytes
        if self._recording:
            self.records.append(Crossing(name, cut, tuple(t.shape), t.dtype, nbytes,
                                         t.detach().clone() if self.keep_tensors else None))

    # --- hooks ----------------------------------------------------------------------------------------
    def _on_model_inputs(self, module, args, kwargs):
        if self._recording and self.keep_tensors and self._active(module):
            self.batches.append({k: kwargs[k].detach().clone() for k in ("input_ids", "attention_mask", "labels")
                                 if torch.is_tensor(kwargs.get(k))})

    def _on_embeddings(self, module, args, output):
        if not self._active(module):
            return None
        self.inputs = output.detach()
        eps = self.defences.dchi_epsilon
        if eps is not None:
            return dchi_privatise(output, eps, self.generator_for(output.device))
        return None

    def _pre_hook(self, which: int):
        site = self._sites[which]

        def hook(module, args, kwargs):
            if not self._active(module):
                return None
            if args:
                return (_Cut.apply(args[0], site), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": _Cut.apply(kwargs["hidden_states"], site)}
        return hook

    def _post_hook(self, module, args, output):
        if not self._active(module):
            return None
        if isinstance(output, tuple):
            return (_Cut.apply(output[0], self._sites[1]), *output[1:])
        return _Cut.apply(output, self._sites[1])
