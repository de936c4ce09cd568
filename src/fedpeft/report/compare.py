"""Several runs in one table and one set of plots (metric vs round, metric vs cumulative uplink).

Runs whose resolved configs differ only in ``seed`` (and in output settings) form one group; a group
is shown as mean ± std over its seeds (sample standard deviation), as FederatedScope-LLM reports
repeated seeds. A group is labelled by the config keys that tell the groups apart.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.report.markdown import fmt, fmt_seconds, table
from fedpeft.report.metrics_io import RunLog, load_run, mean_std
from fedpeft.report.plots import byte_scale, choose_metrics, format_bytes, plot_series, primary_metric

log = logging.getLogger(__name__)

IGNORED_KEYS = ("seed", "output", "model.threads", "evaluation.batch_size")
"""Config keys that do not make two runs different experiments."""
COMPARE_FILE = "compare.md"


@dataclass
class RunGroup:
    label: str
    runs: list[RunLog]


def _flat(config: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(config, dict):
        for key, value in config.items():
            out.update(_flat(value, f"{prefix}{key}."))
    else:
        out[prefix[:-1]] = json.dumps(config, sort_keys=True) if isinstance(config, (list, dict)) else config
    return out


def _experiment_key(run: RunLog) -> dict[str, Any]:
    flat = _flat(run.config)
    return {k: v for k, v in flat.items() if not any(k == i or k.startswith(i + ".") for i in IGNORED_KEYS)}


def _short_key(key: str) -> str:
    """``method.name`` -> ``method``; ``federation.clients_per_round`` stays as is."""
    return key[: -len(".name")] if key.endswith(".name") else key


def group_runs(runs: Sequence[RunLog]) -> list[RunGroup]:
    """Group runs that differ only by seed; label each group by the keys that differ across groups."""
    groups: list[tuple[dict[str, Any], list[RunLog]]] = []
    for run in runs:
        key = _experiment_key(run)
        for existing_key, members in groups:
            if key and existing_key == key:
                members.append(run)
                break
        else:
            groups.append((key, [run]))
    all_keys = sorted({k for key, _ in groups for k in key})
    differing = [k for k in all_keys if len({json.dumps(key.get(k), sort_keys=True, default=str) for key, _ in groups}) > 1]
    # the most telling keys first: method, then model/peft, then the rest
    order = ("method.", "model.", "peft.", "federation.", "data.", "training.")
    differing.sort(key=lambda k: next((i for i, p in enumerate(order) if k.startswith(p)), len(order)))
    out: list[RunGroup] = []
    used: set[str] = set()
    for key, members in groups:
        parts = [f"{_short_key(k)}={key.get(k)}" for k in differing[:3]]
        label = ", ".join(parts) if parts else (members[0].method if len(groups) == 1 else members[0].name)
        if not key:
            label = members[0].name
        if label in used:
            label = f"{label} [{members[0].name}]"
        used.add(label)
        out.append(RunGroup(label=label, runs=members))
    return out


def _pm(values: list[float], fmt_one=fmt, show_zero_std: bool = True) -> str:
    """``mean ± std`` over seeds; a single run shows its value (costs equal across seeds show one value)."""
    if not values:
        return "n/a"
    mean, std = mean_std(values)
    if len(values) == 1 or (std == 0 and not show_zero_std):
        return fmt_one(mean)
    return f"{fmt_one(mean)} ± {fmt_one(std)}"


def _round_series(group: RunGroup, metric: str, x: str) -> list[tuple[float, float, float]]:
    """[(x, mean, std)] over the group's runs at each evaluated round (x: 'round' or 'uplink')."""
    rounds = sorted({r for run in group.runs for r, m in run.evals.items() if metric in m})
    points = []
    for r in rounds:
        ys = [run.evals[r][metric] for run in group.runs if metric in run.evals.get(r, {})]
        if x == "round":
            xs = [float(r)]
        else:
            xs = [run.cumulative_bytes("uplink").get(r) for run in group.runs if metric in run.evals.get(r, {})]
            xs = [v for v in xs if v is not None]
            if not xs:
                continue
        mean, std = mean_std(ys)
        points.append((sum(xs) / len(xs), mean, std))
    return points


