"""The engine: set-up and the round loop (``Engine.run`` -> ``run_round`` -> ``train_clients``).

One shared PEFT model; per sampled client the transport trains the ClientPlan (in process: the global
adapter loaded, the plan applied, the local trainer run) and returns the strategy's update; each reply
is checked before anything of it is kept; then the strategy aggregates, the evaluator
(``federation/evaluator.py``) scores every E rounds, and the run state (``federation/run_state.py``) is
checkpointed atomically. All randomness of a round derives from (seed, round, client), so ``--resume``
from the last completed round reproduces an uninterrupted run bit for bit.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from fedpeft.adapters import AdapterState, adapter_parameters, get_adapter_state, set_adapter_state, state_bytes
from fedpeft.config import ExperimentConfig, apply_overrides, build_config, load_config
from fedpeft.data.dataset import load_experiment_data
from fedpeft.federation import run_state
from fedpeft.federation.batched_runner import GroupedRunner
from fedpeft.federation.client import ClientRunner, prepare_client_data
from fedpeft.federation.client_store import ClientStore
from fedpeft.federation.devices import DeviceTransport, resolve_devices
from fedpeft.federation.durable import StorageError
from fedpeft.federation.evaluator import Evaluator
from fedpeft.federation.local_trainer import round_lr
from fedpeft.federation.metrics_log import MetricsLog
from fedpeft.federation.preflight import model_preflight, partition_preflight
from fedpeft.federation.progress import RunProgress
from fedpeft.federation.robust import apply_robust_rule
from fedpeft.federation.run_dir import RunDirectory, default_run_dir
from fedpeft.federation.transport import InProcessTransport, RunStopped, ServerLink, Transport
from fedpeft.federation.update_checks import check_client_update
from fedpeft.federation.wire import decode_upload, payload_bytes
from fedpeft.metering.allocator import malloc_mode, tune_malloc
from fedpeft.metering.flops import count_parameters
from fedpeft.metering.loggers import make_loggers
from fedpeft.metering.memory import peak_cuda_mb, peak_rss_mb
from fedpeft.models.device import check_precision, check_quantization, cuda_device_count, resolve_device
from fedpeft.models.peft_wrap import add_to_base_weight, base_weights, load_experiment_model
from fedpeft.models.registry import model_head
from fedpeft.privacy.run_privacy import RunPrivacy
from fedpeft.report import write_report
from fedpeft.seeding import sample_clients
from fedpeft.strategies import build_experiment_strategy, check_model_family
from fedpeft.strategies.base import AggregateResult, ClientPlan, ClientUpdate, ServerContext

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
    privacy: dict | None = None
    """Differential privacy spent: mode, epsilon, delta, noise multiplier (None without a privacy section)."""


class Engine:
    """``Engine(config, run_dir).run()``. ``transport``: None (in process), a Transport, or a factory
    ``transport(server: ServerLink) -> Transport`` the engine calls once the run is set up."""

    def __init__(self, config: ExperimentConfig, run_dir: Path, resume: bool = False,
                 transport: Transport | Callable[[ServerLink], Transport] | None = None, overwrite: bool = False,
                 run_directory: RunDirectory | None = None) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.overwrite = overwrite
        self.transport = transport
        self.rundir = run_directory
        """The locked run directory (federation/run_dir.py); the CLI opens it before the slow imports."""
        # The machine can run this config (device, quantisation, precision) before anything is written or loaded.
        self.device = resolve_device(config.model.device)
        check_quantization(config.model.quantization, self.device)
        check_precision(config.training.precision, self.device)
        self.run_peak_cuda: float | None = None

    # --- set-up -------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.config
        tune_malloc()  # keep CPU activation buffers in the heap between steps (see metering/allocator.py)
        if cfg.model.threads:
            torch.set_num_threads(cfg.model.threads)
        # Data first: bad data fails before a model is loaded.
        model_preflight(cfg)  # an unknown model name offline fails now, not after the Hub's retries
        check_model_family(cfg)  # an encoder-decoder (config.json): methods / objectives it cannot run, before weights
        self.data = load_experiment_data(cfg)
        partition_preflight(cfg, self.data.labels())  # a missing field or infeasible partition fails here too
        self.strategy = build_experiment_strategy(cfg)  # an unknown method or bad option too
        # privacy section: sigma calibrated, budget and delta checked, before the model loads
        self.privacy = RunPrivacy.build(cfg, self.data.labels())
        loaded, self.model = load_experiment_model(cfg, self.data, device=self.device)
        self.model_source, self.model_load_seconds = loaded.source, loaded.load_seconds
        self.tokenizer = loaded.tokenizer
        self.strategy.prepare_model(self.model)
        if self.privacy is not None:
            self.privacy.check_model(self.model)  # DP-SGD: every trainable module is one Opacus can handle
        self.client_data = prepare_client_data(cfg, self.data, self.tokenizer)
        self.client_indices, self.labels = self.client_data.indices, self.client_data.labels
        self.store = ClientStore(self.run_dir / "client_store")
        self.live = make_loggers(cfg.output.live_loggers, self.run_dir, cfg.model_dump(mode="json"))
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", listener=self.live.log_event if self.live else None)
        self.runner = ClientRunner(self.model, self.strategy, cfg, self.client_data, self.store)
        if self.transport is None and cfg.federation.devices is not None:  # one worker process per device
            devices = resolve_devices(cfg.federation.devices, cuda_device_count())
            self.transport = functools.partial(DeviceTransport, cfg, devices)
        if self.transport is None:
            self.transport = InProcessTransport(self.runner, grouped=GroupedRunner.build(self.runner))
        elif not isinstance(self.transport, Transport):
            self.transport = self.transport(ServerLink(
                method=cfg.method.name, log_event=self.metrics.log,
                base_weights=lambda: base_weights(self.model, sorted(self.state.base_touched)),
                client_examples=lambda cid: len(self.client_indices[cid])))
        self.evaluator = Evaluator(self.model, self.tokenizer, cfg, self.data, self.strategy, self.store, self.metrics,
                                   self.client_indices, self.labels,
                                   personal_on_server=self.transport.personal_state_on_server,
                                   remote_personal=self.transport.evaluate_personal, finetune=self._finetune)

    def _finetune(self, client_id: int, state: AdapterState) -> AdapterState:
        """evaluation.finetune_steps: the client fine-tunes ``state`` on its own data (the last round's lr
        unless evaluation.finetune_lr is set)."""
        cfg = self.config
        lr = cfg.evaluation.finetune_lr or round_lr(cfg.federation.rounds, cfg.federation.rounds, cfg.training.lr,
                                                    cfg.training.lr_min, cfg.training.schedule)
        return self.runner.finetune(client_id, state, cfg.evaluation.finetune_steps, lr)[0]

    # --- the run --------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        """Lock the run directory (config.yaml, checkpoint choice: federation/run_dir.py), run, unlock."""
        if self.rundir is None:
            self.rundir = RunDirectory.open(self.run_dir, self.config, resume=self.resume, overwrite=self.overwrite)
        try:
            finished = self.rundir.resume.finished
            if finished is not None:  # resuming a finished run: nothing to do, nothing logged
                report = self.run_dir / "report" / "report.md"
                return RunSummary(self.run_dir, finished.get("rounds", self.config.federation.rounds),
                                  finished.get("seconds", 0.0), finished.get("initial_metrics", {}),
                                  finished.get("final_metrics", {}), finished.get("peak_rss_mb", 0.0),
                                  finished.get("cum_uplink_bytes", 0), finished.get("cum_downlink_bytes", 0),
                                  self.run_dir / "final", report if report.is_file() else None,
                                  finished.get("privacy"))
            return self._run()
        finally:
            self.rundir.close()

    def _run(self) -> RunSummary:
        cfg, fed = self.config, self.config.federation
        t_start = time.perf_counter()
        self._setup()
        self.state = state = run_state.start(self.run_dir, self.rundir.resume.checkpoint, self.model, self.strategy,
                                             self.store, self.metrics, resuming=self.rundir.resuming)
        if self.privacy is not None:
            self.privacy.load_state_dict(state.privacy)  # the accountant continues where the checkpoint left it
        self._log_run_start(state)
        if state.next_round == 1:
            self._log_partition()
            if cfg.evaluation.before_training:
                state.initial_metrics = self.evaluator.evaluate(state.global_state, 0)
        final_metrics: dict[str, float] = {}
        rounds_done = fed.rounds
        progress = RunProgress(enabled=cfg.output.progress, rounds=fed.rounds, start_round=state.next_round)
        try:
            with progress:
                for round_idx in range(state.next_round, fed.rounds + 1):
                    stop = self.privacy.budget_stop(round_idx) if self.privacy is not None else None
                    if stop is not None:  # privacy.max_epsilon: end with the rounds done, before exceeding it
                        log.warning(stop)
                        self.metrics.log("privacy_budget_stop", round=round_idx, reason=stop,
                                         epsilon=self.privacy.epsilon())
                        rounds_done = round_idx - 1
                        final_metrics = self.evaluator.evaluate(state.global_state, rounds_done, final=True)
                        break
                    metrics = self.run_round(round_idx, progress, elapsed=lambda: time.perf_counter() - t_start)
                    if round_idx == fed.rounds:
                        final_metrics = metrics
        except RunStopped as exc:
            self.metrics.log("run_stopped", reason=str(exc))  # after the last checkpoint's offset
            self._close()
            raise
        if not final_metrics and state.next_round > fed.rounds:  # resumed a run that had already finished
            final_metrics = self.evaluator.evaluate(state.global_state, fed.rounds, final=True)
        final_metrics.update(self.evaluator.finish(state.global_state, rounds_done))
        final_dir = self.save_final(state.global_state)
        seconds = state.elapsed_before + time.perf_counter() - t_start
        summary = RunSummary(self.run_dir, rounds_done, seconds, state.initial_metrics, final_metrics, peak_rss_mb(),
                             state.cum_up, state.cum_down, final_dir)
        privacy = {"privacy": self.privacy.summary()} if self.privacy is not None else {}
        summary.privacy = privacy.get("privacy")
        self.metrics.log("run_end", rounds=rounds_done, seconds=seconds, **privacy, initial_metrics=state.initial_metrics,
                         final_metrics=final_metrics, peak_rss_mb=summary.peak_rss_mb,
                         cum_uplink_bytes=state.cum_up, cum_downlink_bytes=state.cum_down,
                         peak_cuda_mb=max((v for v in (self.run_peak_cuda, peak_cuda_mb(self.device)) if v is not None),
                                          default=None))
        self._close()
        if cfg.output.report:
            summary.report_path = write_report(self.run_dir)
        return summary

    def run_round(self, round_idx: int, progress: RunProgress, elapsed: Callable[[], float]) -> dict[str, float]:
        """One round: sample, configure, train (each reply checked before anything of it is kept),
        aggregate, evaluate every E rounds, log, checkpoint. Returns the round's evaluation metrics."""
        cfg, fed, state = self.config, self.config.federation, self.state
        round_start = time.perf_counter()
        phases = {"train": 0.0, "aggregate": 0.0, "evaluate": 0.0, "checkpoint": 0.0}
        lr = round_lr(round_idx, fed.rounds, cfg.training.lr, cfg.training.lr_min, cfg.training.schedule)
        self.store.begin_round(round_idx)
        sampled = sample_clients(cfg.seed, round_idx, fed.num_clients, fed.clients_per_round)
        self.strategy.begin_round(round_idx, ServerContext(
            self.model, self.tokenizer, cfg, self.data, self.client_data.batches,
            client_indices=self.client_indices, labels=self.labels, run_dir=self.run_dir, lr=lr))
        plans = self.strategy.configure_round(round_idx, sampled, state.global_state, self.store)
        if self.privacy is not None:  # client-level DP: the clip norm and noise share travel with each plan
            self.privacy.annotate(plans)
        progress.start_round(round_idx, len(plans))

        t_train = time.perf_counter()
        updates, round_up, round_down = self.train_clients(round_idx, plans, lr, progress)
        phases["train"] = time.perf_counter() - t_train
        if plans and not updates:
            raise RunStopped(f"round {round_idx}: no client update was accepted (see the client_failed events in "
                             f"{self.run_dir / 'metrics.jsonl'}); the last checkpoint is intact: fix the cause, then "
                             f"fedpeft run --resume {self.run_dir}")
        to_aggregate = self.transport.combine(round_idx, state.global_state, updates)
        to_aggregate = apply_robust_rule(fed.robust, state.global_state, to_aggregate)  # federation.robust
        privacy_metrics = None
        if self.privacy is not None:  # clip (visible updates), noise the sum, charge the accountants
            by_job = {(p.client_id, p.job): p for p in plans}
            trained = [(u.client_id, fed.local_steps, self._client_examples(by_job[(u.client_id, u.job)]))
                       for u in updates if (u.client_id, u.job) in by_job]
            to_aggregate, privacy_metrics = self.privacy.server_step(round_idx, state.global_state, to_aggregate,
                                                                     trained)
            state.privacy = self.privacy.state_dict()
        if plans and not to_aggregate:
            raise RunStopped(f"round {round_idx}: no update could be combined (see the deploy_round events); "
                             f"resume with fedpeft run --resume {self.run_dir}")

        t_agg = time.perf_counter()
        # A strategy that trains nothing (zero-shot) keeps the global state as it is.
        aggregated = (self.strategy.aggregate(round_idx, state.global_state, to_aggregate) if plans
                      else AggregateResult(global_state=state.global_state))
        state.global_state = aggregated.global_state
        if aggregated.base_delta:
            add_to_base_weight(self.model, aggregated.base_delta, master=state.base_master)
            state.base_touched.update(aggregated.base_delta)
        round_down += state_bytes(aggregated.broadcast) * fed.num_clients
        phases["aggregate"] = time.perf_counter() - t_agg
        self.metrics.log("aggregate", round=round_idx, clients=[u.client_id for u in updates],
                         num_updates=len(updates), seconds=phases["aggregate"], **aggregated.metrics)
        if privacy_metrics is not None:
            self.metrics.log("privacy", round=round_idx, **privacy_metrics)
            progress.set_epsilon(self.privacy.epsilon())

        metrics: dict[str, float] = {}
        is_last, every = round_idx == fed.rounds, cfg.evaluation.every_rounds
        if is_last or (every and round_idx % every == 0):
            t_eval = time.perf_counter()
            metrics = self.evaluator.evaluate(state.global_state, round_idx, final=is_last)
            phases["evaluate"] = time.perf_counter() - t_eval
            progress.set_metric(self.evaluator.headline_metric, metrics.get(self.evaluator.headline_metric))

        state.cum_up += round_up
        state.cum_down += round_down
        # The round's CUDA peak: its jobs' peaks (the runner resets the window per job) and what came after
        # the last job (aggregation, evaluation).
        since_last = peak_cuda_mb(self.device)
        round_peak = max(self.job_peaks + ([since_last] if since_last is not None else []), default=None)
        if round_peak is not None:
            self.run_peak_cuda = max(self.run_peak_cuda or 0.0, round_peak)
        self.metrics.log("round_end", round=round_idx, seconds=time.perf_counter() - round_start,
                         uplink_bytes=round_up, downlink_bytes=round_down, cum_uplink_bytes=state.cum_up,
                         cum_downlink_bytes=state.cum_down, phase_seconds=phases, peak_rss_mb=peak_rss_mb(),
                         peak_cuda_mb=round_peak, lr=lr)
        t_ckpt = time.perf_counter()
        run_state.commit(self.run_dir, round_idx, state, self.model, self.strategy, self.store, self.metrics,
                         keep=cfg.output.keep_checkpoints, elapsed=elapsed(),
                         before_commit=lambda: _maybe_kill(f"checkpoint:{round_idx}"))
        phases["checkpoint"] = time.perf_counter() - t_ckpt
        # After the offset saved above: a resume from this round drops this line, nothing else.
        self.metrics.log("checkpoint", round=round_idx, seconds=phases["checkpoint"])
        progress.end_round(round_up, round_down)
        return metrics

    def train_clients(self, round_idx: int, plans: list[ClientPlan], lr: float, progress: RunProgress
                      ) -> tuple[list[ClientUpdate], int, int]:
        """Every plan's job through the transport. A reply is decoded, then checked
        (``update_checks.check_client_update``); only an accepted one commits its private state and
        joins the aggregation. A failing client never stops the round or leaves state behind."""
        fed, global_state = self.config.federation, self.state.global_state
        updates: list[ClientUpdate] = []
        round_up = round_down = 0
        self.job_peaks: list[float] = []  # CUDA peak of each accepted local job
        for n, (plan, run_job) in enumerate(self.transport.jobs(round_idx, plans, global_state, lr, progress), 1):
            down = state_bytes(plan.downlink) + state_bytes(plan.control)
            round_down += down
            reference = plan.downlink  # the wire codec's reference, as the client received it
            try:
                local = run_job()
                up = payload_bytes(local)
                decode_upload(local, reference)
                update, result = local.update, local.result
                bound = fed.max_client_examples or self._client_examples(plan)
                check_client_update(self.strategy, plan, global_state, update, max_examples=bound,
                                    max_update_norm=fed.max_update_norm, tensors_arrived=local.tensors_arrived)
                self.strategy.commit_private(update, self.store)  # client-private state, once accepted
            except StorageError:  # the machine's disk, not the client: stop the run with the path and cause
                raise
            except Exception as exc:  # a failing client never stops the round or corrupts any state
                log.warning("round %d client %d (%s) failed: %s", round_idx, plan.client_id, plan.job, exc)
                self.metrics.log("client_failed", round=round_idx, client=plan.client_id, job=plan.job,
                                 error=f"{type(exc).__name__}: {exc}")
                progress.end_client(None)
                continue
            round_up += up
            job_peak = getattr(local, "peak_cuda_mb", None)
            if job_peak is not None:
                self.job_peaks.append(job_peak)
            self.metrics.log(
                "client_train", round=round_idx, client=plan.client_id, job=plan.job, steps=result.steps,
                loss=result.mean_loss, last_loss=result.last_loss, losses=local.losses, lr=lr,
                examples=result.num_examples, examples_seen=result.examples_seen, tokens=result.tokens,
                seconds=result.seconds, downlink_bytes=down, uplink_bytes=up,
                uplink_bytes_raw=(update.wire_bytes if update.wire_bytes is not None
                                  else state_bytes(update.tensors) + state_bytes(update.control)),
                peak_cuda_mb=job_peak,
            )
            updates.append(update)
            progress.end_client(result.mean_loss)
            _maybe_kill(f"client:{round_idx}:{n}")
        return updates, round_up, round_down

    def _client_examples(self, plan: ClientPlan) -> int:
        """Training examples the plan's client holds for it in the server's partition (what an honest
        client reports as num_examples; the client resolves the plan's data key the same way)."""
        data_key = self.strategy.local_data_key(plan, self.client_data.label_counts(plan.client_id))
        return len(self.client_data.examples(plan.client_id, data_key))

    def _log_run_start(self, state: run_state.RunState) -> None:
        cfg = self.config
        self.metrics.log(
            "run_start", run_dir=str(self.run_dir), resumed_from_round=state.next_round - 1,
            model_source=self.model_source, model_load_seconds=self.model_load_seconds,
            trainable_params=sum(p.numel() for p in adapter_parameters(self.model).values()),
            base_params=count_parameters(self.model)[0], compression=cfg.federation.uplink_compression,
            adapter_bytes=state_bytes(get_adapter_state(self.model)), num_clients=cfg.federation.num_clients,
            method=cfg.method.name, malloc=malloc_mode(), device=str(self.device), config=cfg.model_dump(mode="json"), data=self.data.info,
            model_head=model_head(cfg.model),
        )

    def _log_partition(self) -> None:
        self.metrics.log("partition", clients=[
            {"client": c, "examples": len(idx),
             "labels": dict(zip(*np.unique([self.labels[i] for i in idx], return_counts=True))) if idx else {}}
            for c, idx in enumerate(self.client_indices)])
        empty = [c for c, idx in enumerate(self.client_indices) if not idx]
        if empty:
            log.warning("clients with no training examples (they will be skipped when sampled): %s", empty)

    def _close(self) -> None:
        self.metrics.close()
        self.live.close()
        close = getattr(self.transport, "close", None)  # device workers end with the run
        if close is not None:
            close()

    def save_final(self, global_state: AdapterState) -> Path:
        """The global adapter in PEFT format (``PeftModel.from_pretrained`` loads it); base weights
        changed by the method (FLoRA, FedEx-LoRA) are saved beside it."""
        final = self.run_dir / "final"
        set_adapter_state(self.model, global_state)
        self.model.save_pretrained(str(final))
        if self.state.base_touched:
            save_file(base_weights(self.model, sorted(self.state.base_touched), self.state.base_master),
                      str(final / "base_weights.safetensors"))
        return final


def run_experiment(config: ExperimentConfig | str | Path | None = None, overrides: list[str] | None = None,
                   resume: str | Path | None = None, run_dir: str | Path | None = None, overwrite: bool = False,
                   run_directory: RunDirectory | None = None) -> RunSummary:
    """Run (or resume) an experiment. ``config`` is a config object or a YAML path; ``resume`` a run
    directory whose saved ``config.yaml`` is used (overrides still apply). ``run_directory``: one the
    caller already opened (and locked) with its config."""
    if run_directory is not None:
        return Engine(run_directory.config, run_directory.path, resume=run_directory.resuming,
                      run_directory=run_directory).run()
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
        config = build_config(apply_overrides(config.model_dump(mode="json"), overrides))
    return Engine(config, Path(run_dir) if run_dir else default_run_dir(config), overwrite=overwrite).run()
