"""The report's "Differential privacy" section: the privacy spent per round (the ``privacy`` events of
``metrics.jsonl``), epsilon against the round and the headline metric against epsilon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedpeft.report.metrics_io import RunLog
from fedpeft.report.plots import Figure, _save, primary_metric


def _headline_epsilon(event: dict[str, Any]) -> float | None:
    """Client-level epsilon when the run has it, else the largest client's DP-SGD epsilon."""
    value = event.get("epsilon", event.get("dp_sgd_epsilon_max"))
    return float(value) if value is not None else None


def plot_epsilon(run: RunLog, path: Path) -> Path | None:
    """Two panels: epsilon against the round; the primary metric against the epsilon spent to reach it."""
    events = {e["round"]: e for e in run.of("privacy") if "round" in e}
    eps = {r: _headline_epsilon(e) for r, e in sorted(events.items()) if _headline_epsilon(e) is not None}
    if not eps:
        return None
    metric = primary_metric(run.metric_names())
    evals = run.evals
    points = [(eps[r], evals[r][metric], r) for r in sorted(evals) if metric and r in eps and metric in evals[r]]
    if 0 in evals and metric in evals[0]:
        points.insert(0, (0.0, evals[0][metric], 0))  # the model before training spends nothing
    fig = Figure(figsize=(9, 3.4))
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(list(eps), list(eps.values()), marker="o", color="#8172B2")
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon")
    ax.grid(alpha=0.3)
    ax = fig.add_subplot(1, 2, 2)
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color="#C44E52")
        for x, y, r in points:
            ax.annotate(f"r{r}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_xlabel("epsilon spent")
        ax.set_ylabel(metric)
    else:
        ax.text(0.5, 0.5, "no evaluation at a round with privacy accounting", ha="center", va="center", fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(f"Privacy spent: {run.name}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def privacy_section(run: RunLog, out_dir: Path) -> list[str]:
    events = [e for e in run.of("privacy") if "round" in e]
    if not events:
        return []
    privacy = (run.config or {}).get("privacy", {})
    last = events[-1]
    lines = ["## Differential privacy", ""]
    mode = privacy.get("mode", last.get("mode", "none"))
    if mode != "none":
        lines.append(f"Client-level DP-FedAvg, mode **{mode}**: clip norm C = {privacy.get('clip_norm')} "
                     f"(adaptive: {privacy.get('adaptive_clipping', {}).get('enabled', False)}), noise multiplier "
                     f"z = {last.get('noise_multiplier'):.4g}, sampling rate q = {last.get('sample_rate'):.4g} "
                     f"(accounted as Poisson sampling; the engine samples a fixed number without replacement), "
                     f"delta = {last.get('delta')}: **epsilon = {last.get('epsilon'):.4g}** after round {last['round']}.")
    if "dp_sgd_epsilon_max" in last:
        lines.append(f"Record-level DP-SGD (Opacus): noise multiplier {last['dp_sgd_noise_multiplier']}, per-example "
                     f"clip {privacy.get('dp_sgd', {}).get('max_grad_norm')}; per client epsilon at delta "
                     f"{last['dp_sgd_delta']}: max **{last['dp_sgd_epsilon_max']:.4g}**, mean "
                     f"{last['dp_sgd_epsilon_mean']:.4g} over {last['dp_sgd_clients']} clients.")
    for stop in run.of("privacy_budget_stop"):
        lines.append(f"Stopped by the budget: {stop.get('reason')}")
    lines.append("")
    path = plot_epsilon(run, out_dir / "privacy.png")
    if path is not None:
        lines += [f"![privacy spent]({path.name})", ""]
    header = ["round", "epsilon", "clip norm", "DP-SGD epsilon (max)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in events:
        eps = e.get("epsilon")
        sgd = e.get("dp_sgd_epsilon_max")
        lines.append(f"| {e['round']} | {'' if eps is None else f'{eps:.4g}'} | {e.get('clip_norm', '')} | "
                     f"{'' if sgd is None else f'{sgd:.4g}'} |")
    return lines + [""]
