"""Per-sample adapter routing: several clients' LoRA adapters in one forward pass over one base model.

While :func:`grouped_lora` is active, every PEFT LoRA ``Linear`` of the model computes, for the rows of
the batch that belong to client c (rows are laid out client by client, the same number per client),

    y = W0 x + s_c B_c A_c x

with the group's stacked factors (``torch.bmm`` over A [C, r, in] and B [C, out, r]); the frozen base
layer runs once over every row and the model's own adapter parameters are not used. Nothing of the base
model is copied. The factors are the clients' own leaf tensors (:class:`ClientAdapters`), so the
backward pass gives each client's tensors the gradient of its own rows only: a sum of per-client losses
yields, per client, the gradient a serial pass over its rows alone would give.

Only plain LoRA on ``nn.Linear`` base layers is routed (no DoRA or other variant, no LoRA bias, no
``modules_to_save``); :func:`routing_refusal` says why a model cannot be routed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch

from fedpeft.adapters import adapter_parameters
from fedpeft.models.peft_wrap import lora_modules


def lora_keys(module_name: str, adapter: str) -> tuple[str, str]:
    """Adapter-state keys of one LoRA layer's A and B weights."""
    return f"{module_name}.lora_A.{adapter}.weight", f"{module_name}.lora_B.{adapter}.weight"


def routing_refusal(model: torch.nn.Module) -> str | None:
    """Why the model's adapters cannot be routed per sample (None: they can)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    layers = lora_modules(model)
    if not layers:
        return "the model has no LoRA layer"
    routed: set[str] = set()
    for name, layer in layers.items():
        if not isinstance(layer, LoraLinear):
            return f"LoRA layer '{name}' is a {type(layer).__name__}, not a Linear one"
        adapters = list(layer.active_adapters)
        if len(adapters) != 1:
            return f"LoRA layer '{name}' has {len(adapters)} active adapters"
        adapter = adapters[0]
        if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter, False):
            return f"LoRA layer '{name}' uses a LoRA variant (DoRA or similar)"
        if getattr(layer.lora_B[adapter], "bias", None) is not None:
            return f"LoRA layer '{name}' has a LoRA bias"
        if not isinstance(layer.lora_dropout[adapter], torch.nn.Identity):
            return f"LoRA layer '{name}' has dropout (its masks would not match the serial run's per-client draws)"
        routed.update(lora_keys(name, adapter))
    other = sorted(set(adapter_parameters(model)) - routed)
    if other:
        return f"adapter parameters outside LoRA A/B factors (e.g. '{other[0]}', a modules_to_save head)"
    return None


class ClientAdapters:
    """One client's adapter tensors for a grouped pass: every adapter key as a leaf tensor on the
    model's device (``requires_grad`` only for the keys the client trains), and its LoRA scaling."""

    def __init__(self, values: Mapping[str, torch.Tensor], trainable: Sequence[str], scaling: float | None) -> None:
        self.values: dict[str, torch.Tensor] = {}
        chosen = set(trainable)
        for name, value in values.items():
            leaf = value.detach().clone()
            leaf.requires_grad_(name in chosen)
            self.values[name] = leaf
        self.params = {n: t for n, t in self.values.items() if n in chosen}
        """The trainable tensors, in the model's adapter-parameter order (what the serial loop clips and steps)."""
        self.scaling = scaling


@contextlib.contextmanager
def grouped_lora(model: torch.nn.Module, clients: Sequence[ClientAdapters]) -> Iterator[None]:
    """Route every LoRA layer's adapter term per client for the duration (see the module docstring)."""
    layers = lora_modules(model)
    patched = []
    try:
        for name, layer in layers.items():
            adapter = list(layer.active_adapters)[0]
            a_key, b_key = lora_keys(name, adapter)
            scalings = [c.scaling if c.scaling is not None else layer.scaling[adapter] for c in clients]
            layer.forward = _routed_forward(layer, [c.values[a_key] for c in clients],
                                            [c.values[b_key] for c in clients], scalings)
            patched.append(layer)
        yield
    finally:
        for layer in patched:
            del layer.forward  # back to the class's forward


def _routed_forward(layer: torch.nn.Module, a: list[torch.Tensor], b: list[torch.Tensor], scalings: list[float]):
    same = all(s == scalings[0] for s in scalings)

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = layer.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        x = layer._cast_input_dtype(x, a[0].dtype)
        groups = len(a)
        xs = x.reshape(groups, -1, x.shape[-1])                      # [C, rows*T, in], client-major rows
        h = torch.bmm(xs, torch.stack(a).transpose(1, 2))            # [C, rows*T, r]
        delta = torch.bmm(h, torch.stack(b).transpose(1, 2))         # [C, rows*T, out]
        if same:
            delta = delta * scalings[0]
        else:
            delta = delta * torch.tensor(scalings, dtype=delta.dtype, device=delta.device).view(-1, 1, 1)
        result = result + delta.reshape(result.shape)
        return result.to(dtype)

    return forward
