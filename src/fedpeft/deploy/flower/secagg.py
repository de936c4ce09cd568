"""Secure aggregation on Flower: the server learns the round's weighted mean update, never one client's.

Flower's SecAgg+ (``SecAggPlusWorkflow`` on the server, ``secaggplus_mod`` on the client) does the
cryptography: key agreement, Shamir shares of each client's mask seeds, pairwise + private masks over
a quantised vector, and recovery of the masks of clients that drop out after the masking stage. It was
written for Flower's legacy strategy API; we use it unchanged and adapt at both ends:

* server: a ``SecAggPlusWorkflow`` whose fit instructions are our own plan messages (``serde``), run
  over a grid wrapper that polls as fast as our transport (Flower's HTTP grid polls every 3 s) and
  meters every stage's bytes; a shim legacy strategy receives the unmasked weighted mean;
* client: the ClientApp's mod runs ``secaggplus_mod`` only on messages that carry its stage config, and
  the train handler answers such a message with the legacy ``fitres.*`` records the mod masks: the
  vector is the update minus the round's start state (smaller values, so less clipping), the weight is
  the client's ``num_examples``; our own metadata (client, job, training result) rides as a string in
  ``fitres.metrics``, and no tensor of the update leaves the node unmasked.

The engine then aggregates one combined update (the mean, weight = the sum of the clients' weights),
which for a method whose aggregation is a sample-weighted mean (registered with ``secure_mean = True``)
gives that mean.
Per-client checks that need the tensors (finite values, shapes) run on the client before masking and
on the aggregate after unmasking; a client can still bias the mean within the clipping range.
Quantisation (stochastic rounding to a step of ``2 clip / 2**22``, about 4e-6 at the default clip of 8)
bounds the error of the mean: ``quantization_bound``, checked in ``tests/test_deploy_flower.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedpeft.strategies import capabilities, method_class
from fedpeft.strategies.registry import secure_methods

SECAGG_CONFIGS = "secaggplus_configs"  # flwr.common.secure_aggregation.secaggplus_constants.RECORD_KEY_CONFIGS
QUANTIZATION_RANGE = 4194304  # Flower's default (2**22)
MODULUS_RANGE = 4294967296  # 2**32
META_KEY = "fedpeft"


def check_secure_method(method: str) -> None:
    """Refuse a method whose server step needs more than the weighted mean of the uploads (its registry
    flag ``secure_mean``): clustering, stacking, SVD, per-client state on the server need each update."""
    if not capabilities(method_class(method)).secure_mean:
        raise ValueError(f"secagg: method '{method}' needs each client's update on the server; secure aggregation "
                         f"(the server sees only the weighted mean) supports {', '.join(secure_methods())}")


def is_secagg_message(content: RecordDict) -> bool:
    return SECAGG_CONFIGS in content.config_records


# --- client side ------------------------------------------------------------------------------------
def secagg_mod(msg: Message, ctxt: Context, call_next):
    """Flower client mod: SecAgg+ for messages of the protocol, plain handling for everything else
    (``secaggplus_mod`` alone would reject our ordinary train messages)."""
    if msg.metadata.message_type == "train" and is_secagg_message(msg.content):
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def secagg_reply(update: Any, result: Any, losses: Sequence[float], reference: Mapping[str, Any]) -> RecordDict:
    """The reply to a SecAgg+ train message: the update minus ``reference`` (the adapter the client
    started from: for a secure-mean method the global one) as the legacy
    ``fitres.parameters`` the mod masks (keys sorted; listed in the metadata), ``num_examples`` as the
    weight, and our metadata as a string metric. Raises on non-finite values: a client never sends
    garbage into a sum nobody can inspect."""
    from dataclasses import asdict

    from flwr.common import ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat
    from flwr.common.typing import Code, FitRes, Status

    keys = sorted(update.tensors)
    if update.control:
        raise ValueError("secagg: this method uploads control tensors, which secure aggregation does not carry")
    deltas = []
    for key in keys:
        if key not in reference:
            raise ValueError(f"secagg: uploaded tensor '{key}' was not part of the round's start state")
        delta = (update.tensors[key].detach().float() - reference[key].float()).numpy()
        if not np.isfinite(delta).all():
            raise ValueError(f"update tensor '{key}' holds NaN or inf; not sent")
        deltas.append(delta.astype(np.float32))
    meta = {
        "client-id": int(update.client_id), "job": update.job, "num-examples": int(update.num_examples),
        "keys": keys, "metrics": update.metrics, "train": asdict(result), "losses": [float(x) for x in losses],
        "max-abs": float(max((float(np.abs(d).max()) for d in deltas if d.size), default=0.0)),
    }
    fitres = FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters(deltas),
                    num_examples=int(update.num_examples), metrics={META_KEY: json.dumps(meta, default=float)})
    return compat.fitres_to_recorddict(fitres, keep_input=False)


# --- server side ------------------------------------------------------------------------------------
@dataclass
class SecureRoundResult:
    mean_delta: list[np.ndarray] | None
    """The weighted mean of the clients' vectors (None when the protocol halted)."""
    meta: dict[int, dict]
    """Node id -> the metadata its client sent (clients that took part in the aggregate)."""
    weight: float
    stages: list[dict] = field(default_factory=list)
    """Per protocol stage: seconds, messages, bytes down/up, replies, errors."""
    failures: list[str] = field(default_factory=list)


