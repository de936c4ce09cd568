"""The sweep's results: one row per trial (per rung for successive halving) with both the validation loss
and the task metric, their rank correlation (Spearman), the best trial, a CSV, a Markdown table and a plot."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from scipy.stats import spearmanr

from fedpeft.federation.durable import replace_durable


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def rank_correlation(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rho over the pairs where both are finite; None with fewer than 3 pairs or a constant side."""
    pairs = [(x, y) for x, y in zip(xs, ys) if finite(x) and finite(y)]
    if len(pairs) < 3 or len({p[0] for p in pairs}) < 2 or len({p[1] for p in pairs}) < 2:
        return None
    rho = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic
    return float(rho) if math.isfinite(rho) else None


def best_row(rows: list[dict], key: str, lower_is_better: bool) -> dict | None:
    """The row with the best ``key`` among the largest budget's rows (halving: the last rung), ties to the
    first listed."""
    done = [r for r in rows if finite(r.get(key))]
    if not done:
        return None
    top = max(r["rounds"] for r in done)
    done = [r for r in done if r["rounds"] == top]
    return min(done, key=lambda r: r[key] if lower_is_better else -r[key])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if finite(value) else "n/a"
    return "" if value is None else str(value)


def table_columns(keys: list[str]) -> list[str]:
    return ["trial", *keys, "rounds", "val_loss", "metric", "seconds", "status", "run_dir"]


def write_results(rows: list[dict], keys: list[str], metric_name: str, out_dir: Path, select_by: str,
                  metric_lower_is_better: bool, title: str) -> dict[str, Any]:
    """results.csv, results.md and sweep.png in ``out_dir``; returns the summary (correlation, best)."""
    columns = table_columns(keys)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([c if c != "metric" else metric_name for c in columns])
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    replace_durable(out_dir / "results.csv", buffer.getvalue().encode())

    first = min((r["rounds"] for r in rows), default=0)
    screen = [r for r in rows if r["rounds"] == first]  # one budget: halving's first rung, every trial
    rho = rank_correlation([r.get("val_loss") for r in screen], [r.get("metric") for r in screen])
    sel_key = "metric" if select_by == "metric" else "val_loss"
    best = best_row(rows, sel_key, metric_lower_is_better if sel_key == "metric" else True)
    lines = [f"# {title}", "", "| " + " | ".join(c if c != "metric" else metric_name for c in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    lines += ["", f"Spearman rank correlation of validation loss and {metric_name} over the {len(screen)} trials "
              f"at {first} round(s): " + ("n/a (fewer than 3 trials with both, or one side constant)" if rho is None
                                          else f"{rho:+.3f}")
              + (" (negative: the two agree, lower loss with higher metric)" if rho is not None
                 and not metric_lower_is_better else ""),
              "", f"Best by {'the task metric' if sel_key == 'metric' else 'validation loss'}: "
              + (f"{best['trial']} ({', '.join(f'{k}={best[k]}' for k in keys)})" if best else "none finished")]
    replace_durable(out_dir / "results.md", ("\n".join(lines) + "\n").encode())
    plot = plot_results(rows, metric_name, out_dir / "sweep.png", select_by=sel_key)
    return {"spearman": rho, "best": best, "plot": plot}


def plot_results(rows: list[dict], metric_name: str, path: Path, select_by: str = "metric") -> Path | None:
    """Left: validation loss against the task metric, one labelled point per trial (first budget).
    Right (several budgets): each trial's ranking quantity (``select_by``) against its rounds."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    points = [r for r in rows if finite(r.get("val_loss")) and finite(r.get("metric"))]
    if not points:
        return None
    budgets = sorted({r["rounds"] for r in points})
    fig, axes = plt.subplots(1, 2 if len(budgets) > 1 else 1, figsize=(11 if len(budgets) > 1 else 6, 4.5), squeeze=False)
    ax = axes[0][0]
    first = [r for r in points if r["rounds"] == budgets[0]]
    ax.scatter([r["val_loss"] for r in first], [r["metric"] for r in first])
    for r in first:
        ax.annotate(r["trial"].split("-")[0], (r["val_loss"], r["metric"]), fontsize=8, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("validation loss")
    ax.set_ylabel(metric_name)
    ax.set_title(f"trials at {budgets[0]} round(s)")
    if len(budgets) > 1:
        ax2 = axes[0][1]
        by_trial: dict[str, list[dict]] = {}
        for r in points:
            by_trial.setdefault(r["trial"].split("-")[0], []).append(r)
        for name, series in sorted(by_trial.items()):
            series.sort(key=lambda r: r["rounds"])
            ax2.plot([r["rounds"] for r in series], [r[select_by] for r in series], marker="o", label=name)
        ax2.set_xlabel("rounds (rung budget)")
        ax2.set_ylabel(metric_name if select_by == "metric" else "validation loss")
        ax2.set_title("successive halving")
        ax2.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
