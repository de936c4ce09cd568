"""PNG plots of one run and of several runs, drawn with matplotlib's Agg canvas (no display, no pyplot).

Every function returns the written path, or None when the log holds nothing to plot (it never raises
for missing data). Bytes use decimal units (1 MB = 10^6 bytes), seconds are wall-clock seconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=False)
from matplotlib.figure import Figure  # noqa: E402

from fedpeft.report.metrics_io import PHASES, RunLog  # noqa: E402

MAX_CLIENT_LINES = 12
"""Above this many clients the per-client losses are drawn as faint points without a legend entry each."""
MAX_METRIC_PANELS = 9
PHASE_COLORS = {"train": "#4C72B0", "aggregate": "#DD8452", "evaluate": "#55A868", "checkpoint": "#C44E52", "other": "#8C8C8C"}
LOWER_IS_BETTER = ("loss", "perplexity", "ppl", "error", "wer")


def lower_is_better(metric: str) -> bool:
    leaf = metric.rsplit("/", 1)[-1].lower()
    return any(word in leaf for word in LOWER_IS_BETTER)


def byte_scale(max_bytes: float) -> tuple[float, str]:
    """(divisor, unit) so that ``max_bytes / divisor`` reads well; decimal units."""
    for divisor, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if max_bytes >= divisor:
            return divisor, unit
    return 1.0, "bytes"


def format_bytes(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    divisor, unit = byte_scale(abs(value))
    return f"{value / divisor:.3g} {unit}" if unit != "bytes" else f"{int(value)} bytes"


def choose_metrics(names: Sequence[str], limit: int = MAX_METRIC_PANELS) -> list[str]:
    """Up to ``limit`` metrics, overall ones (no ``/``) first, in logged order."""
    overall = [n for n in names if "/" not in n]
    per_task = [n for n in names if "/" in n]
    return (overall + per_task)[:limit]


def primary_metric(names: Sequence[str]) -> str | None:
    """The metric a comparison is about: exact_match, accuracy, ... else the first overall one."""
    for preferred in ("exact_match", "accuracy", "acc", "f1", "score", "rouge_l", "loss", "eval_loss"):
        if preferred in names:
            return preferred
    chosen = choose_metrics(names, limit=1)
    return chosen[0] if chosen else None


def _grid(count: int) -> tuple[int, int]:
    cols = 2 if count == 4 else min(3, count)
    return math.ceil(count / cols), cols


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _unit_interval(ax, name: str, values: Sequence[float]) -> None:
    """Scores in [0, 1] (accuracy, exact match) keep 0 in view, so flat or tiny curves are not magnified."""
    if values and not lower_is_better(name) and min(values) >= 0 and max(values) <= 1:
        ax.set_ylim(-0.03, min(1.03, max(0.1, max(values) * 1.1 + 0.02)))


def _integer_rounds(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# --- one run -----------------------------------------------------------------------------------------
def plot_training_loss(run: RunLog, path: Path) -> Path | None:
    """Mean local training loss of each client per round, and the mean over the round's jobs."""
    per_client = run.client_losses()
    mean = run.mean_loss()
    if not mean:
        return None
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    many = len(per_client) > MAX_CLIENT_LINES
    for i, (client, series) in enumerate(sorted(per_client.items(), key=lambda kv: str(kv[0]))):
        xs, ys = list(series), list(series.values())
        if many:
            ax.scatter(xs, ys, s=8, color="#9AA5B1", alpha=0.5, label=f"clients ({len(per_client)})" if i == 0 else None)
        else:
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1, alpha=0.6, label=f"client {client}")
    ax.plot(list(mean), list(mean.values()), color="black", linewidth=2.2, marker="s", markersize=4, label="mean over jobs")
    ax.set_xlabel("round")
    ax.set_ylabel("local training loss (mean over steps)")
    ax.set_title(f"Training loss per client: {run.name}")
    _integer_rounds(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if not many and len(per_client) > 6 else 1, loc="best")
    return _save(fig, path)


