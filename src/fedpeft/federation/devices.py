"""One worker process per device (``federation.devices``): each holds its own copy of the model on its device
and trains the plans it is given, serially or in batched groups (``federation.concurrent_clients``); the
round's plans are spread over the workers in contiguous chunks, and the replies come back in plan order.

Workers are ``torch.multiprocessing`` processes started with ``spawn`` (no fork of a process that holds
a model or CUDA state), one duplex pipe each. A worker builds what a Flower node builds from the same
config (data, partition, strategy, model from the run seed), so the same plan trains identically in any
worker: one client's result does not depend on the device count. Per round a worker receives the global
adapter, its plans, the learning rate and the base weights a method changed (FLoRA, FedEx-LoRA merge
into the base), and returns one ``LocalResult`` (its upload wire-encoded) or an error per plan.

Client-private state stays on the server's disk store, which workers do not hold: methods that read or
write it on the client (SCAFFOLD's c_k, FedSA-LoRA's B, local-only, ``training.keep_optimizer``) are
refused with the reason before any worker starts.
"""

from __future__ import annotations

import logging
import pickle
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.multiprocessing as mp

from fedpeft.adapters import AdapterState
from fedpeft.config import build_config
from fedpeft.data.dataset import load_experiment_data
from fedpeft.federation.batched_runner import GroupedRunner
from fedpeft.federation.client import ClientRunner, prepare_client_data
from fedpeft.federation.transport import Job, ServerLink, Transport
from fedpeft.models.peft_wrap import load_experiment_model, set_base_weights
from fedpeft.strategies import build_experiment_strategy
from fedpeft.strategies.base import ClientPlan

log = logging.getLogger(__name__)

DEVICE_METHODS = frozenset({"fedit", "fedprox", "ffa_lora", "fltac", "fedls", "hetlora", "zero_padding", "flora",
                            "flexlora", "fedex_lora"})
"""Methods whose client side needs nothing of the server's client store (checked: workers hold none)."""


def resolve_devices(devices: int | Sequence[str], cuda_count: int) -> list[str]:
    """``federation.devices`` as a list of device names: a count N means cuda:0..N-1 (CUDA must have N
    devices); a list is taken as given (``cpu`` may repeat: one worker per entry)."""
    if isinstance(devices, int):
        if devices > cuda_count:
            raise ValueError(f"federation.devices={devices}: this machine has {cuda_count} CUDA device(s); give a "
                             f"count <= {cuda_count} or a list such as [cpu, cpu]")
        return [f"cuda:{i}" for i in range(devices)]
    out = []
    for name in devices:
        dev = torch.device(name)
        if dev.type == "cuda" and (dev.index or 0) >= cuda_count:
            raise ValueError(f"federation.devices: '{name}' is not on this machine ({cuda_count} CUDA device(s))")
        out.append(str(dev))
    return out


def device_refusal(method: str, config) -> str | None:
    if method not in DEVICE_METHODS:
        return (f"method '{method}' keeps client-private state in the server's client store, which device workers "
                f"do not hold (supported: {', '.join(sorted(DEVICE_METHODS))})")
    if config.training.keep_optimizer:
        return "training.keep_optimizer=true keeps optimizer state in the server's client store"
    return None


def spread(n_plans: int, workers: int) -> list[range]:
    """Contiguous chunks of plan positions, one per worker, sizes differing by at most one."""
    base, extra = divmod(n_plans, workers)
    out, start = [], 0
    for w in range(workers):
        size = base + (1 if w < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def _send(conn, message: Any) -> None:
    """Plain pickle through the pipe: tensors travel by value (small adapter states), not through shared
    memory and file-descriptor passing, so no resource-sharer thread or temp socket outlives a run."""
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn) -> Any:
    return pickle.loads(conn.recv_bytes())


