"""Transports: how the engine's round loop gets a ClientPlan trained.

The contract (:class:`Transport`): the engine asks for the round's jobs and, for each, calls the
returned zero-argument function to get the client's ``LocalResult`` (or the exception that stands for
its failure); then it hands the accepted updates to ``combine`` before the strategy aggregates::

    for plan, run_job in transport.jobs(round_idx, plans, global_state, lr, progress):
        local = run_job()          # LocalResult, or raises: the engine logs client_failed
    updates = transport.combine(round_idx, global_state, accepted)   # identity by default

``InProcessTransport`` (the default) trains each plan on the engine's shared model when its job is
called, so a kill after the n-th client still lands between two clients. Other transports (Flower's, in
``fedpeft.deploy.flower.transport``) send every plan of the round at once and hand back the replies; a
transport may raise :class:`RunStopped` after its last job (e.g. fewer replies than a configured
minimum), which stops the run with the last checkpoint intact.

A transport that needs something of the server gets it at construction as a :class:`ServerLink`
(the engine builds it and calls the transport factory it was given), never by reaching into the engine.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedpeft.adapters import AdapterState
from fedpeft.strategies.base import ClientPlan, ClientUpdate

Job = Callable[[], Any]
"""Returns the client's ``fedpeft.federation.wire.LocalResult`` or raises."""


class RunStopped(RuntimeError):
    """The run cannot go on (no accepted update in a round, too few clients answered); the last
    checkpoint is intact and ``--resume`` continues from it."""


@dataclass(frozen=True)
class ServerLink:
    """What a transport may use of the server, given at construction."""

    method: str
    """The configured method's name (SecAgg+ refuses methods that need each update)."""
    log_event: Callable[..., None]
    """``log_event(kind, **fields)`` appends an event to ``metrics.jsonl``."""
    base_weights: Callable[[], dict[str, torch.Tensor]]
    """Current values of the base weights the method has changed (FLoRA, FedEx-LoRA); empty if none."""
    client_examples: Callable[[int], int]
    """Training examples client ``k`` holds in the server's partition."""


class Transport:
    """Base class: ``jobs`` must be given; ``combine`` is the identity."""

    personal_state_on_server = True
    """False when clients' private state lives where they train (Flower nodes), not in the server's
    client store: the server then cannot evaluate personal adapters."""

    def jobs(self, round_idx: int, plans: Sequence[ClientPlan], global_state: AdapterState, lr: float,
             progress: Any) -> Iterator[tuple[ClientPlan, Job]]:
        raise NotImplementedError

    def combine(self, round_idx: int, global_state: AdapterState, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        """The updates the strategy aggregates, from the accepted ones (SecAgg+: their unmasked mean)."""
        return updates

    def evaluate_personal(self, round_idx: int, global_state: AdapterState, clients: list[int]
                          ) -> dict[int, float] | None:
        """Where clients' private state lives off the server: each client's score with its own adapter,
        computed there (client -> headline score). None: this transport cannot (the server then logs
        why and reports no personal metric)."""
        return None


class InProcessTransport(Transport):
    """In the engine's process, on its shared model: serially (``ClientRunner.run`` per plan), or with a
    ``grouped`` runner (``federation/batched_runner.py``, ``federation.concurrent_clients > 1``) in groups
    trained in one batched pass each. A group trains when its first job is called, after the engine has
    committed every earlier group's accepted state, so a kill still lands between two jobs."""

    def __init__(self, runner: Any, grouped: Any | None = None) -> None:
        self.runner = runner
        self.grouped = grouped

    def jobs(self, round_idx: int, plans: Sequence[ClientPlan], global_state: AdapterState, lr: float,
             progress: Any) -> Iterator[tuple[ClientPlan, Job]]:
        if self.grouped is None:
            for plan in plans:
                yield plan, functools.partial(self.runner.run, round_idx, plan, global_state, lr,
                                              on_start=progress.start_client, on_step=progress.step)
            return
        for group in self.grouped.groups(plans):
            members = [plans[i] for i in group]
            results: list[Any] = []

            def job(k: int, members=members, results=results) -> Any:
                if not results:
                    try:
                        results.extend(self.grouped.train(round_idx, members, global_state, lr,
                                                          on_start=progress.start_client))
                    except Exception as exc:  # the batched pass failed: every job of the group fails with it
                        results.extend([exc] * len(members))
                if isinstance(results[k], Exception):
                    raise results[k]
                return results[k]

            for k, plan in enumerate(members):
                yield plan, functools.partial(job, k)
