"""ClientPlan <-> Flower records, and the client's reply (ClientUpdate + TrainResult) back.

A plan crosses the wire as data only: tensors in ``ArrayRecord``s, the other fields in one
``ConfigRecord``. Callables (``extra_loss``, ``grad_transform``) never travel: the client's
``Strategy.attach_client_hooks`` rebuilds them from the plan's data, so a plan that still carries one
is refused here with a message naming the method (it would otherwise train differently than in
process). Tensors round-trip bit-exactly (bfloat16, which numpy lacks, travels as its int16 bits).

Message layout (record names in a ``RecordDict``)::

    server -> client (message type "train")
      plan      ConfigRecord  round, lr, client-id, job, data-key, trainable, upload, scaling, info
      downlink  ArrayRecord   plan.downlink
      init      ArrayRecord   plan.init_state (absent: same as downlink)
      control   ArrayRecord   plan.control
      start     ArrayRecord   global keys the plan does not set (what the engine's start_state adds;
                              absent when plan.start_needed is false: the client holds or rebuilds them)
      base      ArrayRecord   base weights the method changed (FLoRA, FedEx-LoRA), full values
    server -> client (message type "evaluate": personalised evaluation where the private state lives)
      evaluate  ConfigRecord  round, client-ids
      global    ArrayRecord   the global adapter
      base      ArrayRecord   base weights the method changed
    client -> server (reply to "evaluate")
      personal  ConfigRecord  scores (JSON: client id -> headline score with its own adapter)
    client -> server (reply to "train")
      update    ConfigRecord  client-id, job, num-examples, metrics (JSON: a strategy may add non-floats),
                              encoding (the wire codec of the tensors), manifests (key, dtype, shape)
      tensors   ArrayRecord   update.tensors as sent (encoded on the client), packed into one array of raw
                              bytes (stype "raw": no .npy header, so its size is the payload's exactly)
      control   ArrayRecord   update.control, packed the same way
      train     MetricRecord  TrainResult fields and the per-step losses
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpeft.adapters import AdapterState
from fedpeft.federation.wire import LocalResult
from fedpeft.strategies.base import ClientPlan, ClientUpdate, TrainResult

_VIEWED = {torch.bfloat16: torch.int16}
"""dtypes numpy cannot hold, sent as same-sized integer bits."""
_DTYPES = {str(dtype): dtype for dtype in _VIEWED}


class PlanNotSerializable(ValueError):
    """A ClientPlan that cannot cross the network (it carries a callable)."""


def state_to_record(state: Mapping[str, torch.Tensor]) -> tuple[ArrayRecord, dict[str, str]]:
    """An adapter dict as an ArrayRecord (+ the keys whose dtype travels as integer bits)."""
    arrays, viewed = {}, {}
    for key, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.dtype in _VIEWED:
            viewed[key] = str(tensor.dtype)
            tensor = tensor.view(_VIEWED[tensor.dtype])
        arrays[key] = tensor
    return ArrayRecord(arrays), viewed


def record_to_state(record: ArrayRecord, viewed: Mapping[str, str] | None = None) -> AdapterState:
    state = dict(record.to_torch_state_dict())
    for key, dtype in (viewed or {}).items():
        state[key] = state[key].view(_DTYPES[dtype])
    return state


def _put_state(content: RecordDict, name: str, state: Mapping[str, torch.Tensor] | None, viewed: dict) -> None:
    if state is None:
        return
    record, record_viewed = state_to_record(state)
    content[name] = record
    if record_viewed:
        viewed[name] = record_viewed


def _get_state(content: RecordDict, name: str, viewed: Mapping[str, Any]) -> AdapterState | None:
    if name not in content:
        return None
    return record_to_state(content[name], viewed.get(name))


def record_bytes(content: RecordDict) -> int:
    """Bytes of the arrays and binary values in a message (what dominates its size on the wire; SecAgg+
    carries its masked vectors and keys as bytes in config records)."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(array.data) for array in record.values())
        elif isinstance(record, ConfigRecord):
            for value in record.values():
                if isinstance(value, bytes):
                    total += len(value)
                elif isinstance(value, list):
                    total += sum(len(v) for v in value if isinstance(v, bytes))
    return total


# --- server -> client -------------------------------------------------------------------------


@dataclass
class PlanMessage:
    round_idx: int
    lr: float
    plan: ClientPlan
    start_state: AdapterState
    base_weights: dict[str, torch.Tensor]


