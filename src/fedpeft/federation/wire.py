"""What a client sends back, and the wire codec applied where the bytes cross.

A client's reply is a :class:`LocalResult`. With ``federation.uplink_compression`` other than
``none`` the client encodes its uploaded tensors before they leave it (in process in
``ClientRunner.run``, on a Flower node in the ClientApp, where ``serde`` then carries the encoded
payload): the update minus the tensors the client received (``plan.downlink``, where shapes match;
deltas have a smaller range than values) goes through ``metering.compression.encode``. The server
decodes with the same reference, so both sides agree without sending it back. The uplink bytes
logged are those of the payload: in process its exact size, under Flower the size of the records
that arrived.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedpeft.adapters import AdapterState, state_bytes
from fedpeft.metering.compression import decode, encode
from fedpeft.strategies.base import ClientUpdate, TrainResult


@dataclass
class LocalResult:
    update: ClientUpdate
    result: TrainResult
    losses: list[float]
    encoding: str = "none"
    """The wire codec ``update.tensors`` is encoded with (``none``: plain tensors)."""
    wire_bytes: int | None = None
    """Bytes that carried the upload (tensors and controls), when a transport measured them."""
    tensors_arrived: bool = True
    """False under SecAgg+: the server gets only a masked vector, the tensors never arrive."""
    peak_cuda_mb: float | None = None
    """Highest CUDA memory allocated during this job (None on CPU, or when the transport does not carry it)."""


def _matches(reference: AdapterState, key: str, tensor) -> bool:
    return key in reference and tuple(reference[key].shape) == tuple(tensor.shape)


def encode_upload(local: LocalResult, reference: AdapterState, scheme: str) -> None:
    """Replace the uploaded tensors by their wire payload under ``scheme`` (in place, on the client)."""
    if scheme == "none" or local.encoding != "none":
        return
    tensors = local.update.tensors
    delta = {k: v - reference[k].to(v.dtype) if _matches(reference, k, v) else v for k, v in tensors.items()}
    local.update.tensors, _ = encode(delta, scheme)
    local.encoding = scheme


def decode_upload(local: LocalResult, reference: AdapterState) -> None:
    """The inverse of :func:`encode_upload` (in place, on the server): float32 tensors again."""
    if local.encoding == "none":
        return
    decoded = decode(local.update.tensors, local.encoding)
    local.update.tensors = {k: v + reference[k].float() if _matches(reference, k, v) else v
                            for k, v in decoded.items()}
    local.encoding = "none"


def payload_bytes(local: LocalResult) -> int:
    """Uplink bytes of this reply: what the transport measured, else the exact size of the tensors
    and controls as they travel (encoded or not)."""
    if local.wire_bytes is not None:
        return local.wire_bytes
    if local.update.wire_bytes is not None:
        return local.update.wire_bytes
    return state_bytes(local.update.tensors) + state_bytes(local.update.control)