def plot_eval_metrics(run: RunLog, path: Path) -> Path | None:
    """One panel per evaluation metric (up to nine), value vs round (round 0 = base model)."""
    evals = run.evals
    names = choose_metrics(run.metric_names())
    if not evals or not names:
        return None
    rows, cols = _grid(len(names))
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        points = [(r, m[name]) for r, m in evals.items() if name in m]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color="#4C72B0")
        _unit_interval(ax, name, [p[1] for p in points])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel(name.rsplit("/", 1)[-1])
        _integer_rounds(ax)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Evaluation of the global adapter per round: {run.name}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_uplink_vs_metric(run: RunLog, path: Path) -> Path | None:
    """Each evaluation metric against the cumulative uplink bytes spent to reach it."""
    evals = run.evals
    names = choose_metrics(run.metric_names(), limit=4)
    cum = run.cumulative_bytes("uplink")
    points_by_metric = {n: [(cum[r], m[n], r) for r, m in evals.items() if n in m and r in cum] for n in names}
    points_by_metric = {n: p for n, p in points_by_metric.items() if p}
    if not points_by_metric:
        return None
    divisor, unit = byte_scale(max(max(x for x, _, _ in p) for p in points_by_metric.values()))
    rows, cols = _grid(len(points_by_metric))
    fig = Figure(figsize=(4.4 * cols, 3.3 * rows))
    for i, (name, points) in enumerate(points_by_metric.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.plot([x / divisor for x, _, _ in points], [y for _, y, _ in points], marker="o", color="#C44E52")
        for x, y, r in points:
            ax.annotate(f"r{r}", (x / divisor, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_xlabel(f"cumulative uplink ({unit})")
        ax.set_ylabel(name)
        ax.margins(x=0.08, y=0.12)
        _unit_interval(ax, name, [y for _, y, _ in points])
        ax.grid(alpha=0.3)
    fig.suptitle(f"Metric vs communication (uplink, all clients): {run.name}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_phase_times(run: RunLog, path: Path) -> Path | None:
    """Stacked bars: seconds per phase in each round."""
    phases = run.phase_seconds()
    if not phases:
        return None
    rounds = list(phases)
    def used(name: str) -> bool:  # a phase that never took time gets no legend entry
        return any(v.get(name, 0.0) > 0 for v in phases.values())

    names = [p for p in PHASES if used(p)]
    names += sorted(k for k in {k for v in phases.values() for k in v} - set(names) - {"other"} - set(PHASES) if used(k))
    if used("other"):
        names.append("other")
    fig = Figure(figsize=(max(6, 0.35 * len(rounds) + 3), 4))
    ax = fig.add_subplot()
    bottom = [0.0] * len(rounds)
    for name in names:
        heights = [phases[r].get(name, 0.0) for r in rounds]
        ax.bar(rounds, heights, bottom=bottom, label=name, color=PHASE_COLORS.get(name), width=0.7)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xlabel("round")
    ax.set_ylabel("wall time (s)")
    ax.set_title(f"Time per phase: {run.name}")
    _integer_rounds(ax)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def plot_run(run: RunLog, out_dir: Path) -> dict[str, Path]:
    """All plots of one run into ``out_dir``; name -> path for those that had data."""
    makers = {
        "training_loss": plot_training_loss,
        "eval_metrics": plot_eval_metrics,
        "uplink_vs_metric": plot_uplink_vs_metric,
        "phase_times": plot_phase_times,
    }
    written = {}
    for name, maker in makers.items():
        path = maker(run, out_dir / f"{name}.png")
        if path is not None:
            written[name] = path
    return written


# --- several runs -------------------------------------------------------------------------------------
Series = Mapping[str, Sequence[tuple[float, float, float]]]
"""label -> [(x, mean, std)]: one line per group of runs (std 0 for a single seed)."""


def plot_series(series: Series, path: Path, xlabel: str, ylabel: str, title: str) -> Path | None:
    """Lines of several groups, with a mean ± std band where a group has repeated seeds."""
    series = {label: points for label, points in series.items() if points}
    if not series:
        return None
    fig = Figure(figsize=(7, 4.3))
    ax = fig.add_subplot()
    for label, points in series.items():
        xs = [p[0] for p in points]
        means = [p[1] for p in points]
        stds = [p[2] for p in points]
        (line,) = ax.plot(xs, means, marker="o", markersize=3, label=label)
        if any(s > 0 for s in stds):
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=line.get_color(), alpha=0.18, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if xlabel == "round":
        _integer_rounds(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)
