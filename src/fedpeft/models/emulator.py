"""Offsite tuning's emulator (Xiao et al. 2023; FedOT in FederatedScope-LLM): the model owner keeps the
full model; clients get the first ``a`` and last ``b`` transformer blocks (the adapter they train) around
a compressed, frozen copy of the middle (the emulator).

Compression here is uniform layer dropping: of the ``m = L - a - b`` middle blocks, ``n = round(m (1 - d))``
(half up, at least 1) are kept, evenly spaced from the first middle block to the last
(``floor(i (m - 1) / (n - 1))`` for ``i = 0..n-1``): drop ratio 0.2 keeps 8 of 10. Optionally the kept
blocks are aligned to the full middle by distillation (:func:`distill`): copies of them are trained so
that, fed the hidden states that enter the middle, their output matches the full middle's output
(mean squared error normalised by the target's mean square, offsite tuning's loss).

The model is never rebuilt: the emulator is a *view* of it (:meth:`Emulator.active`). While active, a
dropped block's ``forward`` passes its input through unchanged and a distilled block runs its trained
copy; parameter names (and so adapter keys) stay those of the full model, and leaving the view restores
the full middle exactly (nothing of it was touched).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

import torch

from fedpeft.adapters import is_adapter_param

LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers")
"""Where decoder-only models of transformers keep their block list (Llama/Mistral/Qwen, OPT, GPT-2/Bloom, ...)."""


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def block_list(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(qualified name in ``model.named_modules()``, the ModuleList of transformer blocks)."""
    base = _base(model)
    for path in LAYER_PATHS:
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            for name, module in model.named_modules():
                if module is obj:
                    return name, obj
    raise ValueError(f"FedOT: cannot find the transformer blocks of {type(base).__name__} "
                     f"(looked for {', '.join(LAYER_PATHS)})")


def check_split(num_layers: int, a: int, b: int) -> int:
    """The number of middle blocks ``L - a - b``; an error naming the options when none is left."""
    middle = num_layers - a - b
    if middle < 1:
        raise ValueError(f"method.options.a={a} and method.options.b={b} leave no middle block of the model's "
                         f"{num_layers} transformer blocks for the emulator; expected a + b <= {num_layers - 1}")
    return middle


