"""FedOT: offsite tuning made federated (Xiao et al. 2023; FederatedScope-LLM, Kuang et al. 2024).

The model owner keeps the full model. The adapter is the first ``a`` and last ``b`` transformer blocks,
trained with the LoRA of the shared PEFT model on those blocks (``peft.target_modules``; the LoRA of the
middle blocks is never trained: B = 0 keeps it an identity). The emulator is the middle, compressed by
uniform layer dropping (``drop_ratio``; ``models/emulator.py``) and optionally aligned by distillation on
server data (``distill_steps`` > 0, before round 1).

Each client trains the adapter on the emulator-model (``client_view``: the dropped blocks are skipped)
and uploads the adapter; the server averages it (FedAvg: theta <- sum_k p_k theta_k over the adapter's
tensors; a server optimizer composes). ``local_ot: true`` is the LocalOT baseline: nothing is averaged,
each client keeps its own adapter (evaluated per client).

What leaves the owner, metered: the first time a client is sampled its plan carries the frozen tensors
it needs to run the emulator-model (embeddings, head, norms, the adapter blocks' base weights, the kept
middle blocks; ``Emulator.shipped_parameters``) as ``plan.control`` (counted as downlink, never
uploaded); every round the adapter's LoRA tensors go down and up. A client in its own process (a
Flower node) runs the emulator-model from the tensors it received (``receive_emulator``). The
``aggregate`` event reports ``owner_model_bytes`` (the full model), ``shipped_once_bytes`` (per client)
and their ratio.

Evaluation: the server scores the global adapter plugged into the full model (the full middle: the
headline metric) and through the emulator (``emulator/<metric>``, the ``evaluation_views`` hook).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from fedpeft.adapters import AdapterState, adapter_parameters, state_bytes, validate_update
from fedpeft.models.emulator import Emulator, distill
from fedpeft.seeding import derive_seed
from fedpeft.strategies.base import (
    AggregateResult,
    ClientPlan,
    ClientUpdate,
    ServerContext,
    TrainResult,
    example_weights,
    weighted_average,
)
from fedpeft.strategies.common import MethodStrategy, global_with_stored, refuse_uploaded
from fedpeft.strategies.registry import MethodOptions, register_method
from fedpeft.strategies.server_optimizers import is_identity

LOCAL_NAME = "local_ot_adapter"
"""Client-store name of a LocalOT client's own adapter."""
SHIPPED_PREFIX = "emulator/"
"""``plan.control`` keys of the emulator-model's tensors (the rest of the key is the model's name)."""
RECEIVED_NAME = "fedot_emulator"
"""Client-store name of the emulator-model a client received, where it does not run in the owner's
process (a Flower node): ``receive_emulator``."""

BLOCK_PREFIX = "fedot_block/"
"""``adapter_training: full``: a block weight travels (plan.control down, update tensors up) as
``fedot_block/<its parameter name in the model>``."""