def encode_plan(round_idx: int, plan: ClientPlan, global_state: Mapping[str, torch.Tensor], lr: float,
                base_weights: Mapping[str, torch.Tensor] | None = None, method: str = "") -> RecordDict:
    """The message content for one plan. ``global_state`` supplies the keys the plan leaves unset (in
    process the engine loads the global adapter before the plan's own state)."""
    for attr in ("extra_loss", "grad_transform"):
        if getattr(plan, attr) is not None:
            raise PlanNotSerializable(
                f"method '{method or '?'}' puts a callable in ClientPlan.{attr} (client {plan.client_id}): a plan "
                "must cross the network as data only; build the callable on the client in "
                "Strategy.attach_client_hooks from plan data (plan.info / plan.control) instead")
    try:
        info = json.dumps(plan.info)
    except TypeError as exc:
        raise PlanNotSerializable(f"method '{method or '?'}': ClientPlan.info of client {plan.client_id} is not "
                                  f"JSON-serialisable ({exc})") from None
    content = RecordDict()
    own = plan.init_state if plan.init_state is not None else plan.downlink
    fields = {
        "round": int(round_idx), "lr": float(lr), "client-id": int(plan.client_id), "job": plan.job,
        "data-key": json.dumps(plan.data_key), "trainable": json.dumps(plan.trainable),
        "upload": json.dumps(plan.upload), "scaling": json.dumps(plan.scaling), "info": info,
        "has-init": plan.init_state is not None, "start-needed": bool(plan.start_needed),
    }
    viewed: dict[str, dict[str, str]] = {}
    _put_state(content, "downlink", plan.downlink, viewed)
    if plan.init_state is not None and plan.init_state is not plan.downlink:
        _put_state(content, "init", plan.init_state, viewed)
    elif plan.init_state is not None:
        fields["init-is-downlink"] = True
    _put_state(content, "control", plan.control, viewed)
    if plan.start_needed:  # else the client holds or rebuilds them (ClientPlan.start_needed)
        _put_state(content, "start", {k: v for k, v in global_state.items() if k not in own}, viewed)
    _put_state(content, "base", dict(base_weights or {}), viewed)
    fields["viewed"] = json.dumps(viewed)
    content["plan"] = ConfigRecord(fields)
    return content


def decode_plan(content: RecordDict) -> PlanMessage:
    fields = content["plan"]
    viewed = json.loads(str(fields["viewed"]))
    downlink = _get_state(content, "downlink", viewed) or {}
    init_state = None
    if fields["has-init"]:
        init_state = downlink if fields.get("init-is-downlink") else _get_state(content, "init", viewed)
    plan = ClientPlan(
        client_id=int(fields["client-id"]), downlink=downlink, init_state=init_state,
        trainable=json.loads(str(fields["trainable"])), upload=json.loads(str(fields["upload"])),
        job=str(fields["job"]), data_key=json.loads(str(fields["data-key"])),
        control=_get_state(content, "control", viewed) or {}, scaling=json.loads(str(fields["scaling"])),
        info=json.loads(str(fields["info"])), start_needed=bool(fields.get("start-needed", True)),
    )
    return PlanMessage(int(fields["round"]), float(fields["lr"]), plan,
                       _get_state(content, "start", viewed) or {}, _get_state(content, "base", viewed) or {})


# --- client -> server -------------------------------------------------------------------------


def pack_state(state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, list]:
    """All tensors of ``state`` as one flat uint8 tensor (their raw bytes, in order) and a manifest of
    (key, dtype, shape). One array per record keeps the per-array framing out of small payloads (an
    int8 payload is then about a quarter of the fp32 one), and any dtype travels bit-exactly."""
    chunks, manifest = [], []
    for key, tensor in state.items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        chunks.append(flat.view(torch.uint8) if flat.numel() else torch.zeros(0, dtype=torch.uint8))
        manifest.append([key, str(tensor.dtype).removeprefix("torch."), list(tensor.shape)])
    return (torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8)), manifest


def unpack_state(packed: torch.Tensor, manifest: list) -> AdapterState:
    state, offset = {}, 0
    for key, dtype_name, shape in manifest:
        dtype = getattr(torch, dtype_name)
        numel = 1
        for n in shape:
            numel *= n
        size = numel * torch.empty((), dtype=dtype).element_size()
        state[key] = packed[offset:offset + size].clone().view(dtype).reshape(shape)
        offset += size
    if offset != packed.numel():
        raise ValueError(f"packed payload has {packed.numel()} bytes, its manifest describes {offset}")
    return state


UPLOAD_RECORDS = ("tensors", "control")
RAW = "raw"
"""``Array.stype`` of a packed upload: its ``data`` is the payload's bytes as they are (Flower's numpy
arrays carry a 128-byte .npy header, 13 times FedKSeed's 10-byte upload)."""


def raw_array(packed: torch.Tensor) -> Array:
    return Array(dtype="uint8", shape=(int(packed.numel()),), stype=RAW, data=packed.numpy().tobytes())


