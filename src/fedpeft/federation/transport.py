"""Transports: how the engine's round loop gets a ClientPlan trained.

The engine asks its transport for the round's jobs and, for each, calls the returned zero-argument
function to get the client's ``LocalResult`` (or the exception that stands for its failure)::

    for plan, run_job in transport.jobs(round_idx, plans, global_state, lr, progress):
        local = run_job()          # LocalResult, or raises: the engine logs client_failed

``InProcessTransport`` (the default) trains each plan on the engine's shared model when its job is
called, so a kill after the n-th client still lands between two clients. Other transports (Flower's, in
``fedpeft.deploy.flower.transport``) send every plan of the round at once and hand back the replies; a
transport may raise after its last job (e.g. fewer replies than a configured minimum), which stops the
run with the last checkpoint intact.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from fedpeft.adapters import AdapterState
from fedpeft.strategies.base import ClientPlan

Job = Callable[[], Any]
"""Returns the client's ``fedpeft.federation.client.LocalResult`` or raises."""


class Transport(Protocol):
    def jobs(self, round_idx: int, plans: Sequence[ClientPlan], global_state: AdapterState, lr: float,
             progress: Any) -> Iterator[tuple[ClientPlan, Job]]:
        ...


class InProcessTransport:
    """Serial, in the engine's process, on its shared model (``ClientRunner.run`` per plan)."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner

    def jobs(self, round_idx: int, plans: Sequence[ClientPlan], global_state: AdapterState, lr: float,
             progress: Any) -> Iterator[tuple[ClientPlan, Job]]:
        for plan in plans:
            yield plan, functools.partial(self.runner.run, round_idx, plan, global_state, lr,
                                          on_start=progress.start_client, on_step=progress.step)
