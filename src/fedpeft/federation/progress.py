"""What a run shows while it works: a rich progress display (rounds, clients, local steps, loss, ETA)
when stderr is a terminal; otherwise (a log file, a batch job, CI) one plain log line per round with the
round, the mean client loss, the metric when the round evaluated, the seconds and the bytes sent.
Nothing when ``output.progress`` is off (metrics.jsonl carries the same information)."""

from __future__ import annotations

import logging
import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger(__name__)


def format_bytes(count: float | None) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units, as the report uses)."""
    if count is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"  # pragma: no cover - the loop returns


def round_line(round_idx: int, rounds: int, losses: list[float], metric_name: str | None, metric: float | None,
               seconds: float, uplink_bytes: float | None, downlink_bytes: float | None,
               epsilon: float | None = None) -> str:
    """The plain per-round line: ``round 2/6: mean loss 1.234 (2 clients), exact_match 0.520, 30.1 s,
    uplink 7.4 MB, downlink 7.4 MB``."""
    parts = [f"round {round_idx}/{rounds}:"]
    if losses:
        parts.append(f"mean loss {sum(losses) / len(losses):.3f} ({len(losses)} client{'s' if len(losses) != 1 else ''}),")
    else:
        parts.append("no client trained,")
    if metric is not None and metric_name:
        parts.append(f"{metric_name} {metric:.3f},")
    if epsilon is not None:  # differential privacy: the (epsilon, delta) spent so far
        parts.append(f"epsilon {epsilon:.3f},")
    parts.append(f"{seconds:.1f} s, uplink {format_bytes(uplink_bytes)}, downlink {format_bytes(downlink_bytes)}")
    return " ".join(parts)


class RunProgress:
    def __init__(self, enabled: bool, rounds: int, start_round: int = 1) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.plain = enabled and not self.enabled  # no terminal: a log line per round instead of bars
        self.rounds = rounds
        self.first_round = start_round
        self.loss: float | None = None
        self.metric: float | None = None
        self.metric_name: str | None = None
        self.epsilon: float | None = None
        self._round_idx = start_round
        self._round_losses: list[float] = []
        self._round_metric: float | None = None
        self._round_start = time.perf_counter()
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
        self._round_idx, self._round_losses, self._round_metric = round_idx, [], None
        self._round_start = time.perf_counter()
        if self.enabled:
            self._progress.update(self._rounds, description=f"round {round_idx}/{self.rounds}")
            self._progress.reset(self._clients, total=num_jobs, info="")

    def start_client(self, client_id: int, steps: int) -> None:
        if self.enabled:
            self._progress.update(self._clients, description=f"client {client_id}")
            self._progress.reset(self._steps, total=steps, info="")

    def step(self, step: int, loss) -> None:
        """``loss``: a float or a 0-d tensor; formatting a tensor reads it from the device, so it is only
        done when the display is shown (a terminal), never in logged or benchmarked runs."""
        if self.enabled:
            self._progress.update(self._steps, completed=step, info=f"loss {loss:.3f}")

    def end_client(self, mean_loss: float | None) -> None:
        if mean_loss is not None:
            self._round_losses.append(mean_loss)
        self.loss = mean_loss if mean_loss is not None else self.loss
        if self.enabled:
            self._progress.advance(self._clients)
            self._progress.update(self._clients, info=f"mean loss {self.loss:.3f}" if self.loss is not None else "")

    def set_metric(self, name: str, value: float | None) -> None:
        self.metric_name, self.metric = name, value
        self._round_metric = value

    def set_epsilon(self, value: float | None) -> None:
        """The privacy spent so far (privacy section), shown beside the metric."""
        self.epsilon = value

    def end_round(self, uplink_bytes: float | None = None, downlink_bytes: float | None = None) -> None:
        if self.enabled:
            info = f"{self.metric_name} {self.metric:.3f}" if self.metric is not None else ""
            if self.epsilon is not None:
                info = f"{info} epsilon {self.epsilon:.3f}".strip()
            self._progress.update(self._rounds, advance=1, info=info)
        elif self.plain:
            log.info(round_line(self._round_idx, self.rounds, self._round_losses, self.metric_name, self._round_metric,
                                time.perf_counter() - self._round_start, uplink_bytes, downlink_bytes,
                                epsilon=self.epsilon))