class _MeteredGrid:
    """The grid the workflow talks to: ``send_and_receive`` with our push/poll loop (0.25 s polls, a
    timeout) and per-stage bytes and seconds; everything else goes to the real grid."""

    def __init__(self, grid: Any, exchange, timeout: float) -> None:
        self._grid, self._exchange, self._timeout = grid, exchange, timeout
        self.stages: list[dict] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        from fedpeft.deploy.flower.serde import record_bytes

        messages = list(messages)
        start = time.perf_counter()
        ids, replies, _ = self._exchange(messages, self._timeout if timeout is None else timeout)
        got = [replies[m] for m in ids if m and m in replies]
        self.stages.append({
            "messages": len(messages), "replies": len(got), "errors": sum(r.has_error() for r in got),
            "down_bytes": sum(record_bytes(m.content) for m in messages),
            "up_bytes": sum(record_bytes(r.content) for r in got if not r.has_error()),
            "seconds": time.perf_counter() - start,
        })
        return got


class _ShimStrategy:
    """The legacy strategy the workflow calls: our plans are already built; it keeps the mean."""

    def __init__(self, node_ids: Sequence[int]) -> None:
        self.node_ids = list(node_ids)
        self.results: list | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        from flwr.common import FitIns, Parameters

        return [(SimpleNamespace(node_id=n), FitIns(Parameters(tensors=[], tensor_type=""), {})) for n in self.node_ids]

    def aggregate_fit(self, server_round, results, failures):
        self.results = list(results)
        return (results[0][1].parameters if results else None), {}


def run_secure_round(grid: Any, exchange, contents: Mapping[int, RecordDict], round_idx: int, *, shares: float,
                     threshold: float, clip: float, max_weight: float, timeout: float) -> SecureRoundResult:
    """One SecAgg+ round over ``contents`` (node id -> our plan message); see the module docstring."""
    from flwr.common import parameters_to_ndarrays
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    class Workflow(SecAggPlusWorkflow):
        def setup_stage(self, grid_, context, state):  # noqa: D102 - swap in our plan messages
            ok = super().setup_stage(grid_, context, state)
            state.nid_to_fitins = {nid: contents[nid] for nid in state.nid_to_fitins}
            return ok

    if len(contents) < 2:
        raise RuntimeError(f"round {round_idx}: secure aggregation needs at least 2 clients, got {len(contents)}")
    metered = _MeteredGrid(grid, exchange, timeout)
    strategy = _ShimStrategy(list(contents))
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: round_idx})
    from flwr.app import ArrayRecord

    context.state[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = Workflow(num_shares=float(shares), reconstruction_threshold=float(threshold), clipping_range=clip,
                        max_weight=float(max_weight), quantization_range=QUANTIZATION_RANGE,
                        modulus_range=MODULUS_RANGE, timeout=timeout)
    workflow(metered, LegacyContext(context, strategy=strategy))
    names = ("setup", "share_keys", "collect_masked_vectors", "unmask")
    stages = [dict(stage=names[i] if i < len(names) else f"stage{i}", **s) for i, s in enumerate(metered.stages)]
    if not strategy.results:
        return SecureRoundResult(None, {}, 0.0, stages, ["secure aggregation halted (too few clients answered a stage)"])
    meta = {proxy.node_id: json.loads(str(fitres.metrics[META_KEY])) for proxy, fitres in strategy.results}
    mean = parameters_to_ndarrays(strategy.results[0][1].parameters)
    weight = float(sum(m["num-examples"] for m in meta.values()))
    return SecureRoundResult(mean, meta, weight, stages)


def mean_state(result: SecureRoundResult, global_state: Mapping[str, Any]) -> dict[str, Any]:
    """The weighted mean of the clients' uploads: the round's start state plus the mean delta. Every
    client must have sent the same keys; shapes must match the global state; values must be finite."""
    import torch

    key_lists = {json.dumps(m["keys"]) for m in result.meta.values()}
    if len(key_lists) != 1:
        raise ValueError(f"secagg: clients sent different tensor lists ({len(key_lists)} variants)")
    keys = json.loads(key_lists.pop())
    if result.mean_delta is None or len(result.mean_delta) != len(keys):
        raise ValueError(f"secagg: aggregate has {0 if result.mean_delta is None else len(result.mean_delta)} "
                         f"arrays for {len(keys)} keys")
    out = {}
    for key, delta in zip(keys, result.mean_delta):
        tensor = torch.from_numpy(np.asarray(delta, dtype=np.float32).copy())
        if key not in global_state:
            raise ValueError(f"secagg: aggregate carries unknown tensor '{key}'")
        if tuple(tensor.shape) != tuple(global_state[key].shape):
            raise ValueError(f"secagg: aggregate '{key}' has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(global_state[key].shape)}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"secagg: aggregate '{key}' holds NaN or inf")
        out[key] = global_state[key].float() + tensor
    return out


def quantization_bound(clip: float, weights: Sequence[float], max_weight: float) -> float:
    """Largest error per entry of the unmasked mean against the exact weighted mean, for updates within
    the clipping range. Each client's entry (scaled by its quantised weight ratio ``dq_i``, about
    ``w_i / max_weight``) is stochastically rounded to a step of ``2 clip / Q``: the sum is off by less
    than ``N`` steps, divided by ``sum dq_i``. Each weight ratio is rounded to ``1 / Q``, which moves a
    weighted mean of values within ``clip`` by at most ``clip N / (Q sum r_i)``."""
    n = len(weights)
    ratios = sum(w / max_weight for w in weights)
    step = 2 * clip / QUANTIZATION_RANGE
    return n * step / ratios + clip * n / (QUANTIZATION_RANGE * ratios)
