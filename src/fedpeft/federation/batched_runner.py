"""Concurrent clients (``federation.concurrent_clients: C``): a round's plans trained in groups of up to C
in one batched pass over the shared model (``batched_trainer.train_group``), each with its own adapter,
loss, clipping and optimizer. The same client-side steps as ``ClientRunner.train`` run per plan (data key,
hooks, start state, trainable keys, seeded batch stream, kept optimizer, ``client_update`` with staged
private state, wire encoding); only the forward/backward is shared.

Group sizes (:func:`plan_groups`) keep every batched pass within ``federation.max_tokens_per_pass``
(an upper bound per client: batch_size x max_seq_len tokens); a pass that still runs out of memory is
retried as two half groups (results do not depend on the grouping).

A method or model the batched pass cannot reproduce exactly trains serially, said once in the log
(:func:`batching_refusal`): methods not known to be data-only on the client, LoRA dropout or base-model
dropout (serial draws its masks per client), adapters other than plain LoRA on Linear layers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from fedpeft.adapters import AdapterState, adapter_parameters, set_adapter_state
from fedpeft.federation.batched_lora import ClientAdapters, routing_refusal
from fedpeft.federation.batched_trainer import GroupMember, train_group
from fedpeft.federation.client import OPTIMIZER_NAME, ClientRunner
from fedpeft.federation.local_trainer import load_optimizer_tensors, make_optimizer, optimizer_tensors
from fedpeft.federation.update_checks import StagedStore
from fedpeft.federation.wire import LocalResult, encode_upload
from fedpeft.metering.memory import peak_cuda_mb, reset_peak_cuda
from fedpeft.models.device import OutOfMemory, model_device
from fedpeft.models.registry import model_head
from fedpeft.seeding import derive_seed
from fedpeft.strategies.base import ClientPlan

log = logging.getLogger(__name__)

BATCHABLE_METHODS = frozenset({
    "fedit", "fedprox", "ffa_lora", "fedsa_lora", "fltac", "fedls", "fedgpl", "hetlora", "zero_padding", "flora",
    "flexlora", "fedex_lora", "scaffold", "local_only", "centralized",
})
"""Methods whose client side is data only (trainable keys, init state, scaling, and per-client extra loss /
grad transform over the tensors they are given): checked against serial training in
tests/test_batched_clients.py. A method not listed may declare ``batched_training = True`` on its class."""


def plan_groups(n_plans: int, concurrent: int, tokens_per_client: int, max_tokens_per_pass: int | None) -> list[range]:
    """Consecutive groups of plan positions, each of at most ``concurrent`` plans and, with a token budget,
    at most ``max_tokens_per_pass // tokens_per_client`` (never fewer than one plan)."""
    if concurrent < 1 or tokens_per_client < 1:
        raise ValueError(f"concurrent={concurrent} and tokens_per_client={tokens_per_client} must be >= 1")
    size = concurrent
    if max_tokens_per_pass is not None:
        size = max(1, min(size, max_tokens_per_pass // tokens_per_client))
    return [range(start, min(start + size, n_plans)) for start in range(0, n_plans, size)]


def _dropout_in_model(model: torch.nn.Module) -> str | None:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0 and ".lora_dropout." not in name:
            return f"module '{name}' has dropout p={module.p}"
    config = getattr(model, "config", None)
    for attr in ("attention_dropout", "attention_probs_dropout_prob", "hidden_dropout", "hidden_dropout_prob"):
        value = getattr(config, attr, 0.0) if config is not None else 0.0
        if isinstance(value, (int, float)) and value > 0:
            return f"the model config's {attr}={value}"
    return None


def batching_refusal(model: torch.nn.Module, strategy, config) -> str | None:
    """Why the plans of this run cannot train batched with results equal to serial (None: they can)."""
    if not (strategy.name in BATCHABLE_METHODS or getattr(type(strategy), "batched_training", False)):
        return f"method '{strategy.name}' is not known to have data-only client hooks"
    if model_head(config.model) == "seq2seq":
        return "model.head=seq2seq (an encoder-decoder's two stacks are not routed per sample)"
    if config.model.head != "causal_lm":
        return f"model.head={config.model.head} (a per-client classifier head is not routed per sample)"
    return routing_refusal(model) or _dropout_in_model(model)


class GroupedRunner:
    """Trains a group of plans at once with the same client-side steps as ``ClientRunner``."""

    def __init__(self, runner: ClientRunner, concurrent: int, max_tokens_per_pass: int | None = None) -> None:
        self.runner = runner
        self.concurrent = concurrent
        self.max_tokens_per_pass = max_tokens_per_pass

    @classmethod
    def build(cls, runner: ClientRunner) -> "GroupedRunner | None":
        """The grouped runner the config asks for, or None (C = 1, or batching refused: logged once)."""
        fed = runner.config.federation
        if fed.concurrent_clients <= 1:
            return None
        refusal = batching_refusal(runner.model, runner.strategy, runner.config)
        if refusal is not None:
            log.warning("federation.concurrent_clients=%d: training clients one after another instead: %s",
                        fed.concurrent_clients, refusal)
            return None
        return cls(runner, fed.concurrent_clients, fed.max_tokens_per_pass)

    def groups(self, plans: Sequence[ClientPlan]) -> list[range]:
        cfg = self.runner.config
        return plan_groups(len(plans), self.concurrent, cfg.federation.batch_size * cfg.training.max_seq_len,
                           self.max_tokens_per_pass)

    def train(self, round_idx: int, plans: Sequence[ClientPlan], start_state: AdapterState | None, lr: float,
              on_start=None) -> list[LocalResult | Exception]:
        """One result per plan (a LocalResult with its upload wire-encoded, or the exception that failed it)."""
        try:
            return self._train(round_idx, plans, start_state, lr, on_start)
        except OutOfMemory:
            if len(plans) == 1:
                raise
            half = len(plans) // 2
            log.warning("round %d: a batched pass of %d clients ran out of memory; retrying as %d + %d "
                        "(set federation.max_tokens_per_pass to avoid the retry)", round_idx, len(plans), half,
                        len(plans) - half)
            return (self.train(round_idx, plans[:half], start_state, lr, on_start)
                    + self.train(round_idx, plans[half:], start_state, lr, on_start))

    def _member(self, round_idx: int, plan: ClientPlan, start_state: AdapterState | None, lr: float) -> GroupMember:
        """ClientRunner.train's set-up for one plan, into tensors of its own."""
        r = self.runner
        cfg = r.config
        examples = r.prepare(round_idx, plan, start_state)  # the set-up a serial job does
        params = adapter_parameters(r.model)
        adapters = ClientAdapters({n: p.detach() for n, p in params.items()},
                                  [n for n, p in params.items() if p.requires_grad], plan.scaling)
        optimizer = None
        if cfg.training.keep_optimizer:
            optimizer = make_optimizer(list(adapters.params.values()), cfg.training.optimizer, lr,
                                       cfg.training.weight_decay)
            saved = r.store.get(plan.client_id, OPTIMIZER_NAME + plan.job) if r.store is not None else None
            if saved is not None:
                load_optimizer_tensors(optimizer, adapters.params, saved)
        batches = r.data.batches(examples, derive_seed(cfg.seed, "batches", round_idx, plan.client_id, plan.job))
        return GroupMember(plan, adapters, batches, num_examples=len(examples), optimizer=optimizer)

    def _train(self, round_idx: int, plans: Sequence[ClientPlan], start_state: AdapterState | None, lr: float,
               on_start) -> list[LocalResult | Exception]:
        r = self.runner
        cfg = r.config
        out: list[LocalResult | Exception | None] = [None] * len(plans)
        members: list[tuple[int, GroupMember]] = []
        for i, plan in enumerate(plans):
            try:
                members.append((i, self._member(round_idx, plan, start_state, lr)))
            except Exception as exc:  # this client alone fails (as its serial job would)
                out[i] = exc
        if members:
            for _, m in members:
                if on_start is not None:
                    on_start(m.plan.client_id, cfg.federation.local_steps)
            device = model_device(r.model)
            reset_peak_cuda(device)
            results = train_group(
                r.model, [m for _, m in members], steps=cfg.federation.local_steps,
                grad_accumulation=cfg.federation.grad_accumulation, lr=lr, pad_id=r.data.pad_id,
                optimizer_name=cfg.training.optimizer, weight_decay=cfg.training.weight_decay,
                max_grad_norm=cfg.training.max_grad_norm, precision=cfg.training.precision)
            peak = peak_cuda_mb(device)
            last_trained = None
            for k, (i, m) in enumerate(members):
                got = results[k]
                if isinstance(got, Exception):
                    out[i] = got
                    continue
                result, losses = got
                trained = {n: t.detach().to("cpu", torch.float32).clone() for n, t in m.adapters.values.items()}
                staged = StagedStore(r.store, m.plan.client_id)
                update = r.strategy.client_update(round_idx, m.plan, trained, result, staged)
                update.private = {**staged.staged, **update.private}
                if cfg.training.keep_optimizer:
                    update.private[OPTIMIZER_NAME + m.plan.job] = optimizer_tensors(m.optimizer, m.adapters.params)
                update.metrics.setdefault("loss", result.mean_loss)
                local = LocalResult(update, result, losses, peak_cuda_mb=peak)
                encode_upload(local, m.plan.downlink, cfg.federation.uplink_compression)
                out[i] = local
                last_trained = trained
            if last_trained is not None:  # the model ends as after serial training: the last client's adapter
                set_adapter_state(r.model, last_trained)
        return out  # type: ignore[return-value]