def _worker(config_json: dict, device: str, conn) -> None:
    """A worker's life: build the model and client side on ``device``, then answer train requests."""
    try:
        cfg = build_config(config_json)
        torch.set_num_threads(cfg.model.threads or 1)
        data = load_experiment_data(cfg)
        strategy = build_experiment_strategy(cfg)
        loaded, model = load_experiment_model(cfg, data, device=torch.device(device))
        strategy.prepare_model(model)
        runner = ClientRunner(model, strategy, cfg, prepare_client_data(cfg, data, loaded.tokenizer), None)
        grouped = GroupedRunner.build(runner)
        _send(conn, ("ready", None))
    except Exception:
        _send(conn, ("error", traceback.format_exc()))
        return
    while True:
        msg = _recv(conn)
        if msg[0] == "stop":
            return
        _, round_idx, plans, global_state, lr, base = msg
        if base:
            set_base_weights(model, base)
        out: list[Any] = []
        if grouped is not None:
            for group in grouped.groups(plans):
                try:
                    out.extend(grouped.train(round_idx, [plans[i] for i in group], global_state, lr))
                except Exception as exc:
                    out.extend([exc] * len(group))
        else:
            for plan in plans:
                try:
                    out.append(runner.run(round_idx, plan, global_state, lr))
                except Exception as exc:
                    out.append(exc)
        _send(conn, ("done", [RuntimeError(f"{type(x).__name__}: {x}") if isinstance(x, Exception) else x for x in out]))


class DeviceTransport(Transport):
    """The round's plans spread over one worker process per device (see the module docstring)."""

    def __init__(self, config, devices: list[str], server: ServerLink) -> None:
        refusal = device_refusal(server.method, config)
        if refusal is not None:
            raise ValueError(f"federation.devices={devices}: {refusal}")
        self.server = server
        self.devices = devices
        ctx = mp.get_context("spawn")
        self.workers = []
        for device in devices:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(config.model_dump(mode="json"), device, child), daemon=True)
            proc.start()
            self.workers.append((proc, parent))
        for (proc, conn), device in zip(self.workers, devices):
            try:
                kind, detail = _recv(conn)
            except EOFError:  # it exited before answering (e.g. a spawned child could not import __main__)
                proc.join(timeout=10)
                kind, detail = "error", f"exit code {proc.exitcode} before it was ready"
            if kind != "ready":
                self.close()
                raise RuntimeError(f"federation.devices: the worker on {device} failed to start:\n{detail}")
        log.info("federation.devices: one worker per device on %s", ", ".join(devices))

    def jobs(self, round_idx: int, plans: Sequence[ClientPlan], global_state: AdapterState, lr: float,
             progress: Any) -> Iterator[tuple[ClientPlan, Job]]:
        results: list[Any] = []

        def job(i: int) -> Any:
            if not results:
                try:
                    results.extend(self._train(round_idx, plans, global_state, lr))
                except Exception as exc:  # a worker died: every job of the round fails with it
                    results.extend([exc] * len(plans))
            if isinstance(results[i], Exception):
                raise results[i]
            return results[i]

        for i, plan in enumerate(plans):
            yield plan, (lambda i=i: job(i))

    def _train(self, round_idx: int, plans: Sequence[ClientPlan], global_state: AdapterState, lr: float) -> list[Any]:
        base = self.server.base_weights()
        chunks = spread(len(plans), len(self.workers))
        for (proc, conn), chunk in zip(self.workers, chunks):
            if len(chunk):
                _send(conn, ("train", round_idx, [plans[i] for i in chunk], global_state, lr, base))
        out: list[Any] = []
        for (proc, conn), chunk, device in zip(self.workers, chunks, self.devices):
            if not len(chunk):
                continue
            try:
                kind, replies = _recv(conn)
            except EOFError:
                raise RuntimeError(f"federation.devices: the worker on {device} died (exit code {proc.exitcode})")
            out.extend(replies)
        return out

    def close(self) -> None:
        for proc, conn in self.workers:
            try:
                _send(conn, ("stop",))
            except (BrokenPipeError, OSError):
                pass
        for proc, _ in self.workers:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
