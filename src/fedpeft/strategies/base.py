"""The Strategy seam: what a federated method decides, as a few small methods over adapter dicts.

A round, as the engine runs it::

    strategy.begin_round(round, server)                      # optional server-side work (FedGPL, FedLS masks)
    plans = strategy.configure_round(round, sampled, global_state, store)   # ClientPlan per local job
    for plan in plans:                                       # on the client (same code under Flower)
        model <- plan.init_state ; train plan.trainable ; loss += plan.extra_loss
        update = strategy.client_update(round, plan, trained_state, result, store)
    result = strategy.aggregate(round, global_state, updates)   # pure: dicts in, AggregateResult out

A method that needs several adapters per client (FL-TAC) returns several plans for one client, each
restricted to a slice of the client's data (``data_key``). Per-client persistent state lives in the
ClientStore (on disk); what ``client_update`` keeps for a client goes in ``ClientUpdate.private`` (a
``store.put`` there is staged into it) and is committed only once the update passes the engine's checks. Changes to the frozen base weights (FLoRA, FedEx-LoRA) are returned as
``AggregateResult.base_delta`` and applied by the engine in place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedpeft.adapters import AdapterState, validate_update
from fedpeft.strategies.registry import MethodOptions, ReportSection, parse_options

ALL_PEFT_TYPES = ("lora", "dora", "adalora", "loha", "lokr", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning")
"""Every ``peft.type`` (config.PEFT_TYPES): for methods whose math is a function of the adapter tensors
whatever they are (a weighted mean, a proximal term, control variates)."""

if TYPE_CHECKING:  # types only: the seam does not import the config or data layers
    from fedpeft.config import ExperimentConfig
    from fedpeft.data.experiment import ExperimentData


@dataclass
class ClientPlan:
    """One unit of local training that the server asks of a client."""

    client_id: int
    downlink: AdapterState
    """Tensors the server sends for this job (metered as downlink)."""
    init_state: AdapterState | None = None
    """Adapter values loaded into the model before training; defaults to ``downlink``. Client-private
    parts (e.g. FedSA-LoRA's B from the client store) are merged in here, not sent."""
    trainable: list[str] | None = None
    """Adapter keys that train; None means every adapter parameter."""
    upload: list[str] | None = None
    """Adapter keys sent back; None means the trainable ones."""
    job: str = "default"
    """Name of the local adapter this plan trains (several per client for FL-TAC)."""
    data_key: str | None = None
    """Train only on the client's records whose partition label equals this (None: all its data)."""
    extra_loss: Callable[[Mapping[str, torch.nn.Parameter]], torch.Tensor] | None = None
    """Added to the task loss at each micro-batch (FedProx's proximal term)."""
    grad_transform: Callable[[Mapping[str, torch.nn.Parameter]], None] | None = None
    """Edits gradients in place before each optimizer step (SCAFFOLD's correction)."""
    control: AdapterState = field(default_factory=dict)
    """Extra tensors that travel down with the plan (metered; e.g. SCAFFOLD's server control)."""
    scaling: float | None = None
    """LoRA scaling the engine sets on every LoRA layer for this plan's training, restoring the model's
    afterwards (heterogeneous ranks with ``rank_scaling: alpha``: s_k = alpha / r_k). None: unchanged."""
    info: dict[str, Any] = field(default_factory=dict)
    start_needed: bool = True
    """The client needs the global keys this plan leaves unset (the in-process engine loads the whole
    global adapter before the plan's own state). False: the client holds them already or rebuilds them
    itself (FedKSeed replays its history; FedOT's middle LoRA never changes), so a transport that sends
    plans over a network (Flower) leaves them out and the message carries only what is metered."""


@dataclass
class TrainResult:
    steps: int
    examples_seen: int
    num_examples: int
    mean_loss: float
    last_loss: float
    lr: float
    seconds: float
    tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    """What a method's own local trainer (``Strategy.local_trainer``) hands to its ``client_update``
    (FedKSeed's (seed index, projected gradient) pairs). Empty for the standard loop."""


@dataclass
class ClientUpdate:
    """What a client sends back for one plan."""

    client_id: int
    tensors: AdapterState
    num_examples: int
    job: str = "default"
    control: AdapterState = field(default_factory=dict)
    """Extra uplink tensors (metered; e.g. SCAFFOLD's control delta)."""
    metrics: dict[str, float] = field(default_factory=dict)
    wire_bytes: int | None = None
    """Uplink bytes the transport actually sent for this update when they differ from the tensors'
    size (SecAgg+: the masked vector and key material; the tensors themselves never arrive)."""
    private: dict[str, AdapterState] = field(default_factory=dict)
    """Client-private state to keep in the client's own store once this update is accepted (store name ->
    tensors; e.g. SCAFFOLD's c_k+, FedSA-LoRA's B). Never sent, never metered: ``Strategy.commit_private``
    writes it, after the per-client checks (``federation/update_checks.py``) passed, so a dropped update leaves the client's state as it was."""


@dataclass
class ServerContext:
    """What ``Strategy.begin_round`` may use on the server: the shared model and server-held data."""

    model: torch.nn.Module
    tokenizer: Any
    config: ExperimentConfig
    data: ExperimentData
    make_batch: Callable[[list[int], int], Any]
    """``make_batch(indices, seed)``: endless seeded batches over those training records."""
    client_indices: list[list[int]] | None = None
    """Per client, its training record indices (after records too long to encode were dropped)."""
    labels: list[str] | None = None
    """Partition label of every training record."""
    run_dir: Path | None = None
    """Where a strategy may write its own artifacts (FL-TAC's cluster assignments)."""
    lr: float | None = None
    """The clients' learning rate this round (``training.lr`` on its schedule; FedKSeed's server replay)."""


@dataclass
class AggregateResult:
    global_state: AdapterState
    base_delta: dict[str, torch.Tensor] | None = None
    """Module name -> dense delta added in place to that module's frozen base weight (or a base parameter's
    name -> delta added to it: ``peft_wrap.base_tensor``)."""
    broadcast: AdapterState = field(default_factory=dict)
    """Tensors every registered client must receive to stay in sync (metered x num_clients)."""
    metrics: dict[str, Any] = field(default_factory=dict)


class Strategy:
    """Base class: FedIT-shaped defaults. Subclasses override what their method changes.

    A method registers itself with ``registry.register_method`` and declares, as class attributes, its
    ``Options`` model and its capability flags (read by ``registry.capabilities``)."""

    name = "base"
    summary = ""
    """One line for ``fedpeft methods``."""
    Options: type[MethodOptions] = MethodOptions
    """The pydantic model of ``method.options`` (types, bounds, defaults, descriptions)."""
    secure_mean = False
    """The server step needs only the sample-weighted mean of the uploads (SecAgg+ can run it)."""
    edits_base_weights = False
    """``aggregate`` may return ``base_delta`` (changes to the frozen base weights)."""
    server_optimizer_refusal: str | None = None
    """Why a server optimizer cannot compose with this method; None: it composes."""
    peft_types: tuple[str, ...] = ("lora",)
    """Adapter types (``peft.type``) the method supports (``ALL_PEFT_TYPES``: any, its math works on any
    adapter tensors)."""
    peft_type_refusal: str = "the method declares only the types it was written and tested for"
    """Why the other adapter types are refused (named in the config error)."""
    dp_mean: bool | None = None
    """Central / distributed client-level DP applies (the server step is a mean of the uploads, so noise on
    their sum privatises it); None: the same as ``secure_mean``."""
    dp_refusal: str | None = None
    """Why client-level DP cannot apply to this method at all (its uploads are not bounded vectors of the
    round's change); None: local DP at least applies."""
    report_section: ReportSection | None = None
    """Optional (run_dir, out_dir) -> markdown lines for the run report."""
    seq2seq_refusal: str | None = None
    """Why the method cannot run on an encoder-decoder model (model.head=seq2seq, T5); None: it can (its
    math is about adapter tensors, whatever model they sit in)."""
    image_refusal: str | None = None
    """Why the method cannot run on a vision transformer (model.head=image_classification); None: it can."""
    flower_refusal: str | None = None
    """Why the method cannot run under a Flower deployment (refused before anything is sent); None: it
    runs there, the same rounds as in process (each client's part on its node)."""
    config_problems: Callable[[Any, MethodOptions], list[str]] | None = None
    """Optional (experiment config, validated options) -> one line per setting elsewhere in the config the
    method cannot honour with these options (naming the field); checked with the config, before any model
    loads (FedOT's ``adapter_training: full``). None: nothing beyond the registry's checks."""

    def __init__(self, options: Mapping[str, Any] | MethodOptions | None = None, server_optimizer: Any | None = None) -> None:
        self.opts = parse_options(type(self), options)
        """The validated options (typed); ``options`` is the same as a dict, defaults included."""
        self.options = self.opts.model_dump()
        self.server_optimizer = server_optimizer

    # --- set-up -------------------------------------------------------------------------------
    def prepare_model(self, model: torch.nn.Module) -> None:
        """Change the wrapped model once before round 1 (e.g. freeze parts). Default: nothing."""

    def init_global(self, initial: AdapterState) -> AdapterState:
        """The global state before round 1, from the freshly initialised adapter of the shared model."""
        return {k: v.clone() for k, v in initial.items()}

    # --- per round ------------------------------------------------------------------------------
    def begin_round(self, round_idx: int, server: ServerContext) -> None:
        """Server-side work before clients are configured. ``server`` gives the model and server data."""

    def configure_round(
        self, round_idx: int, clients: Sequence[int], global_state: AdapterState, store: Any
    ) -> list[ClientPlan]:
        return [self.configure_client(round_idx, cid, global_state, store) for cid in clients]

    def configure_client(self, round_idx: int, client_id: int, global_state: AdapterState, store: Any) -> ClientPlan:
        return ClientPlan(client_id=client_id, downlink=global_state)

    def local_data_key(self, plan: ClientPlan, label_counts: Mapping[str, int]) -> str | None:
        """Runs on the client: the partition label of the records ``plan`` trains on (None: all of them),
        from the plan and the client's own ``label -> record count``. Default: ``plan.data_key``. FL-TAC
        resolves an opaque job id here, so no task label is on the wire."""
        return plan.data_key

    def attach_client_hooks(self, round_idx: int, plan: ClientPlan, store: Any) -> None:
        """Runs on the client before training. A plan crosses the network as data only (tensors and
        JSON-able fields); callables such as ``extra_loss`` / ``grad_transform`` that a method needs
        are (re)built here from the plan's data and the client's own store, so that the in-process
        engine and a Flower ClientApp train identically. It runs before the plan's state is loaded,
        so it may also merge client-private tensors from ``store`` into ``plan.init_state``.
        Default: nothing."""

    def bind_received_state(self, round_idx: int, plan: ClientPlan, received: AdapterState) -> None:
        """Runs on the client after ``attach_client_hooks``, with the global state this job received
        (the start state the engine or Flower sent, overlaid with ``plan.downlink``): for hooks that
        need it (Ditto's pull of the personal adapter towards the global one). Default: nothing."""

    def client_view(self, plan: ClientPlan) -> AbstractContextManager:
        """Runs on the client: the context local training runs in (FedOT: the model seen through the
        emulator, the dropped middle blocks skipped). Default: the model as it is."""
        return nullcontext()

    def trainable_base_parameters(self, model: torch.nn.Module, plan: ClientPlan) -> dict[str, torch.nn.Parameter]:
        """Runs on the client: base parameters (not adapter tensors) the plan trains besides its trainable
        adapter keys, set trainable by this call (FedOT's ``adapter_training: full``: every parameter of the
        adapter blocks; it freezes them again when its ``client_view`` closes). Default: none."""
        return {}

    def local_trainer(self) -> Callable[..., tuple[TrainResult, list[float]]] | None:
        """A local loop that replaces ``federation.local_trainer.train_local`` (same arguments, same
        return value), e.g. FedKSeed's zeroth-order steps. None (default): the standard loop."""
        return None

    def client_update(
        self, round_idx: int, plan: ClientPlan, trained: AdapterState, result: TrainResult, store: Any
    ) -> ClientUpdate:
        """Runs on the client after local training: choose what to upload and what to keep privately.
        Private state goes in ``ClientUpdate.private`` (or through ``store.put``, which is staged into
        it): it is committed to the client store only once the update is accepted, so a rejected
        client (NaN, missing keys, bad num_examples) leaves no state behind."""
        keys = plan.upload if plan.upload is not None else (plan.trainable if plan.trainable is not None else list(trained))
        return ClientUpdate(
            client_id=plan.client_id,
            tensors={k: trained[k] for k in keys},
            num_examples=result.num_examples,
            job=plan.job,
            metrics={"loss": result.mean_loss},
        )

    def commit_private(self, update: ClientUpdate, store: Any) -> None:
        """Write ``update.private`` into the client's store; the caller does this only once the update is
        accepted (the in-process engine: after ``check_update``)."""
        for name, state in update.private.items():
            store.put(update.client_id, name, state)

    def check_update(self, global_state: AdapterState, update: ClientUpdate) -> None:
        """Raise ValueError when ``update`` cannot be aggregated into ``global_state`` (the engine drops
        that client). Default: known keys, same shapes, finite values. Heterogeneous-rank methods accept
        rank slices (A[:r_k], B[:, :r_k]) instead of full shapes."""
        validate_update(global_state, update.tensors)

    def aggregate(self, round_idx: int, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        raise NotImplementedError

    # --- evaluation -----------------------------------------------------------------------------
    personalized = False
    """True when each client keeps its own adapter (FedSA-LoRA, local-only): evaluate per client."""

    def personal_state(self, client_id: int, global_state: AdapterState, store: Any) -> AdapterState | None:
        """The full adapter client ``client_id`` uses for its own evaluation; None: the global one."""
        return None

    def evaluation_state(self, global_state: AdapterState, store: Any) -> AdapterState:
        """The adapter evaluated as "the global model" (FedSA-LoRA: global A with the mean personal B)."""
        return global_state

    def evaluation_views(self) -> dict[str, Callable[[], AbstractContextManager]]:
        """Extra ways the server scores the global adapter, besides the model as it is: view name ->
        a context factory (FedOT: ``emulator``, the adapter on the compressed middle the clients
        trained with). Each is logged as an ``eval`` event with ``split=<view>`` and metrics
        ``<view>/<metric>``. Default: none."""
        return {}

    def task_evaluation_states(self, global_state: AdapterState, store: Any) -> dict[str, AdapterState] | None:
        """Per-task adapters for evaluation (FL-TAC's cluster adapters): partition label -> the adapter
        that label's evaluation records are scored with. None (default): ``evaluation_state`` for all."""
        return None

    # --- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Server-side state that must survive a restart (tensors and JSON-able values)."""
        return {"server_optimizer": self.server_optimizer.state_dict() if self.server_optimizer else {}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.server_optimizer is not None:
            self.server_optimizer.load_state_dict(state.get("server_optimizer", {}))


def example_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """p_k = n_k / sum_j n_j over the updates of this round."""
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        raise ValueError("cannot weight updates: the clients reported zero examples in total")
    return [u.num_examples / total for u in updates]


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> AdapterState:
    """sum_k w_k * state_k, key by key, over the keys of the first state (all must share them)."""
    if not states:
        raise ValueError("weighted_average needs at least one state")
    keys = list(states[0])
    out: AdapterState = {}
    for key in keys:
        acc = torch.zeros_like(states[0][key], dtype=torch.float32)
        for state, w in zip(states, weights):
            acc.add_(state[key].float(), alpha=float(w))
        out[key] = acc
    return out