def uniform_keep(middle: int, drop_ratio: float) -> list[int]:
    """Offsets (0-based, within the middle) of the blocks uniform layer dropping keeps."""
    if not 0 < drop_ratio < 1:
        raise ValueError(f"method.options.drop_ratio={drop_ratio}: expected a value in (0, 1)")
    n = max(1, min(middle, math.floor(middle * (1 - drop_ratio) + 0.5)))
    if n == 1:
        return [(middle - 1) // 2]
    return [math.floor(i * (middle - 1) / (n - 1)) for i in range(n)]


def _skip(hidden_states, *args, **kwargs):
    """A dropped block: its input passes through unchanged."""
    return hidden_states


def param_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


@dataclass
class Emulator:
    """The split of one model: adapter blocks, kept middle blocks (maybe distilled copies), dropped ones."""

    blocks: torch.nn.ModuleList
    prefix: str
    """Qualified name of the block list: block ``i``'s parameters are named ``{prefix}.{i}.*``."""
    a: int
    b: int
    kept: list[int]
    """Block indices of the middle kept in the emulator."""
    distilled: dict[int, torch.nn.Module] = field(default_factory=dict)
    """Block index -> its trained copy (after :func:`distill`); empty: the kept blocks are the owner's."""

    @classmethod
    def build(cls, model: torch.nn.Module, a: int, b: int, drop_ratio: float) -> Emulator:
        prefix, blocks = block_list(model)
        middle = check_split(len(blocks), a, b)
        kept = [a + i for i in uniform_keep(middle, drop_ratio)]
        return cls(blocks, prefix, a, b, kept)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def adapter_blocks(self) -> list[int]:
        return list(range(self.a)) + list(range(self.num_layers - self.b, self.num_layers))

    @property
    def middle(self) -> list[int]:
        return list(range(self.a, self.num_layers - self.b))

    @property
    def dropped(self) -> list[int]:
        return [i for i in self.middle if i not in set(self.kept)]

    def block_of(self, name: str) -> int | None:
        """The block index a parameter name belongs to (None: outside the blocks, e.g. embeddings, head)."""
        head = self.prefix + "."
        if not name.startswith(head):
            return None
        index = name[len(head):].split(".", 1)[0]
        return int(index) if index.isdigit() else None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The model as the clients see it: dropped blocks skipped, kept blocks (or their distilled copies)
        run. On exit every block's own ``forward`` is back."""
        patched = []
        try:
            for i in self.dropped:
                self.blocks[i].forward = _skip
                patched.append(i)
            for i, twin in self.distilled.items():
                self.blocks[i].forward = twin.__call__
                patched.append(i)
            yield
        finally:
            for i in patched:
                self.blocks[i].__dict__.pop("forward", None)

    # --- what leaves the owner ---------------------------------------------------------------------
    def block_parameters(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """Every base parameter of the adapter blocks (weights and norms; not the adapter tensors inside
        them), by its name in ``model``: what FedOT's ``adapter_training: full`` trains and sends."""
        blocks = set(self.adapter_blocks)
        return {name: p for name, p in model.named_parameters()
                if self.block_of(name) in blocks and not is_adapter_param(name)}

    def shipped_parameters(self, model: torch.nn.Module, travelling: Collection[str] = ()) -> dict[str, torch.Tensor]:
        """Every frozen base tensor a client needs to run the emulator-model: the model's parameters
        and buffers except the adapter's own tensors (sent each round), ``travelling`` (base tensors
        that are sent each round too: fully trained adapter blocks) and the dropped blocks; a kept
        block is its distilled copy when there is one. Tensors are the model's own (no copies)."""
        out: dict[str, torch.Tensor] = {}
        dropped = set(self.dropped)
        travelling = set(travelling)
        seen: set[int] = set()
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if is_adapter_param(name) or id(tensor) in seen or name in travelling:
                continue
            block = self.block_of(name)
            if block in dropped or block in self.distilled:
                continue
            seen.add(id(tensor))
            out[name] = tensor.detach()
        for i, twin in self.distilled.items():
            for name, tensor in list(twin.named_parameters()) + list(twin.named_buffers()):
                if not is_adapter_param(name):
                    out[f"{self.prefix}.{i}.{name}"] = tensor.detach()
        return out

    def load_received(self, model: torch.nn.Module, shipped: dict[str, torch.Tensor], distilled: bool) -> None:
        """On a client that received :meth:`shipped_parameters` (not the owner's process): copy each tensor
        into the model's tensor of that name; with ``distilled`` the kept middle blocks' tensors go into
        frozen copies of those blocks that the view runs instead (as the owner's distilled copies are run).
        Names the model lacks, or kept blocks missing from a distilled shipment, are errors."""
        own = dict(model.named_parameters())
        own.update(dict(model.named_buffers()))
        twins: dict[int, dict[str, torch.Tensor]] = {}
        with torch.no_grad():
            for name, value in shipped.items():
                block = self.block_of(name)
                if distilled and block in self.kept:
                    twins.setdefault(block, {})[name[len(f"{self.prefix}.{block}."):]] = value
                elif name in own:
                    own[name].copy_(value)
                else:
                    raise ValueError(f"FedOT: the received emulator has a tensor '{name}' this model does not have")
        if not distilled:
            self.distilled = {}
            return
        if set(twins) != set(self.kept):
            raise ValueError(f"FedOT: the received distilled emulator has blocks {sorted(twins)}, expected {self.kept}")
        self.distilled = {}
        for i, values in twins.items():
            twin = copy.deepcopy(self.blocks[i])
            mine = dict(twin.named_parameters())
            mine.update(dict(twin.named_buffers()))
            with torch.no_grad():
                for rest, value in values.items():
                    mine[rest].copy_(value)
            twin.requires_grad_(False)
            twin.eval()
            self.distilled[i] = twin

    def release_dropped(self, model: torch.nn.Module) -> int:
        """On a client that runs only the emulator view: free the dropped blocks' base weights (the view
        never runs those blocks; their adapter tensors stay). Returns the bytes released. The model can
        no longer run its full middle afterwards."""
        freed = 0
        dropped = set(self.dropped)
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if self.block_of(name) in dropped and not is_adapter_param(name) and tensor.numel():
                freed += tensor.numel() * tensor.element_size()
                tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        return freed

    def full_model_bytes(self, model: torch.nn.Module) -> int:
        """Bytes of the owner's model: its parameters and buffers (tied tensors once), adapters excluded."""
        seen: set[int] = set()
        total = 0
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if is_adapter_param(name) or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
        return total

    # --- checkpoint ------------------------------------------------------------------------------
    def distilled_state(self) -> dict[str, torch.Tensor]:
        return {f"{i}.{k}": v for i, twin in self.distilled.items() for k, v in twin.state_dict().items()}

    def load_distilled(self, state: dict[str, torch.Tensor]) -> None:
        by_block: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            index, rest = key.split(".", 1)
            by_block.setdefault(int(index), {})[rest] = value
        for i, tensors in by_block.items():
            twin = copy.deepcopy(self.blocks[i])
            twin.load_state_dict(tensors)
            twin.requires_grad_(False)
            self.distilled[i] = twin


def _capture_middle(model, emulator: Emulator, batch) -> tuple[tuple, dict, torch.Tensor]:
    """One forward of the full model: what enters the first middle block (args, kwargs) and what leaves
    the last one."""
    got: dict = {}
    first, last = emulator.blocks[emulator.middle[0]], emulator.blocks[emulator.middle[-1]]

    def pre(module, args, kwargs):
        got["args"], got["kwargs"] = args, kwargs

    def post(module, args, output):
        got["out"] = output[0] if isinstance(output, tuple) else output

    h1 = first.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = last.register_forward_hook(post)
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        h1.remove()
        h2.remove()
    return got["args"], got["kwargs"], got["out"].detach()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean((teacher - student)^2) / mean(teacher^2) over the real (unpadded) tokens."""
    diff = (teacher.float() - student.float()).pow(2).mean(-1)
    scale = teacher.float().pow(2).mean(-1)
    if mask is not None:
        m = mask.to(diff.dtype)
        return (diff * m).sum() / (scale * m).sum().clamp_min(1e-12)
    return diff.mean() / scale.mean().clamp_min(1e-12)


def distill(model: torch.nn.Module, emulator: Emulator, batches, steps: int, lr: float,
            seed: int) -> list[float]:
    """Align the emulator to the full middle: trainable copies of the kept blocks, ``steps`` AdamW steps
    on the normalised MSE between their output and the full middle's, on the hidden states entering the
    middle. The model itself is not changed. Returns the loss per step."""
    device = next(model.parameters()).device
    twins = {i: copy.deepcopy(emulator.blocks[i]) for i in emulator.kept}
    params = []
    for twin in twins.values():
        for name, p in twin.named_parameters():
            trainable = p.is_floating_point() and not is_adapter_param(name)  # LoRA inside stays as it is
            p.requires_grad_(trainable)
            if trainable:
                params.append(p)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    losses = []
    was_training = model.training
    model.eval()
    try:
        for _ in range(steps):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in next(batches).items()}
            args, kwargs, target = _capture_middle(model, emulator, batch)
            hidden = args[0]
            for i in emulator.kept:
                out = twins[i](hidden, *args[1:], **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
            loss = distillation_loss(hidden, target, batch["attention_mask"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        torch.random.set_rng_state(state)
        model.train(was_training)
    for twin in twins.values():
        twin.requires_grad_(False)
        twin.eval()
    emulator.distilled = twins
    return losses
