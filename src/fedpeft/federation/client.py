"""The client side of a round: the same code runs in the in-process engine and in a Flower ClientApp.

``ClientData`` holds the encoded training records and which of them each client owns;
``ClientRunner.run`` takes one ClientPlan, loads its adapter state into the shared model, trains
with the local trainer and returns the strategy's ClientUpdate, its private state staged in
``update.private`` (committed by the caller after ``update_checks.check_client_update`` accepts it).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedpeft.adapters import AdapterState, adapter_parameters, get_adapter_state, set_adapter_state, set_trainable
from fedpeft.alignment.dpo import collate_pairs
from fedpeft.alignment.experiment import is_preference, objective_from_config
from fedpeft.data.dataset import encode_for_experiment
from fedpeft.data.encoding import EncodedExample, collate
from fedpeft.data.images import collate_images
from fedpeft.data.partition import partition
from fedpeft.federation.local_trainer import load_optimizer_tensors, make_optimizer, optimizer_tensors, train_local
from fedpeft.federation.update_checks import StagedStore
from fedpeft.federation.wire import LocalResult, encode_upload
from fedpeft.metering.memory import peak_cuda_mb, reset_peak_cuda
from fedpeft.models.device import model_device
from fedpeft.models.peft_wrap import adalora_step_hook, end_adalora_job, lora_modules
from fedpeft.privacy.client_dp import client_noise_seed, privatize_upload
from fedpeft.seeding import derive_seed, index_stream
from fedpeft.strategies.base import ClientPlan, Strategy

log = logging.getLogger(__name__)

OPTIMIZER_NAME = "local_optimizer_"
"""Client-store name prefix (+ the plan's job) of a kept local optimizer state (training.keep_optimizer)."""


@dataclass
class ClientData:
    encoded: list[EncodedExample | None]
    labels: list[str]
    indices: list[list[int]]
    """Per client, the indices of its (encodable) training records."""
    pad_id: int
    batch_size: int
    collate_fn: Callable = collate
    """Batch maker: ``collate`` (examples), or ``dpo.collate_pairs`` (preference pairs, training.objective)."""

    def examples(self, client_id: int, data_key: str | None = None) -> list[int]:
        idx = self.indices[client_id]
        return idx if data_key is None else [i for i in idx if str(self.labels[i]) == str(data_key)]

    def label_counts(self, client_id: int) -> dict[str, int]:
        """The client's own partition labels and how many of its records carry each."""
        return dict(Counter(str(self.labels[i]) for i in self.indices[client_id]))

    def batches(self, indices: list[int], seed: int):
        """Endless batches over ``indices`` in a seeded order (epochs without replacement)."""
        stream = index_stream(indices, seed)
        while True:
            yield self.collate_fn([self.encoded[next(stream)] for _ in range(self.batch_size)], self.pad_id)


def prepare_client_data(config, data, tokenizer) -> ClientData:
    """Partition ``data.train`` over the configured clients and encode it (deterministic from the seed,
    so every process that calls this (the engine, each Flower client) sees the same split)."""
    labels = data.labels()
    pcfg = config.data.partition
    indices = partition(labels, config.federation.num_clients, pcfg.kind, config.seed, alpha=pcfg.alpha,
                        min_frac=pcfg.min_frac, classes_per_client=pcfg.classes_per_client)
    encoded, dropped = encode_for_experiment(config, data, data.train, tokenizer)
    if dropped:
        log.warning("dropped %d of %d training examples whose target does not fit in training.max_seq_len=%d",
                    dropped, len(encoded), config.training.max_seq_len)
    indices = [[i for i in idx if encoded[i] is not None] for idx in indices]
    if config.model.head == "image_classification":  # ``tokenizer`` is the image processor
        images = functools.partial(_collate_images, processor=tokenizer, num_classes=len(data.classes()))
        return ClientData(encoded, labels, indices, None, config.federation.batch_size, collate_fn=images)
    return ClientData(encoded, labels, indices, tokenizer.pad_token_id, config.federation.batch_size,
                      collate_fn=collate_pairs if is_preference(config) else collate)


def _collate_images(examples, pad_id, *, processor, num_classes):
    """``ClientData.collate_fn`` for images (no padding: ``pad_id`` is unused)."""
    return collate_images(examples, processor, num_classes)


@contextlib.contextmanager
def scaled_lora(model: torch.nn.Module, scaling: float | None):
    """Temporarily set the LoRA scaling s of every LoRA layer (heterogeneous ranks: s_k = alpha / r_k)."""
    if scaling is None:
        yield
        return
    layers = lora_modules(model)
    saved = {name: dict(layer.scaling) for name, layer in layers.items()}
    try:
        for layer in layers.values():
            for adapter in layer.scaling:
                layer.scaling[adapter] = scaling
        yield
    finally:
        for name, layer in layers.items():
            layer.scaling.update(saved[name])


def _after(first, then):
    """An ``on_step`` callback that runs ``first(step, loss)`` and then ``then`` (when given)."""
    def on_step(step, loss):
        first(step, loss)
        if then is not None:
            then(step, loss)
    return on_step


class ClientRunner:
    def __init__(self, model: torch.nn.Module, strategy: Strategy, config, data: ClientData, store) -> None:
        self.model = model
        self.strategy = strategy
        self.config = config
        self.data = data
        self.store = store
        self.objective = objective_from_config(config)
        """The local loss of a preference objective (training.objective); None: the model's own loss."""

    def run(self, round_idx: int, plan: ClientPlan, start_state: AdapterState | None, lr: float,
            on_start=None, on_step=None) -> LocalResult:
        """The in-process client: :meth:`train`, then the upload encoded for the wire (the engine
        decodes it, checks it, and only then commits the staged private state)."""
        reference = plan.downlink  # what the client received, before any client-side merge
        local = self.train(round_idx, plan, start_state, lr, on_start=on_start, on_step=on_step)
        encode_upload(local, reference, self.config.federation.uplink_compression)
        return local

    def prepare(self, round_idx: int, plan: ClientPlan, start_state: AdapterState | None) -> list:
        """The set-up every local job shares, serial or batched: the job's records (refused when empty), the
        strategy's client hooks and received state, the start adapter with ``plan.init_state`` (or
        ``plan.downlink``) over it, and the trainable keys. Returns the job's examples."""
        data_key = self.strategy.local_data_key(plan, self.data.label_counts(plan.client_id))
        examples = self.data.examples(plan.client_id, data_key)
        if not examples:
            raise ValueError(f"client {plan.client_id} has no training examples"
                             + (f" for '{data_key}'" if data_key else ""))
        # Client side first: hooks and client-private state (e.g. a personal B merged into init_state)
        # come from this client's own store, wherever it runs.
        self.strategy.attach_client_hooks(round_idx, plan, self.store)
        self.strategy.bind_received_state(round_idx, plan, {**(start_state or {}), **plan.downlink})
        if start_state is not None:
            set_adapter_state(self.model, start_state)
        if plan.init_state is not None or plan.downlink:
            set_adapter_state(self.model, plan.init_state if plan.init_state is not None else plan.downlink)
        set_trainable(self.model, plan.trainable)
        return examples

    def train(self, round_idx: int, plan: ClientPlan, start_state: AdapterState | None, lr: float,
              on_start=None, on_step=None) -> LocalResult:
        """Train one plan. ``start_state`` is loaded first (the engine passes the global adapter), then
        ``plan.init_state`` (or ``plan.downlink``) over it. The strategy's private state comes back
        staged in ``update.private``, not yet in the store."""
        cfg = self.config
        examples = self.prepare(round_idx, plan, start_state)
        params = {n: p for n, p in adapter_parameters(self.model).items() if p.requires_grad}
        params.update(self.strategy.trainable_base_parameters(self.model, plan))  # FedOT full: its blocks' weights
        dp = plan.info.get("dp")  # client-level DP (privacy.mode): the round's clip norm and this client's noise
        start = get_adapter_state(self.model) if dp else None
        torch.manual_seed(derive_seed(cfg.seed, "dropout", round_idx, plan.client_id, plan.job))
        batches = self.data.batches(examples, derive_seed(cfg.seed, "batches", round_idx, plan.client_id, plan.job))
        optimizer = None
        if cfg.training.keep_optimizer:  # continue this client's (job's) optimizer from its own store
            optimizer = make_optimizer(list(params.values()), cfg.training.optimizer, lr, cfg.training.weight_decay)
            saved = self.store.get(plan.client_id, OPTIMIZER_NAME + plan.job) if self.store is not None else None
            if saved is not None:
                load_optimizer_tensors(optimizer, params, saved)
        if on_start is not None:
            on_start(plan.client_id, cfg.federation.local_steps)
        device = model_device(self.model)
        reset_peak_cuda(device)  # this job's peak, not the process's
        allocate = adalora_step_hook(self.model)  # AdaLoRA: rank allocation local to this job
        if allocate is not None:
            on_step = _after(allocate, on_step)
        trainer = self.strategy.local_trainer() or train_local  # FedKSeed brings its own (zeroth-order) loop
        with scaled_lora(self.model, plan.scaling), self.strategy.client_view(plan):
            result, losses = trainer(
                self.model, params, batches, plan,
                steps=cfg.federation.local_steps, grad_accumulation=cfg.federation.grad_accumulation, lr=lr,
                optimizer_name=cfg.training.optimizer, weight_decay=cfg.training.weight_decay,
                max_grad_norm=cfg.training.max_grad_norm, precision=cfg.training.precision,
                num_examples=len(examples), on_step=on_step, optimizer=optimizer, loss_fn=self.objective,
                dp_sgd=self._dp_sgd(round_idx, plan),
            )
        end_adalora_job(self.model)
        # Private state is staged, not written: the caller commits it once the update is accepted.
        staged = StagedStore(self.store, plan.client_id)
        trained = get_adapter_state(self.model)
        dp_metrics: dict[str, float] = {}
        if dp:  # what leaves the client: start + clipped change (+ its noise share); private keys stay as trained
            keys = plan.upload if plan.upload is not None else (plan.trainable if plan.trainable is not None else list(trained))
            trained, dp_metrics = privatize_upload(trained, start, keys, dp, client_noise_seed(
                cfg.seed, round_idx, plan.client_id, plan.job, bool(dp.get("reproducible", True))))
        update = self.strategy.client_update(round_idx, plan, trained, result, staged)
        if dp:
            update.num_examples = 1  # DP-FedAvg weighs clients equally (the sensitivity of the mean is C / m)
            update.metrics.update(dp_metrics)
        update.private = {**staged.staged, **update.private}
        if optimizer is not None:  # kept once the update is accepted, like the strategy's private state
            update.private[OPTIMIZER_NAME + plan.job] = optimizer_tensors(optimizer, params)
        update.metrics.setdefault("loss", result.mean_loss)
        return LocalResult(update, result, losses, peak_cuda_mb=peak_cuda_mb(device))

    def finetune(self, client_id: int, state: AdapterState, steps: int, lr: float) -> tuple[AdapterState, float]:
        """Local fine-tuning after federation (evaluation.finetune_steps): ``state`` loaded, every adapter
        tensor trained ``steps`` steps on the client's own records (a fresh optimizer, the run's loss or
        preference objective, seeded by the client), nothing uploaded or stored. Returns the fine-tuned
        adapter and the mean loss."""
        cfg = self.config
        examples = self.data.examples(client_id)
        if not examples:
            raise ValueError(f"client {client_id} has no training examples to fine-tune on")
        set_adapter_state(self.model, state)
        set_trainable(self.model, None)
        params = {n: p for n, p in adapter_parameters(self.model).items() if p.requires_grad}
        torch.manual_seed(derive_seed(cfg.seed, "finetune_dropout", client_id))
        batches = self.data.batches(examples, derive_seed(cfg.seed, "finetune", client_id))
        result, _ = train_local(
            self.model, params, batches, ClientPlan(client_id=client_id, downlink={}, job="finetune"),
            steps=steps, grad_accumulation=cfg.federation.grad_accumulation, lr=lr,
            optimizer_name=cfg.training.optimizer, weight_decay=cfg.training.weight_decay,
            max_grad_norm=cfg.training.max_grad_norm, precision=cfg.training.precision,
            num_examples=len(examples), loss_fn=self.objective)
        return get_adapter_state(self.model), result.mean_loss

    def _dp_sgd(self, round_idx: int, plan: ClientPlan) -> dict | None:
        """``train_local``'s DP-SGD settings (privacy.dp_sgd), the noise seeded per (round, client, job)."""
        cfg = self.config
        dp = getattr(cfg, "privacy", None)
        if dp is None or not dp.dp_sgd.enabled:
            return None
        seed = (derive_seed(cfg.seed, "dp_sgd", round_idx, plan.client_id, plan.job) if dp.reproducible_noise
                else secrets.randbits(63))
        return {"noise_multiplier": dp.dp_sgd.noise_multiplier, "max_grad_norm": dp.dp_sgd.max_grad_norm,
                "expected_batch_size": cfg.federation.batch_size * cfg.federation.grad_accumulation, "seed": seed}