def _legend(group: RunGroup) -> str:
    n = len(group.runs)
    return group.label if n == 1 else f"{group.label} (mean ± std, {n} seeds)"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "metric"


def compare_runs(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None) -> Path:
    """Write ``compare.md`` and plots for ``run_dirs`` into ``out_dir``; return the markdown path."""
    runs = [load_run(d) for d in run_dirs]
    if out_dir is None:
        parents = [str(Path(d).resolve().parent) for d in run_dirs]
        out_dir = Path(os.path.commonpath(parents)) / "compare" if parents else Path("compare")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)

    names: list[str] = []
    for run in runs:
        for name in list(run.final_metrics()) + run.metric_names():
            if name not in names:
                names.append(name)
    metrics = choose_metrics(names, limit=6)
    lines = ["# Run comparison", ""]
    lines += [f"{len(runs)} run(s) in {len(groups)} group(s). Groups with several seeds show mean ± std "
              "(sample standard deviation over seeds).", ""]

    header = ["group", "runs", "method", "rounds", *[f"final {m}" for m in metrics],
              "uplink total", "wall time", "peak RSS (MiB)"]
    rows = []
    for group in groups:
        finals = {m: [r.final_metrics()[m] for r in group.runs if m in r.final_metrics()] for m in metrics}
        walls = [w for w in (r.wall_seconds() for r in group.runs) if w is not None]
        rss = [v for v in (r.peak_rss_mb() for r in group.runs) if v is not None]
        seeds = [str(r.seed) for r in group.runs if r.seed is not None]
        rows.append([
            group.label,
            f"{len(group.runs)}" + (f" (seeds {', '.join(seeds)})" if len(group.runs) > 1 and seeds else ""),
            ", ".join(sorted({r.method for r in group.runs})),
            _pm([float(r.completed_rounds) for r in group.runs], show_zero_std=False),
            *[_pm(finals[m]) for m in metrics],
            _pm([r.total_bytes("uplink") for r in group.runs], format_bytes, show_zero_std=False),
            _pm(walls, fmt_seconds, show_zero_std=False),
            _pm(rss, lambda v: f"{v:,.0f}", show_zero_std=False),
        ])
    lines += ["## Summary", "", *table(header, rows), ""]

    lines += ["## Plots", ""]
    plotted = choose_metrics([n for n in names if "/" not in n], limit=4) or ([primary_metric(names)] if names else [])
    for metric in plotted:
        if metric is None:
            continue
        by_round = {_legend(g): _round_series(g, metric, "round") for g in groups}
        path = plot_series(by_round, out / f"{_safe(metric)}_vs_round.png", "round", metric, f"{metric} per round")
        if path:
            lines += [f"### {metric} vs round", "", f"![{metric} vs round]({path.name})", ""]
        by_uplink = {_legend(g): _round_series(g, metric, "uplink") for g in groups}
        top = max((p[0] for pts in by_uplink.values() for p in pts), default=0.0)
        divisor, unit = byte_scale(top)
        scaled = {k: [(x / divisor, m, s) for x, m, s in v] for k, v in by_uplink.items()}
        path = plot_series(scaled, out / f"{_safe(metric)}_vs_uplink.png", f"cumulative uplink ({unit})", metric,
                           f"{metric} vs communication")
        if path:
            lines += [f"### {metric} vs cumulative uplink", "", f"![{metric} vs uplink]({path.name})", ""]

    lines += ["## Runs", "", *table(["group", "run", "seed", "status"], [
        [g.label, str(r.run_dir), fmt(r.seed), "complete" if r.complete else ("empty" if not r.events else "partial")]
        for g in groups for r in g.runs
    ]), ""]
    path = out / COMPARE_FILE
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path
