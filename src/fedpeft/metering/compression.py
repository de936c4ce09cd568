"""Wire compression of adapter dicts: half-precision casts and 8-bit absmax quantisation.

``encode(state, scheme) -> (payload, nbytes)`` turns an adapter dict into the tensors that actually
cross the wire; ``decode(payload, scheme)`` turns them back into float32 tensors. ``nbytes`` is exact
(dtype size x numel of every payload tensor, scales included) and equals :func:`payload_bytes`, which
predicts it from shapes alone. Quantise *updates* (trained minus global) rather than absolute values
where the method allows: deltas have a smaller range, so the same absolute error bound is tighter.

Schemes and their stated maximum error per element (x the original float32 value, x' the decoded one;
round-to-nearest everywhere):

================  ===================================================  ===================================
scheme            payload per tensor of n elements                      max |x - x'|
================  ===================================================  ===================================
``none``          the tensor as is (float32: 4n bytes)                  0
``fp16``          float16, 2n bytes                                     2^-11 |x| + 2^-25  (|x| <= 65504,
                                                                        larger values are rejected)
``bf16``          bfloat16, 2n bytes                                    2^-8 |x| (+ 2^-134 near zero)
``int8``          int8 q = round(x / s), one float32 s = absmax / 127   s / 2 = absmax / 254
                  (per tensor): n + 4 bytes
``int8_channel``  as ``int8`` with one float32 scale per channel:       absmax(channel) / 254
                  2-D tensors get a scale per row when rows <= cols,
                  else per column (LoRA A (r x in) and B (out x r)
                  both get r scales): n + 4 r bytes; other ranks use
                  one scale per tensor
================  ===================================================  ===================================

(The int8 bound holds up to float32 rounding of ``q * s``, i.e. an extra 2^-24 |x|.) Values that are
NaN or infinite cannot be encoded and raise ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedpeft.metering.schemes import SCHEMES

SCALE_SUFFIX = "::scale"
FP16_MAX = 65504.0


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown wire compression '{scheme}'; expected one of {', '.join(SCHEMES)}")


def _check_finite(key: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise ValueError(f"cannot compress tensor '{key}': it holds NaN or inf")


def _channel_dim(tensor: torch.Tensor) -> int | None:
    """The dimension that keeps its own scales (0: per row, 1: per column), None for one scale."""
    if tensor.dim() != 2:
        return None
    rows, cols = tensor.shape
    return 0 if rows <= cols else 1


def _scale_count(tensor: torch.Tensor, scheme: str) -> int:
    if scheme == "int8":
        return 1
    dim = _channel_dim(tensor)
    return 1 if dim is None else tensor.shape[dim]


def _quantise(tensor: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = tensor.detach().to(torch.float32)
    dim = _channel_dim(x) if scheme == "int8_channel" else None
    if dim is None:
        absmax = x.abs().max() if x.numel() else torch.tensor(0.0)
        scale = (absmax / 127.0).reshape(())
    else:
        absmax = x.abs().amax(dim=1 - dim, keepdim=True)
        scale = absmax / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / safe).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(torch.float32)


def encode(state: Mapping[str, torch.Tensor], scheme: str = "none") -> tuple[dict[str, torch.Tensor], int]:
    """Payload tensors for ``state`` under ``scheme`` and their exact size in bytes."""
    _check_scheme(scheme)
    payload: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if SCALE_SUFFIX in key:
            raise ValueError(f"adapter key '{key}' contains the reserved marker '{SCALE_SUFFIX}'")
        tensor = tensor.detach()
        if scheme == "none":
            payload[key] = tensor
            continue
        _check_finite(key, tensor)
        if scheme == "fp16":
            if tensor.numel() and tensor.abs().max().item() > FP16_MAX:
                raise ValueError(f"cannot cast tensor '{key}' to fp16: |value| exceeds {FP16_MAX:g}; use bf16 or int8")
            payload[key] = tensor.to(torch.float16)
        elif scheme == "bf16":
            payload[key] = tensor.to(torch.bfloat16)
        else:
            q, scale = _quantise(tensor, scheme)
            payload[key] = q
            payload[key + SCALE_SUFFIX] = scale
    return payload, sum(t.numel() * t.element_size() for t in payload.values())


def decode(payload: Mapping[str, torch.Tensor], scheme: str = "none") -> dict[str, torch.Tensor]:
    """Float32 adapter dict from an :func:`encode` payload (``none`` returns the tensors unchanged)."""
    _check_scheme(scheme)
    if scheme == "none":
        return dict(payload)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in payload.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        if scheme in ("fp16", "bf16"):
            out[key] = tensor.to(torch.float32)
        else:
            scale_key = key + SCALE_SUFFIX
            if scale_key not in payload:
                raise ValueError(f"payload lacks the scale of '{key}' ('{scale_key}')")
            out[key] = tensor.to(torch.float32) * payload[scale_key]
    return out


def payload_bytes(state: Mapping[str, torch.Tensor], scheme: str = "none") -> int:
    """The bytes :func:`encode` would produce, from shapes alone (the formula of the table above)."""
    _check_scheme(scheme)
    total = 0
    for tensor in state.values():
        n = tensor.numel()
        if scheme == "none":
            total += n * tensor.element_size()
        elif scheme in ("fp16", "bf16"):
            total += 2 * n
        else:
            total += n + 4 * _scale_count(tensor, scheme)
    return total


def max_error(tensor: torch.Tensor, scheme: str) -> torch.Tensor:
    """The stated bound on ``|x - decode(encode(x))|`` per element of ``tensor`` (same shape)."""
    _check_scheme(scheme)
    x = tensor.detach().to(torch.float32)
    if scheme == "none":
        return torch.zeros_like(x)
    if scheme == "fp16":
        return x.abs() * 2.0**-11 + 2.0**-25
    if scheme == "bf16":
        return x.abs() * 2.0**-8 + 2.0**-134
    _, scale = _quantise(x, scheme)
    bound = (scale / 2).expand_as(x) if scale.dim() else torch.full_like(x, float(scale) / 2)
    return bound + x.abs() * 2.0**-24


def roundtrip(state: Mapping[str, torch.Tensor], scheme: str) -> tuple[dict[str, torch.Tensor], int]:
    """``decode(encode(state))`` and the payload bytes: what the receiver sees, for simulation."""
    payload, nbytes = encode(state, scheme)
    return decode(payload, scheme), nbytes