def raw_tensor(array: Array) -> torch.Tensor:
    """A packed upload back as a flat uint8 tensor (a numpy-serialised one from an older node too)."""
    data = array.data if array.stype == RAW else array.numpy().tobytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def upload_bytes(content: RecordDict) -> int:
    """Bytes of the upload as it arrived: the arrays of the update's ``tensors`` and ``control`` records."""
    return sum(len(array.data) for name in UPLOAD_RECORDS if name in content for array in content[name].values())


def encode_result(update: ClientUpdate, result: TrainResult, losses: list[float], encoding: str = "none") -> RecordDict:
    """The reply content. ``encoding``: the wire codec ``update.tensors`` is already encoded with (the
    payload travels as is; the server decodes it). Private state (``update.private``) never travels."""
    content = RecordDict()
    manifests = {}
    for name, state in (("tensors", update.tensors), ("control", update.control)):
        if state:
            packed, manifests[name] = pack_state(state)
            content[name] = ArrayRecord({"packed": raw_array(packed)})
    content["update"] = ConfigRecord({
        "client-id": int(update.client_id), "job": update.job, "num-examples": int(update.num_examples),
        "metrics": json.dumps(update.metrics, default=float), "manifests": json.dumps(manifests),
        "encoding": encoding,
    })
    # TrainResult.extra stays on the client: a method with its own local loop (FedKSeed) turns it into the
    # upload's tensors in client_update, so the server never needs it.
    train = {k: (float(v) if isinstance(v, float) else int(v)) for k, v in asdict(result).items() if k != "extra"}
    train["losses"] = [float(x) for x in losses]
    if not train["losses"]:
        del train["losses"]  # a MetricRecord cannot hold an empty list
    content["train"] = MetricRecord(train)
    return content


def decode_result(content: RecordDict) -> tuple[ClientUpdate, TrainResult, list[float]]:
    fields = content["update"]
    manifests = json.loads(str(fields["manifests"]))
    states = {name: unpack_state(raw_tensor(content[name]["packed"]), manifests[name])
              if name in manifests else {} for name in UPLOAD_RECORDS}
    update = ClientUpdate(
        client_id=int(fields["client-id"]), tensors=states["tensors"], num_examples=int(fields["num-examples"]),
        job=str(fields["job"]), control=states["control"], metrics=json.loads(str(fields["metrics"])),
    )
    train = dict(content["train"])
    losses = [float(x) for x in train.pop("losses", [])]
    names = TrainResult.__dataclass_fields__
    result = TrainResult(**{k: v for k, v in train.items() if k in names})
    return update, result, losses


def decode_reply(content: RecordDict) -> LocalResult:
    """The reply as the engine takes it: the update (still encoded, ``encoding`` says how) and the
    bytes its upload took on the wire."""
    update, result, losses = decode_result(content)
    return LocalResult(update, result, losses, encoding=str(content["update"].get("encoding", "none")),
                       wire_bytes=upload_bytes(content))


# --- personalised evaluation on the nodes (message type "evaluate") --------------------------------------


@dataclass
class EvaluateMessage:
    round_idx: int
    client_ids: list[int]
    global_state: AdapterState
    base_weights: dict[str, torch.Tensor]


def encode_evaluate(round_idx: int, client_ids: list[int], global_state: Mapping[str, torch.Tensor],
                    base_weights: Mapping[str, torch.Tensor] | None = None) -> RecordDict:
    """Ask a node to score these clients, each with its own adapter (``strategy.personal_state`` over
    ``global_state`` and the client's private state in the node's store)."""
    content = RecordDict()
    viewed: dict[str, dict[str, str]] = {}
    _put_state(content, "global", global_state, viewed)
    _put_state(content, "base", dict(base_weights or {}), viewed)
    content["evaluate"] = ConfigRecord({"round": int(round_idx), "client-ids": json.dumps(list(client_ids)),
                                        "viewed": json.dumps(viewed)})
    return content


def decode_evaluate(content: RecordDict) -> EvaluateMessage:
    fields = content["evaluate"]
    viewed = json.loads(str(fields["viewed"]))
    return EvaluateMessage(int(fields["round"]), [int(c) for c in json.loads(str(fields["client-ids"]))],
                           _get_state(content, "global", viewed) or {}, _get_state(content, "base", viewed) or {})


def encode_scores(scores: Mapping[int, float]) -> RecordDict:
    return RecordDict({"personal": ConfigRecord({"scores": json.dumps({str(k): float(v) for k, v in scores.items()})})})


def decode_scores(content: RecordDict) -> dict[int, float]:
    return {int(k): float(v) for k, v in json.loads(str(content["personal"]["scores"])).items()}
