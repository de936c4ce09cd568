"""The engine: owns the round loop and nothing else.

One shared PEFT model; per sampled client the global adapter is loaded, the ClientPlan applied, the
local trainer run, and the strategy's update collected; then the strategy aggregates, the engine
evaluates every E rounds, logs, and checkpoints atomically. All randomness of a round derives from
(seed, round, client), so ``--resume`` from the last completed round reproduces an uninterrupted run
bit for bit.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpeft.adapters import (
    AdapterState,
    adapter_parameters,
    get_adapter_state,
    set_adapter_state,
    state_bytes,
)
from fedpeft.config import ExperimentConfig, load_config
from fedpeft.data.dataset import ExperimentData, load_experiment_data
from fedpeft.evaluation.classification import classification_eval
from fedpeft.evaluation.generation import generation_eval
from fedpeft.federation.checkpoint import Checkpoint, load_latest, save_checkpoint
from fedpeft.federation.client import ClientRunner, prepare_client_data
from fedpeft.federation.client_store import ClientStore
from fedpeft.federation.local_trainer import round_lr
from fedpeft.federation.metrics_log import MetricsLog
from fedpeft.federation.progress import RunProgress
from fedpeft.federation.sampling import derive_seed, sample_clients
from fedpeft.federation.transport import InProcessTransport, Transport
from fedpeft.metering.allocator import malloc_mode, tune_malloc
from fedpeft.metering.compression import decode, encode
from fedpeft.metering.flops import count_parameters
from fedpeft.metering.memory import peak_cuda_mb, peak_rss_mb
from fedpeft.models.peft_wrap import (
    add_to_base_weight,
    base_weights,
    load_experiment_model,
    master_from_saved,
    set_base_weights,
)
from fedpeft.strategies import build_experiment_strategy
from fedpeft.strategies.base import AggregateResult, ClientUpdate

log = logging.getLogger(__name__)

KILL_ENV = "FEDPEFT_KILL_AT"
"""Testing aid: ``client:<round>:<n>`` (after the n-th local job of a round) or ``checkpoint:<round>``
(checkpoint files written, not yet committed) makes the process SIGKILL itself there."""


def _maybe_kill(point: str) -> None:
    if os.environ.get(KILL_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class RunSummary:
    run_dir: Path
    rounds: int
    seconds: float
    initial_metrics: dict[str, float] = field(default_factory=dict)
    final_metrics: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    final_adapter_dir: Path | None = None
    report_path: Path | None = None


@dataclass
class ServerContext:
    """What ``Strategy.begin_round`` may use on the server: the shared model and server-held data."""

    model: torch.nn.Module
    tokenizer: Any
    config: ExperimentConfig
    data: ExperimentData
    make_batch: Any
    client_indices: list[list[int]] | None = None
    """Per client, its training record indices (after records too long to encode were dropped)."""
    labels: list[str] | None = None
    """Partition label of every training record."""
    run_dir: Path | None = None
    """Where a strategy may write its own artifacts (FL-TAC's cluster assignments)."""


class Engine:
    def __init__(self, config: ExperimentConfig, run_dir: Path, resume: bool = False,
                 transport: Transport | None = None) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.transport = transport  # None: InProcessTransport (federation/transport.py)

    # --- set-up -------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.config
        tune_malloc()  # keep CPU activation buffers in the heap between steps (see metering/allocator.py)
        if cfg.model.threads:
            torch.set_num_threads(cfg.model.threads)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.resume:
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        # Data first: bad data fails before a model is loaded.
        self.data = load_experiment_data(cfg)
        self.data.labels()  # a missing partition field fails here, before the model loads
        self.strategy = build_experiment_strategy(cfg)  # an unknown method or bad option too
        loaded, self.model = load_experiment_model(cfg, self.data)
        self.model_source, self.model_load_seconds = loaded.source, loaded.load_seconds
        self.tokenizer = loaded.tokenizer
        self.strategy.prepare_model(self.model)
        self.client_data = prepare_client_data(cfg, self.data, self.tokenizer)
        self.client_indices, self.labels = self.client_data.indices, self.client_data.labels
        self.store = ClientStore(self.run_dir / "client_store")
        from fedpeft.metering.loggers import make_loggers

        self.live = make_loggers(cfg.output.live_loggers, self.run_dir, cfg.model_dump(mode="json"))
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", listener=self.live.log_event if self.live else None)
        self.base_touched: set[str] = set()
        self.base_master: dict[str, torch.Tensor] = {}  # float32 masters of merged bfloat16 base weights
        self.runner = ClientRunner(self.model, self.strategy, cfg, self.client_data, self.store)
        if self.transport is None:
            self.transport = InProcessTransport(self.runner)

    # --- evaluation -------------------------------------------------------------------------------
    def _evaluate_records(self, records: list[dict], final: bool) -> dict:
        """Score ``records`` with the adapter now loaded: generation and the data's own scorer, or the
        classification head's accuracy; per-round evaluations are capped at ``evaluation.max_examples``
        per group, the final one is not."""
        ecfg = self.config.evaluation
        if self.config.model.head == "classification":
            return classification_eval(self.model, self.tokenizer, records, self.data.classes(),
                                       max_len=self.config.training.max_seq_len, batch_size=ecfg.batch_size,
                                       max_examples=None if final else ecfg.max_examples, group_by=ecfg.group_by)
        return generation_eval(self.model, self.tokenizer, records, self.config.data.template,
                               score=self.data.score, metric_name=self.data.metric_name,
                               max_new_tokens=ecfg.max_new_tokens, batch_size=ecfg.batch_size,
                               max_examples=None if final else ecfg.max_examples, group_by=ecfg.group_by)

    def evaluate(self, global_state: AdapterState, round_idx: int, final: bool = False) -> dict:
        set_adapter_state(self.model, self.strategy.evaluation_state(global_state, self.store))
        result = self._evaluate_records(self.data.evaluation, final)
        self.headline_metric = result["headline"]
        self.metrics.log("eval", round=round_idx, metrics=result["metrics"], examples=result["examples"],
                         seconds=result["seconds"], samples=result["samples"])
        metrics = dict(result["metrics"])
        per_task = self.strategy.task_evaluation_states(global_state, self.store)
        if per_task:
            metrics.update(self.evaluate_task_adapters(per_task, global_state, round_idx, final))
        return metrics

    def evaluate_suites(self, global_state: AdapterState, round_idx: int) -> dict[str, float]:
        """The configured benchmark suites on the final global model (``fedpeft eval`` uses the same code)."""
        from fedpeft.evaluation.suites import EvalOptions, flat_metrics, run_suite

        ecfg = self.config.evaluation
        set_adapter_state(self.model, self.strategy.evaluation_state(global_state, self.store))
        start = time.perf_counter()
        metrics: dict[str, float] = {}
        for suite in ecfg.suites:
            options = EvalOptions(limit=ecfg.suite_limit, template=self.config.data.template,
                                  batch_size=ecfg.batch_size, seed=self.config.seed)
            metrics.update({f"suite/{k}": v for k, v in flat_metrics(run_suite(self.model, self.tokenizer, suite, options)).items()})
        self.metrics.log("eval", round=round_idx, split="suites", suites=list(ecfg.suites), metrics=metrics,
                         seconds=time.perf_counter() - start)
        return metrics

    def _evaluation_labels(self) -> list[str]:
        """The partition label (``data.partition.by``, else the task) of every evaluation record; once."""
        if getattr(self, "_eval_labels", None) is None:
            self._eval_labels = [str(r.get(self.data.label_field, r.get("task"))) for r in self.data.evaluation]
        return self._eval_labels

    def evaluate_task_adapters(self, per_task: dict[str, AdapterState], global_state: AdapterState,
                               round_idx: int, final: bool) -> dict[str, float]:
        """Multi-adapter methods (FL-TAC): each label's evaluation records scored with its own adapter."""
        start = time.perf_counter()
        groups: dict[str, list[dict]] = {}
        for record, label in zip(self.data.evaluation, self._evaluation_labels()):
            groups.setdefault(label, []).append(record)
        fallback = self.strategy.evaluation_state(global_state, self.store)
        metrics: dict[str, float] = {}
        weighted, total, headline = 0.0, 0, None
        for label, records in sorted(groups.items()):
            set_adapter_state(self.model, per_task.get(label, fallback))
            result = self._evaluate_records(records, final)
            headline = result["headline"]
            metrics[f"task_adapters/{label}/{headline}"] = result["metrics"][headline]
            weighted += result["metrics"][headline] * result["examples"]
            total += result["examples"]
        if headline is not None and total:
            metrics[f"task_adapters/{headline}"] = weighted / total
        self.metrics.log("eval", round=round_idx, split="task_adapters", metrics=metrics, examples=total,
                         seconds=time.perf_counter() - start)
        return metrics

    def evaluate_personal(self, global_state: AdapterState, round_idx: int) -> dict[str, float]:
        """Personalised methods (FedSA-LoRA, local-only): each client's own adapter on the evaluation
        records of the labels it holds; reports the mean and spread over clients. With
        ``evaluation.personal_max_clients`` a seeded sample of that many clients (one generation pass
        per client is the cost: about 34 s for 1,000 tiny clients)."""
        start = time.perf_counter()
        clients = list(range(len(self.client_indices)))
        cap = self.config.evaluation.personal_max_clients
        if cap is not None and cap < len(clients):
            rng = np.random.default_rng(derive_seed(self.config.seed, "personal_eval"))
            clients = sorted(int(c) for c in rng.choice(len(clients), size=cap, replace=False))
        per_client = {}
        for client_id in clients:
            idx = self.client_indices[client_id]
            state = self.strategy.personal_state(client_id, global_state, self.store)
            held = {self.labels[i] for i in idx}
            records = [r for r, label in zip(self.data.evaluation, self._evaluation_labels()) if label in held]
            if state is None or not records:
                continue
            set_adapter_state(self.model, state)
            result = self._evaluate_records(records, final=False)
            per_client[client_id] = result["metrics"][result["headline"]]
        if not per_client:
            return {}
        values = np.array(list(per_client.values()))
        metrics = {"personal/mean": float(values.mean()), "personal/std": float(values.std()),
                   "personal/min": float(values.min()), "personal/max": float(values.max())}
        self.metrics.log("eval", round=round_idx, split="personal", metrics=metrics,
                         per_client={str(k): v for k, v in per_client.items()}, examples=len(per_client),
                         clients_sampled=len(clients), clients_total=len(self.client_indices),
                         seconds=time.perf_counter() - start)
        return metrics

    # --- the run --------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        cfg = self.config
        t_start = time.perf_counter()
        self._setup()
        fed = cfg.federation
        start_round, cum_up, cum_down, elapsed_before = 1, 0, 0, 0.0
        initial_metrics: dict[str, float] = {}
        ckpt = load_latest(self.run_dir / "checkpoints") if self.resume else None
        if ckpt is not None:
            self.metrics.truncate(ckpt.state["metrics_offset"])
            global_state = ckpt.global_state
            self.strategy.load_state_dict(ckpt.strategy_state)
            self.store.restore(ckpt.state["client_store_index"])
            if ckpt.base_weights:
                set_base_weights(self.model, ckpt.base_weights)
                self.base_touched = set(ckpt.base_weights)
                self.base_master = master_from_saved(self.model, ckpt.base_weights)
            start_round = ckpt.round + 1
            cum_up, cum_down = ckpt.state["cum_uplink_bytes"], ckpt.state["cum_downlink_bytes"]
            elapsed_before = ckpt.state.get("elapsed_seconds", 0.0)
            initial_metrics = ckpt.state.get("initial_metrics", {})
            log.info("resuming %s after round %d", self.run_dir, ckpt.round)
        else:
            if self.resume:
                log.warning("no completed round in %s: starting from round 1", self.run_dir)
                self.metrics.truncate(0)
                self.store.restore({})
            global_state = self.strategy.init_global(get_adapter_state(self.model))
        adapter_bytes = state_bytes(get_adapter_state(self.model))
        self.metrics.log(
            "run_start", run_dir=str(self.run_dir), resumed_from_round=start_round - 1,
            model_source=self.model_source, model_load_seconds=self.model_load_seconds,
            trainable_params=sum(p.numel() for p in adapter_parameters(self.model).values()),
            base_params=count_parameters(self.model)[0], compression=fed.uplink_compression,
            adapter_bytes=adapter_bytes, num_clients=fed.num_clients, method=cfg.method.name, malloc=malloc_mode(),
            config=cfg.model_dump(mode="json"), data=self.data.info,
        )
        if start_round == 1:
            self.metrics.log("partition", clients=[
                {"client": c, "examples": len(idx), "labels": dict(zip(*np.unique([self.labels[i] for i in idx], return_counts=True)))
                 if idx else {}} for c, idx in enumerate(self.client_indices)])
            empty = [c for c, idx in enumerate(self.client_indices) if not idx]
            if empty:
                log.warning("clients with no training examples (they will be skipped when sampled): %s", empty)
            if cfg.evaluation.before_training:
                initial_metrics = self.evaluate(global_state, 0)
        final_metrics: dict[str, float] = {}
        progress = RunProgress(enabled=cfg.output.progress, rounds=fed.rounds, start_round=start_round)
        with progress:
            for round_idx in range(start_round, fed.rounds + 1):
                round_start = time.perf_counter()
                phases = {"train": 0.0, "aggregate": 0.0, "evaluate": 0.0, "checkpoint": 0.0}
                lr = round_lr(round_idx, fed.rounds, cfg.training.lr, cfg.training.lr_min, cfg.training.schedule)
                self.store.begin_round(round_idx)
                sampled = sample_clients(cfg.seed, round_idx, fed.num_clients, fed.clients_per_round)
                self.strategy.begin_round(round_idx, ServerContext(
                    self.model, self.tokenizer, cfg, self.data, self.client_data.batches,
                    client_indices=self.client_indices, labels=self.labels, run_dir=self.run_dir))
                plans = self.strategy.configure_round(round_idx, sampled, global_state, self.store)
                progress.start_round(round_idx, len(plans))
                updates: list[ClientUpdate] = []
                round_up = round_down = 0
                t_train = time.perf_counter()
                jobs = self.transport.jobs(round_idx, plans, global_state, lr, progress)
                for n, (plan, run_job) in enumerate(jobs, start=1):
                    down = state_bytes(plan.downlink) + state_bytes(plan.control)
                    try:
                        local = run_job()
                        update, result, losses = local.update, local.result, local.losses
                        self.strategy.check_update(global_state, update)
                        self.strategy.commit_private(update, self.store)  # client-private state, once accepted
                    except Exception as exc:  # a failing client never stops the round or corrupts the global state
                        log.warning("round %d client %d (%s) failed: %s", round_idx, plan.client_id, plan.job, exc)
                        self.metrics.log("client_failed", round=round_idx, client=plan.client_id, job=plan.job,
                                         error=f"{type(exc).__name__}: {exc}")
                        round_down += down
                        progress.end_client(None)
                        continue
                    raw_up = state_bytes(update.tensors) + state_bytes(update.control)
                    if update.wire_bytes is not None:
                        raw_up = update.wire_bytes
                    up = raw_up
                    if fed.uplink_compression != "none":
                        update.tensors, tensor_bytes = compress_update(update.tensors, global_state, fed.uplink_compression)
                        up = tensor_bytes + state_bytes(update.control)
                    round_up += up
                    round_down += down
                    self.metrics.log(
                        "client_train", round=round_idx, client=plan.client_id, job=plan.job, steps=result.steps,
                        loss=result.mean_loss, last_loss=result.last_loss, losses=losses, lr=lr,
                        examples=result.num_examples, examples_seen=result.examples_seen, tokens=result.tokens,
                        seconds=result.seconds, downlink_bytes=down, uplink_bytes=up, uplink_bytes_raw=raw_up,
                    )
                    updates.append(update)
                    progress.end_client(result.mean_loss)
                    _maybe_kill(f"client:{round_idx}:{n}")
                phases["train"] = time.perf_counter() - t_train
                if plans and not updates:
                    raise RuntimeError(f"round {round_idx}: every sampled client failed; see client_failed events")
                # A transport may combine updates first (SecAgg+: only their weighted mean is known).
                combine = getattr(self.transport, "combine", None)
                to_aggregate = combine(round_idx, global_state, updates) if combine is not None else updates
                if plans and not to_aggregate:
                    raise RuntimeError(f"round {round_idx}: no update could be combined; see deploy_round events")
                t_agg = time.perf_counter()
                # A strategy that trains nothing (zero-shot) keeps the global state as it is.
                aggregated = (self.strategy.aggregate(round_idx, global_state, to_aggregate) if plans
                              else AggregateResult(global_state=global_state))
                global_state = aggregated.global_state
                if aggregated.base_delta:
                    add_to_base_weight(self.model, aggregated.base_delta, master=self.base_master)
                    self.base_touched.update(aggregated.base_delta)
                round_down += state_bytes(aggregated.broadcast) * fed.num_clients
                phases["aggregate"] = time.perf_counter() - t_agg
                self.metrics.log("aggregate", round=round_idx, clients=[u.client_id for u in updates],
                                 num_updates=len(updates), seconds=phases["aggregate"], **aggregated.metrics)
                is_last = round_idx == fed.rounds
                every = cfg.evaluation.every_rounds
                if is_last or (every and round_idx % every == 0):
                    t_eval = time.perf_counter()
                    metrics = self.evaluate(global_state, round_idx, final=is_last)
                    phases["evaluate"] = time.perf_counter() - t_eval
                    progress.set_metric(self.headline_metric, metrics.get(self.headline_metric))
                    if is_last:
                        final_metrics = metrics
                cum_up += round_up
                cum_down += round_down
                self.metrics.log(
                    "round_end", round=round_idx, seconds=time.perf_counter() - round_start,
                    uplink_bytes=round_up, downlink_bytes=round_down, cum_uplink_bytes=cum_up,
                    cum_downlink_bytes=cum_down, phase_seconds=phases, peak_rss_mb=peak_rss_mb(),
                    peak_cuda_mb=peak_cuda_mb(), lr=lr,
                )
                t_ckpt = time.perf_counter()
                state = {
                    "round": round_idx, "metrics_offset": self.metrics.offset(),
                    "client_store_index": self.store.snapshot(), "cum_uplink_bytes": cum_up,
                    "cum_downlink_bytes": cum_down, "initial_metrics": initial_metrics,
                    "elapsed_seconds": elapsed_before + time.perf_counter() - t_start,
                }
                save_checkpoint(
                    self.run_dir / "checkpoints",
                    Checkpoint(round_idx, global_state, self.strategy.state_dict(),
                               base_weights(self.model, sorted(self.base_touched), self.base_master)
                               if self.base_touched else {}, state),
                    keep=cfg.output.keep_checkpoints,
                    before_commit=lambda r=round_idx: _maybe_kill(f"checkpoint:{r}"),
                )
                self.store.collect_garbage()
                phases["checkpoint"] = time.perf_counter() - t_ckpt
                # After the offset saved above: a resume from this round drops this line, nothing else.
                self.metrics.log("checkpoint", round=round_idx, seconds=phases["checkpoint"])
                progress.end_round(round_up, round_down)
        if not final_metrics and start_round > fed.rounds:  # resumed a run that had already finished
            final_metrics = self.evaluate(global_state, fed.rounds, final=True)
        if self.strategy.personalized:
            final_metrics.update(self.evaluate_personal(global_state, fed.rounds))
        if cfg.evaluation.suites:
            final_metrics.update(self.evaluate_suites(global_state, fed.rounds))
        final_dir = self.save_final(global_state)
        seconds = elapsed_before + time.perf_counter() - t_start
        summary = RunSummary(self.run_dir, fed.rounds, seconds, initial_metrics, final_metrics, peak_rss_mb(),
                             cum_up, cum_down, final_dir)
        self.metrics.log("run_end", rounds=fed.rounds, seconds=seconds, initial_metrics=initial_metrics,
                         final_metrics=final_metrics, peak_rss_mb=summary.peak_rss_mb,
                         cum_uplink_bytes=cum_up, cum_downlink_bytes=cum_down, peak_cuda_mb=peak_cuda_mb())
        self.metrics.close()
        self.live.close()
        if self.config.output.report:
            from fedpeft.report import write_report

            summary.report_path = write_report(self.run_dir)
        return summary

    def save_final(self, global_state: AdapterState) -> Path:
        """The global adapter in PEFT format (``PeftModel.from_pretrained`` loads it); base weights
        changed by the method (FLoRA, FedEx-LoRA) are saved beside it."""
        final = self.run_dir / "final"
        set_adapter_state(self.model, global_state)
        self.model.save_pretrained(str(final))
        if self.base_touched:
            from safetensors.torch import save_file

            save_file(base_weights(self.model, sorted(self.base_touched), self.base_master),
                      str(final / "base_weights.safetensors"))
        return final


def compress_update(tensors: AdapterState, reference: AdapterState, scheme: str) -> tuple[AdapterState, int]:
    """What the server receives when a client sends ``tensors`` compressed with ``scheme``: the update
    minus the global state is encoded (deltas have a smaller range than values), decoded, and added back.
    Returns the received tensors and the exact encoded byte count."""
    delta = {k: v - reference[k] if k in reference and reference[k].shape == v.shape else v for k, v in tensors.items()}
    payload, nbytes = encode(delta, scheme)
    decoded = decode(payload, scheme)
    received = {k: decoded[k] + reference[k] if k in reference and reference[k].shape == v.shape else decoded[k]
                for k, v in tensors.items()}
    return received, nbytes


def default_run_dir(config: ExperimentConfig) -> Path:
    name = config.output.run_name or f"{config.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return Path(config.output.dir) / name


def run_experiment(config: ExperimentConfig | str | Path | None = None, overrides: list[str] | None = None,
                   resume: str | Path | None = None, run_dir: str | Path | None = None) -> RunSummary:
    """Run (or resume) an experiment. ``config`` is a config object or a YAML path; ``resume`` a run
    directory whose saved ``config.yaml`` is used (overrides still apply)."""
    if resume is not None:
        resume = Path(resume)
        saved = resume / "config.yaml"
        if not saved.is_file():
            raise FileNotFoundError(f"--resume {resume}: no config.yaml there; is it a fedpeft run directory?")
        cfg = load_config(saved, overrides)
        return Engine(cfg, resume, resume=True).run()
    if not isinstance(config, ExperimentConfig):
        config = load_config(config, overrides)
    elif overrides:
        from fedpeft.config import apply_overrides, build_config

        config = build_config(apply_overrides(config.model_dump(mode="json"), overrides))
    return Engine(config, Path(run_dir) if run_dir else default_run_dir(config)).run()
