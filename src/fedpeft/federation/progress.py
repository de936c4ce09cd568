"""A rich progress display for a run: rounds, clients, local steps, loss, ETA. Silent when disabled
or when stderr is not a terminal (logs and metrics.jsonl carry the same information)."""

from __future__ import annotations

import sys

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RunProgress:
    def __init__(self, enabled: bool, rounds: int, start_round: int = 1) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.rounds = rounds
        self.first_round = start_round
        self.loss: float | None = None
        self.metric: float | None = None
        if self.enabled:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
            )

    def __enter__(self) -> "RunProgress":
        if self.enabled:
            self._progress.start()
            self._rounds = self._progress.add_task("rounds", total=self.rounds, completed=self.first_round - 1, info="")
            self._clients = self._progress.add_task("clients", total=1, info="")
            self._steps = self._progress.add_task("steps", total=1, info="")
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._progress.stop()

    def start_round(self, round_idx: int, num_jobs: int) -> None:
        if self.enabled:
            self._progress.update(self._rounds, description=f"round {round_idx}/{self.rounds}")
            self._progress.reset(self._clients, total=num_jobs, info="")

    def start_client(self, client_id: int, steps: int) -> None:
        if self.enabled:
            self._progress.update(self._clients, description=f"client {client_id}")
            self._progress.reset(self._steps, total=steps, info="")

    def step(self, step: int, loss: float) -> None:
        if self.enabled:
            self._progress.update(self._steps, completed=step, info=f"loss {loss:.3f}")

    def end_client(self, mean_loss: float | None) -> None:
        if self.enabled:
            self.loss = mean_loss if mean_loss is not None else self.loss
            self._progress.advance(self._clients)
            self._progress.update(self._clients, info=f"mean loss {self.loss:.3f}" if self.loss is not None else "")

    def set_metric(self, name: str, value: float | None) -> None:
        self.metric_name, self.metric = name, value

    def end_round(self) -> None:
        if self.enabled:
            info = f"{self.metric_name} {self.metric:.3f}" if self.metric is not None else ""
            self._progress.update(self._rounds, advance=1, info=info)