class FedOTOptions(MethodOptions):
    a: int = Field(2, ge=0, description="Adapter blocks at the bottom (the first a transformer blocks).")
    b: int = Field(2, ge=0, description="Adapter blocks at the top (the last b transformer blocks).")
    drop_ratio: float = Field(0.2, description="Share of the middle blocks the emulator drops, in (0, 1) "
                                               "(FS-LLM uses 0.2 and 0.5).")
    distill_steps: int = Field(0, ge=0, description="Distillation steps aligning the emulator to the full middle "
                                                    "on server data before round 1 (0: plain layer drop).")
    distill_lr: float = Field(1e-4, gt=0, description="AdamW learning rate of the distillation.")
    local_ot: bool = Field(False, description="LocalOT baseline: each client trains its own adapter, nothing averaged.")
    adapter_training: Literal["lora", "full"] = Field(
        "lora", description="How the adapter blocks train: lora (their LoRA tensors) or full (every base parameter of "
                            "the a + b blocks, averaged by the server into the owner's model, as offsite tuning).")

    @field_validator("drop_ratio")
    @classmethod
    def _open_interval(cls, value: float) -> float:
        if not 0 < value < 1:
            raise ValueError(f"drop_ratio must be in (0, 1), got {value}")
        return value


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def offsite_report_section(run_dir: Path, out_dir: Path) -> list[str]:
    """The run report's section: what left the model owner against the full model, and the final
    scores plugged into the full model and through the emulator."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    aggregates = [e for e in events if e.get("event") == "aggregate" and "owner_model_bytes" in e]
    if not aggregates:
        return []
    first, last = aggregates[0], aggregates[-1]
    lines = ["## Offsite tuning (FedOT)", "",
             f"- Emulator: {first['emulator_blocks']} of the {first['middle_blocks']} middle blocks kept.",
             f"- Left the owner, once per client: {_mb(first['shipped_once_bytes'])} of the full model's "
             f"{_mb(first['owner_model_bytes'])} ({100 * first['shipped_share']:.1f}%); "
             f"{last['clients_with_emulator']} clients received it "
             f"({_mb(last['clients_with_emulator'] * first['shipped_once_bytes'])} in all)."]
    if "distill_loss_first" in first:
        lines.append(f"- Distillation: {first['distill_steps']} steps, normalised MSE "
                     f"{first['distill_loss_first']:.4f} -> {first['distill_loss_last']:.4f}.")
    evals = [e for e in events if e.get("event") == "eval" and e.get("round", 0) > 0]
    full = [e for e in evals if "split" not in e]
    emulator = [e for e in evals if e.get("split") == "emulator"]
    if full and emulator:
        lines += ["", "| final score | adapter in the full model | adapter on the emulator |", "|---|---|---|"]
        for key, value in full[-1]["metrics"].items():
            if "/" not in key and key in emulator[-1]["metrics"]:
                lines.append(f"| {key} | {value:.3f} | {emulator[-1]['metrics'][key]:.3f} |")
    return lines + [""]


def full_mode_problems(config: Any, opts: FedOTOptions) -> list[str]:
    """Settings ``adapter_training: full`` cannot honour, one line each naming the field. The blocks'
    weights are base weights: they travel outside the adapter state, which is what quantisation keeps
    frozen, client-level DP clips and noises, the codecs, robust rules and update-norm bound measure
    against, and a server optimizer steps on."""
    if opts.adapter_training != "full":
        return []
    why = "method.options.adapter_training=full"
    fed, lines = config.federation, []
    if config.model.quantization != "none":
        lines.append(f"model.quantization={config.model.quantization}: {why} trains the blocks' base weights, which "
                     "a quantised base cannot hold; use model.quantization=none or adapter_training=lora")
    privacy = getattr(config, "privacy", None)
    if privacy is not None and privacy.client_level:
        lines.append(f"privacy.mode={privacy.mode}: {why} uploads block weights, which client-level DP does not "
                     "clip or noise (it acts on the adapter state); use privacy.mode=none or adapter_training=lora")
    if privacy is not None and privacy.dp_sgd.enabled:
        lines.append(f"privacy.dp_sgd.enabled=true: {why} is not built with DP-SGD; use adapter_training=lora")
    if fed.uplink_compression != "none":
        lines.append(f"federation.uplink_compression={fed.uplink_compression}: {why} uploads the blocks' weights, "
                     "not a change against what the client received; use none")
    if fed.robust.rule != "none" or fed.robust.clip_norm is not None:
        lines.append(f"federation.robust: {why}'s block weights are not in the adapter state the robust rules "
                     "measure; use rule none without clip_norm")
    if fed.max_update_norm is not None:
        lines.append(f"federation.max_update_norm={fed.max_update_norm}: {why}'s block weights are not in the "
                     "adapter state the bound is measured against; leave it unset")
    if config.method.server_optimizer.name != "none":
        lines.append(f"method.server_optimizer.name={config.method.server_optimizer.name}: {why} averages the "
                     "blocks straight into the owner's model (FedAvg); use none")
    if config.training.keep_optimizer:
        lines.append(f"training.keep_optimizer=true: {why} builds a fresh optimizer over the blocks each job")
    if opts.local_ot:
        lines.append(f"method.options.local_ot=true: LocalOT with {why} (a block copy per client) is not built")
    return lines


@register_method
class FedOT(MethodStrategy):
    name = "fedot"
    image_refusal = "offsite tuning's adapter and emulator blocks are the decoder blocks of a text model"
    seq2seq_refusal = ("the adapter is the first a / last b blocks of one decoder stack and the emulator its "
                       "layer-dropped middle; an encoder-decoder has two stacks and no such split is defined")
    summary = ("offsite tuning: clients train the first a / last b blocks (LoRA or full) on a layer-dropped "
               "emulator; FedAvg")
    Options = FedOTOptions
    report_section = staticmethod(offsite_report_section)
    secure_mean = False  # SecAgg+ not wired for it (docs/fedot.md); plain Flower runs it
    edits_base_weights = True  # with adapter_training: full (the blocks' weights are averaged into the model)

    def __init__(self, options: Mapping[str, Any] | None = None, server_optimizer: Any | None = None) -> None:
        super().__init__(options, server_optimizer)
        if self.opts.a + self.opts.b == 0:
            raise ValueError("method.options.a=0 and method.options.b=0: the adapter needs at least one block")
        if self.opts.local_ot:
            if not is_identity(server_optimizer):
                raise ValueError("method.options.local_ot=true averages nothing: a server optimizer has nothing to step on")
            if self.full:
                raise ValueError("method.options.local_ot=true with method.options.adapter_training=full is not built")
            self.personalized = True
        if self.full and not is_identity(server_optimizer):
            raise ValueError(f"method.server_optimizer.name={server_optimizer.name}: "
                             "method.options.adapter_training=full averages the blocks straight into the owner's "
                             "model (FedAvg); use none")
        self.emulator: Emulator | None = None
        self.model: torch.nn.Module | None = None
        self.shipped: set[int] = set()
        """Clients that already received the emulator-model (it is sent once)."""
        self.distill_losses: list[float] = []
        self.owner = False
        """True in the model owner's (server's) process (``begin_round`` ran): clients there train on the
        owner's model. False on a client in its own process (a Flower node): its emulator-model is built
        from what it received (``receive_emulator``)."""
        self.received = False
        """This process's model runs an emulator-model received from the owner."""
        self.released_bytes = 0
        """Bytes of dropped blocks' base weights this (client) process freed after receiving the emulator."""
        self.trained_blocks: AdapterState = {}
        """``full``, on the client: the blocks the last local job trained (read by ``client_update``)."""

    @property
    def full(self) -> bool:
        """``adapter_training: full``: the adapter is every base parameter of the a + b blocks."""
        return self.opts.adapter_training == "full"

    config_problems = staticmethod(full_mode_problems)
    """Checked with the config, before any model loads (``strategies.check_experiment_method``)."""

    # --- set-up -------------------------------------------------------------------------------
    def prepare_model(self, model: torch.nn.Module) -> None:
        self.model = model
        self.emulator = Emulator.build(model, self.opts.a, self.opts.b, self.opts.drop_ratio)
        keys = self.adapter_keys(adapter_parameters(model))
        if not self.full and not any(self.emulator.block_of(k) is not None for k in keys):
            raise ValueError(f"FedOT: peft.target_modules put no LoRA tensor in the adapter blocks "
                             f"{self.emulator.adapter_blocks}")

    def adapter_keys(self, state: Mapping[str, Any]) -> list[str]:
        """The adapter state's tensors that train: LoRA of the first a / last b blocks (``lora``; none of
        the blocks' LoRA with ``full``, whose blocks train as base weights), and adapter tensors outside the
        blocks (a classification head)."""
        blocks = set() if self.full else set(self.emulator.adapter_blocks)
        return [k for k in state if (block := self.emulator.block_of(k)) is None or block in blocks]

    def block_state(self) -> AdapterState:
        """``full``: the current global blocks (the owner's model), copied, under their wire names."""
        return {BLOCK_PREFIX + name: p.detach().to("cpu").clone()
                for name, p in self.emulator.block_parameters(self.model).items()}

    def begin_round(self, round_idx: int, server: ServerContext) -> None:
        self.owner = True
        if self.opts.distill_steps and not self.emulator.distilled:
            indices = sorted(i for idx in (server.client_indices or []) for i in idx)
            if not indices:
                raise ValueError("FedOT distillation needs training records on the server; none were encodable")
            seed = derive_seed(self.opts.seed or 0, "fedot_distill")
            self.distill_losses = distill(self.model, self.emulator, server.make_batch(indices, seed),
                                          self.opts.distill_steps, self.opts.distill_lr, seed)

    # --- a round ------------------------------------------------------------------------------
    def configure_client(self, round_idx: int, client_id: int, global_state: AdapterState, store: Any) -> ClientPlan:
        keys = self.adapter_keys(global_state)
        control: AdapterState = {}
        if client_id not in self.shipped:  # the emulator-model leaves the owner once per client
            control = {f"emulator/{k}": v for k, v in self.shipped_parameters().items()}
            self.shipped.add(client_id)
        upload = [] if self.opts.local_ot else list(keys)
        if self.full:  # the blocks go down every round and come back trained
            blocks = self.block_state()
            control.update(blocks)
            upload += list(blocks)
        downlink = {} if self.opts.local_ot else {k: global_state[k] for k in keys}
        return ClientPlan(client_id=client_id, downlink=downlink, trainable=keys, upload=upload, control=control,
                          info={"view": "emulator", "distilled": bool(self.emulator.distilled)},
                          start_needed=self.opts.local_ot)  # the middle's LoRA never changes (B = 0)

    def shipped_parameters(self) -> dict[str, torch.Tensor]:
        """What leaves the owner once per client (``full``: without the blocks, which travel every round)."""
        travelling = self.emulator.block_parameters(self.model) if self.full else ()
        return self.emulator.shipped_parameters(self.model, travelling)

    def attach_client_hooks(self, round_idx: int, plan: ClientPlan, store: Any) -> None:
        if not self.owner:
            self.receive_emulator(plan, store)
        if self.opts.local_ot:
            stored = store.get(plan.client_id, LOCAL_NAME) if store is not None else None
            if stored is not None:
                plan.init_state = dict(stored)

    def receive_emulator(self, plan: ClientPlan, store: Any) -> None:
        """On a client in its own process (a Flower node): run the emulator-model the owner sent. The first
        plan carries it (``plan.control``); the client keeps it in its store and later plans reload it
        from there when this process has not loaded it yet. Every tensor the emulator view uses is
        overwritten with the received values (embeddings, norms, head, the adapter blocks' base weights,
        the kept middle blocks; a distilled kept block becomes a frozen copy holding the received values,
        as on the owner), so training depends only on what was received and the adapter; the dropped
        blocks' weights, which the process loaded with the model's architecture, are never run, and are
        freed (except for LocalOT, whose per-client scores run the full model where the client is)."""
        shipped = {k[len(SHIPPED_PREFIX):]: v for k, v in plan.control.items() if k.startswith(SHIPPED_PREFIX)}
        if shipped:
            if store is not None:
                store.put(plan.client_id, RECEIVED_NAME, shipped)
        elif self.received:
            return
        else:
            shipped = store.get(plan.client_id, RECEIVED_NAME) if store is not None else None
            if shipped is None:
                raise ValueError(f"fedot: client {plan.client_id} has no emulator-model: the owner sends it with the "
                                 "client's first plan and the client keeps it in its store (a lost client store?)")
        self.emulator.load_received(self.model, shipped, distilled=bool(plan.info.get("distilled")))
        if not self.opts.local_ot:  # nothing here runs the full middle (LocalOT's per-client scores do)
            self.released_bytes = self.emulator.release_dropped(self.model)
        self.received = True

    def client_view(self, plan: ClientPlan):
        if plan.info.get("distilled") and not self.emulator.distilled:  # e.g. a Flower node: its own plain drop
            raise ValueError("fedot: the server distilled the emulator but this process holds only the plain "
                             "layer drop (shipping the distilled blocks to other processes is not built)")
        if self.full:
            return self._received_blocks(plan)
        return self.emulator.active()

    @contextlib.contextmanager
    def _received_blocks(self, plan: ClientPlan):
        """``full``: the emulator view with the blocks the plan carries loaded into the model. On exit the
        trained blocks are kept for ``client_update`` and the model's own blocks are put back (in process
        the clients share the server's model, whose blocks change only by aggregation)."""
        params = self.emulator.block_parameters(self.model)
        received = {k[len(BLOCK_PREFIX):]: v for k, v in plan.control.items() if k.startswith(BLOCK_PREFIX)}
        if set(received) != set(params):
            raise ValueError(f"fedot: the plan carries {len(received)} block tensors; the adapter blocks "
                             f"{self.emulator.adapter_blocks} have {len(params)}")
        saved = {name: p.detach().clone() for name, p in params.items()}
        self.trained_blocks = {}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(received[name])
        try:
            with self.emulator.active():
                yield
            self.trained_blocks = {BLOCK_PREFIX + n: p.detach().to("cpu").clone() for n, p in params.items()}
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.requires_grad_(False)
                    p.copy_(saved[name])

    def trainable_base_parameters(self, model: torch.nn.Module, plan: ClientPlan) -> dict[str, torch.nn.Parameter]:
        """``full``: the blocks' base parameters train with the plan's adapter tensors (set trainable here;
        frozen again when the client view closes)."""
        if not self.full:
            return {}
        params = self.emulator.block_parameters(model)
        for p in params.values():
            p.requires_grad_(True)
        return params

    def client_update(self, round_idx: int, plan: ClientPlan, trained: AdapterState, result: TrainResult,
                      store: Any) -> ClientUpdate:
        if self.full:
            return ClientUpdate(client_id=plan.client_id, num_examples=result.num_examples, job=plan.job,
                                tensors={**{k: trained[k] for k in plan.trainable}, **self.trained_blocks},
                                metrics={"loss": result.mean_loss})
        if not self.opts.local_ot:
            return super().client_update(round_idx, plan, trained, result, store)
        store.put(plan.client_id, LOCAL_NAME, {k: trained[k].detach().float().clone() for k in plan.trainable})
        return ClientUpdate(client_id=plan.client_id, tensors={}, num_examples=result.num_examples, job=plan.job,
                            metrics={"loss": result.mean_loss})

    def check_update(self, global_state: AdapterState, update: ClientUpdate) -> None:
        blocks = {k: v for k, v in update.tensors.items() if k.startswith(BLOCK_PREFIX)}
        adapter = {k: v for k, v in update.tensors.items() if k not in blocks}
        if blocks and not self.full:
            raise ValueError(f"fedot: client {update.client_id} uploaded {next(iter(blocks))}; the adapter blocks "
                             "train through LoRA (method.options.adapter_training=lora)")
        validate_update(global_state, adapter)
        if blocks:
            validate_update({BLOCK_PREFIX + n: p for n, p in self.emulator.block_parameters(self.model).items()},
                            blocks)
        allowed = set(self.adapter_keys(global_state))
        refuse_uploaded(ClientUpdate(update.client_id, adapter, update.num_examples), lambda k: k not in allowed,
                        "fedot", "only the adapter blocks' tensors are trained")

    def aggregate(self, round_idx: int, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        metrics = self.bytes_metrics()
        if self.distill_losses:  # reported once, with the first aggregate after the distillation
            metrics.update(distill_loss_first=self.distill_losses[0], distill_loss_last=self.distill_losses[-1],
                           distill_steps=len(self.distill_losses))
            self.distill_losses = []
        if self.opts.local_ot:
            return AggregateResult(global_state={k: v.clone() for k, v in global_state.items()},
                                   metrics={**metrics, "clients_trained": len(updates)})
        if self.full:
            return self.aggregate_blocks(global_state, updates, metrics)
        averaged = self.average_updates(global_state, updates)
        return AggregateResult(global_state=self.apply_average(global_state, averaged), metrics=metrics)

    def aggregate_blocks(self, global_state: AdapterState, updates: Sequence[ClientUpdate],
                         metrics: dict[str, Any]) -> AggregateResult:
        """``full``: FedAvg of the blocks, W <- sum_k p_k W_k (p_k = n_k / sum n), written into the owner's
        model as ``base_delta`` = mean - W (the engine adds it in place and checkpoints the changed
        weights); adapter tensors outside the blocks (a head) are averaged into the global state."""
        weights = example_weights(updates)
        params = self.emulator.block_parameters(self.model)
        mean = weighted_average([{k: u.tensors[BLOCK_PREFIX + k] for k in params} for u in updates], weights)
        delta = {name: mean[name] - p.detach().to("cpu", torch.float32) for name, p in params.items()}
        keys = [k for k in updates[0].tensors if not k.startswith(BLOCK_PREFIX)]
        new_global = {k: v.clone() for k, v in global_state.items()}
        if keys:
            new_global.update(weighted_average([{k: u.tensors[k] for k in keys} for u in updates], weights))
        return AggregateResult(global_state=new_global, base_delta=delta, metrics=metrics)

    def bytes_metrics(self) -> dict[str, Any]:
        full = self.emulator.full_model_bytes(self.model)
        shipped = state_bytes(self.shipped_parameters())
        out = {"owner_model_bytes": full, "shipped_once_bytes": shipped, "shipped_share": shipped / full,
               "emulator_blocks": len(self.emulator.kept), "middle_blocks": len(self.emulator.middle),
               "clients_with_emulator": len(self.shipped), "adapter_training": self.opts.adapter_training}
        if self.full:
            out["adapter_block_bytes"] = state_bytes(self.emulator.block_parameters(self.model))
        return out

    # --- evaluation ---------------------------------------------------------------------------
    def evaluation_views(self):
        return {"emulator": self.emulator.active}

    def personal_state(self, client_id: int, global_state: AdapterState, store: Any) -> AdapterState | None:
        if not self.opts.local_ot:
            return None
        return global_with_stored(global_state, store, client_id, LOCAL_NAME)

    # --- resume -------------------------------------------------------------------------------
    # ``full``: the averaged blocks live in the owner's model; the engine checkpoints them with the base
    # weights a method changed (``base_delta`` keys, ``run_state``) and a resume loads them back.
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["shipped"] = sorted(self.shipped)
        state["distilled"] = self.emulator.distilled_state() if self.emulator is not None else {}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.shipped = set(int(c) for c in state.get("shipped", []))
        if state.get("distilled"):
            self.emulator.load_distilled(dict(state["distilled"]))
