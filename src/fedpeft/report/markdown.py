"""The markdown report of one run: ``RUN_DIR/report/report.md`` with its PNG plots beside it.

:func:`write_report` is what the engine calls at the end of every run. It never raises: each section
is built on its own, a section that fails is replaced by a note and a warning is logged, and a run
with a partial or missing log still gets a report saying what is missing.
"""

from __future__ import annotations

import logging
import math
import statistics
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedpeft.attacks.report import privacy_report_section
from fedpeft.report.dp_section import privacy_section
from fedpeft.report.metrics_io import RunLog, load_run, metrics_path
from fedpeft.report.noise import noise_warnings
from fedpeft.report.plots import choose_metrics, format_bytes, lower_is_better, plot_run
from fedpeft.strategies import STRATEGIES, normalize_method_name

log = logging.getLogger(__name__)

REPORT_DIR = "report"
REPORT_FILE = "report.md"


# --- formatting helpers -----------------------------------------------------------------------------
def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: numbers to ``digits`` significant digits, integers exact, None as 'n/a'."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:.{digits}g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 120:
        return f"{value:.0f} s ({value / 60:.1f} min)"
    return f"{value:.3g} s"


def fmt_exact_bytes(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{int(value):,} bytes ({format_bytes(value)})"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell if isinstance(cell, str) else fmt(cell) for cell in row) + " |")
    return lines


def _get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# --- sections ---------------------------------------------------------------------------------------
def _status(run: RunLog) -> list[str]:
    if not run.events:
        return [f"> **No events**: `{metrics_path(run.run_dir)}` is missing or empty; nothing to report yet.", ""]
    if run.complete:
        return [f"Status: **complete**, {run.completed_rounds} round(s).", ""]
    last = max(run.round_end, default=0)
    return [f"> **Partial log**: no `run_end` event; the last completed round is {last}. "
            "The numbers below cover what was logged.", ""]


def _setup(run: RunLog) -> list[str]:
    start, cfg = run.run_start, run.config
    rows = [
        ("method", run.method),
        ("model", start.get("model_source") or _get(cfg, "model.name")),
        ("device / precision", " / ".join(str(v) for v in (start.get("device"), _get(cfg, "model.dtype"),
                                                           _get(cfg, "training.precision"), _get(cfg, "model.quantization"))
                                          if v is not None) or None),
        ("PEFT", _peft_text(cfg)),
        ("registered clients", start.get("num_clients") or _get(cfg, "federation.num_clients")),
        ("clients per round", _get(cfg, "federation.clients_per_round")),
        ("rounds (configured)", _get(cfg, "federation.rounds")),
        ("local steps per round", _get(cfg, "federation.local_steps")),
        ("batch size", _get(cfg, "federation.batch_size")),
        ("seed", run.seed),
        ("trainable parameters", start.get("trainable_params")),
        ("adapter size", fmt_exact_bytes(start.get("adapter_bytes")) if start.get("adapter_bytes") is not None else None),
        ("base model load time", fmt_seconds(start.get("model_load_seconds")) if start.get("model_load_seconds") is not None else None),
        ("resumed from round", start.get("resumed_from_round") or None),
    ]
    rows = [(k, v) for k, v in rows if v is not None]
    return ["## Setup", "", *table(["", "value"], rows), ""] if rows else []


def _peft_text(cfg: dict[str, Any]) -> str | None:
    peft = cfg.get("peft")
    if not isinstance(peft, dict):
        return None
    modules = peft.get("target_modules")
    modules = ",".join(modules) if isinstance(modules, list) else modules
    return f"{peft.get('type', 'lora')} r={peft.get('r')} alpha={peft.get('alpha')} on {modules}"


def _best(values: dict[int, float], metric: str) -> tuple[int, float]:
    pick = min if lower_is_better(metric) else max
    r = pick(values, key=lambda k: values[k])
    return r, values[r]


def _final_metrics(run: RunLog) -> list[str]:
    evals, final = run.evals, run.final_metrics()
    names = choose_metrics(list(final) + [n for n in run.metric_names() if n not in final], limit=10_000)
    if not names:
        return ["## Final metrics", "", "No evaluation was logged.", ""]
    last_round = max(evals, default=None)
    rows = []
    for name in names:
        series = {r: m[name] for r, m in evals.items() if name in m}
        base = series.get(0)
        value = final.get(name, series.get(last_round) if last_round is not None else None)
        change = (value - base) if (value is not None and base is not None) else None
        best = _best(series, name) if series else None
        rows.append([name, fmt(base), fmt(value), ("+" if change and change > 0 else "") + fmt(change) if change is not None else "n/a",
                     f"{fmt(best[1])} (round {best[0]})" if best else "n/a"])
    word = "final" if run.complete else "last evaluated"
    first, last = _global_eval(run, 0), _global_eval(run, last_round)
    n0 = f", n={first['examples']}" if first and first.get("examples") else ""  # records each column scored
    n1 = f", n={last['examples']}" if last and last.get("examples") else ""
    final_label = f"{word} (round {last_round}{n1})" if last_round is not None else word
    base_label = f"base (round 0{n0})"
    warnings = noise_warnings(first, last)
    skipped = [f"- not evaluated: {e.get('split', 'global')} (round {e.get('round')}): {e['skipped']}"
               for e in run.of("eval") if e.get("skipped")]
    return ["## Final metrics", "", *table(["metric", base_label, final_label, "change", "best"], rows), "",
            *(line for warning in warnings for line in (warning, "")), *([*skipped, ""] if skipped else [])]


PERSONAL_SPLITS = {"personal": "each client's own adapter", "finetuned": "local fine-tuning of the global adapter"}


def _personalised(run: RunLog) -> list[str]:
    """Per-client scores (personalised methods' own adapters, local fine-tuning after federation) as
    mean ± std over clients, next to the global model's score on the same metric."""
    events = [e for e in run.of("eval") if str(e.get("split")) in PERSONAL_SPLITS and e.get("metrics")]
    if not events:
        return []
    last = {}
    for e in events:
        last[str(e["split"])] = e  # the last one of each split
    headline = next((e.get("headline") for e in last.values() if e.get("headline")), None)
    rows = []
    round_idx = max(int(e.get("round", 0)) for e in last.values())
    global_eval = _global_eval(run, round_idx)
    if headline and global_eval and headline in (global_eval.get("metrics") or {}):
        rows.append([f"global model (round {round_idx})", fmt(global_eval["metrics"][headline]), "all evaluation records"])
    for split, what in PERSONAL_SPLITS.items():
        e = last.get(split)
        if e is None:
            continue
        m = e["metrics"]
        steps = f", {e['steps']} steps" if e.get("steps") else ""
        rows.append([f"{split}: {what}{steps}",
                     f"{fmt(m.get(f'{split}/mean'))} ± {fmt(m.get(f'{split}/std'))} "
                     f"(min {fmt(m.get(f'{split}/min'))}, max {fmt(m.get(f'{split}/max'))})",
                     f"{e.get('examples')} of {e.get('clients_total')} clients, each on the records of its labels"])
    return ["## Personalised evaluation", "", *table(["model", headline or "score", "scored on"], rows), "",
            "± is the standard deviation over clients.", ""]


def _global_eval(run: RunLog, round_idx: int | None) -> dict[str, Any] | None:
    """The global-model ``eval`` event of a round (None when that round has none)."""
    if round_idx is None:
        return None
    return next((e for e in run.eval_events().get(round_idx, []) if str(e.get("split", "global")) == "global"), None)


def _costs(run: RunLog) -> list[str]:
    wall = run.wall_seconds()
    train = run.train_seconds()
    rounds = max(run.round_end, default=0) or len(run.round_bytes("uplink"))
    uplink, downlink = run.total_bytes("uplink"), run.total_bytes("downlink")
    tokens = run.total_tokens()
    flops = run.flops()
    rss = run.peak_rss_mb()
    rows = [
        ("uplink, total", fmt_exact_bytes(uplink)),
        ("downlink, total", fmt_exact_bytes(downlink)),
        ("uplink per round (mean)", format_bytes(uplink / rounds) if rounds else "n/a"),
        ("wall time" if run.complete else "wall time (first to last event; partial log)", fmt_seconds(wall)),
        ("local training compute (sum of client_train.seconds)", fmt_seconds(train) if train else "n/a"),
        ("wall time / local training compute", f"{wall / train:.3f}" if wall and train else "n/a"),
        ("training tokens", fmt(tokens) if tokens else "n/a"),
        ("training FLOPs (estimate, see fedpeft.metering.flops)", f"{flops:.3e}" if flops else "n/a (base_params not logged)"),
        ("peak RSS", f"{rss:,.0f} MiB" if rss is not None else "n/a"),
    ]
    cuda = run.peak_cuda_mb()
    if cuda is not None:
        rows.append(("peak CUDA memory (allocated, whole run)", f"{cuda:,.0f} MiB"))
    jobs = [e["peak_cuda_mb"] for e in run.client_train if isinstance(e.get("peak_cuda_mb"), (int, float))]
    if jobs:
        rows.append(("peak CUDA memory per client job (max / median)",
                     f"{max(jobs):,.0f} / {sorted(jobs)[len(jobs) // 2]:,.0f} MiB"))
    raw = sum(e.get("uplink_bytes_raw") or 0 for e in run.client_train if isinstance(e.get("uplink_bytes_raw"), (int, float)))
    sent = sum(e.get("uplink_bytes") or 0 for e in run.client_train if isinstance(e.get("uplink_bytes_raw"), (int, float)))
    if raw and sent:
        scheme = run.run_start.get("compression") or "on"
        rows.append(("uplink compression", f"{scheme}: {fmt_exact_bytes(sent)} sent for {fmt_exact_bytes(raw)} "
                     f"uncompressed ({raw / sent:.2f}x smaller)"))
    failed = len(run.client_failed)
    if failed:
        rows.append(("failed local jobs", str(failed)))
    lines = ["## Costs", "", *table(["", "value"], rows), "",
             "Bytes are exact (dtype size x elements of every tensor that crossed); 1 MB = 10^6 bytes.", ""]
    breakdown = run.time_breakdown()
    if breakdown and wall:
        lines += ["Where the wall time went:", "", *table(["part", "seconds", "share"], [
            [name, f"{seconds:.3g}", f"{100 * seconds / wall:.1f} %"] for name, seconds in breakdown.items()]), ""]
    return lines


def _per_round(run: RunLog) -> list[str]:
    evals = run.evals
    metrics = choose_metrics(run.metric_names(), limit=4)
    mean_loss = run.mean_loss()
    up, down = run.round_bytes("uplink"), run.round_bytes("downlink")
    cum = run.cumulative_bytes("uplink")
    round_end = run.round_end
    jobs: dict[int, int] = {}
    for e in run.client_train:
        if isinstance(e.get("round"), int):
            jobs[e["round"]] = jobs.get(e["round"], 0) + 1
    failed: dict[int, int] = {}
    for e in run.client_failed:
        if isinstance(e.get("round"), int):
            failed[e["round"]] = failed.get(e["round"], 0) + 1
    rows = []
    for r in run.rounds:
        seconds = round_end.get(r, {}).get("seconds")
        rows.append([
            str(r), fmt(mean_loss.get(r)), f"{jobs.get(r, 0)}" + (f" ({failed[r]} failed)" if r in failed else ""),
            format_bytes(up.get(r)) if r in up else "n/a", format_bytes(down.get(r)) if r in down else "n/a",
            format_bytes(cum.get(r)) if r in cum else "n/a", fmt_seconds(seconds) if isinstance(seconds, (int, float)) else "n/a",
            *[fmt(evals.get(r, {}).get(m)) if m in evals.get(r, {}) else "" for m in metrics],
        ])
    if not rows:
        return []
    header = ["round", "mean train loss", "jobs", "uplink", "downlink", "cum. uplink", "time", *metrics]
    return ["## Per round", "", *table(header, rows), ""]


def _partition(run: RunLog) -> list[str]:
    events = run.of("partition")
    clients = events[-1].get("clients") if events else None
    if not isinstance(clients, list) or not clients:
        return []
    sizes = [c.get("examples") for c in clients if isinstance(c, dict) and isinstance(c.get("examples"), (int, float))]
    if not sizes:
        return []
    return ["## Data partition", "",
            f"{len(clients)} clients; examples per client: min {min(sizes):,}, median {statistics.median(sizes):,.0f}, "
            f"max {max(sizes):,}, total {sum(sizes):,}.", ""]


def _failures(run: RunLog) -> list[str]:
    failed = run.client_failed
    if not failed:
        return []
    lines = ["## Failed local jobs", ""]
    for e in failed[:20]:
        lines.append(f"- round {e.get('round')}, client {e.get('client')}, job {e.get('job', 'default')}: {fmt(e.get('error'))}")
    if len(failed) > 20:
        lines.append(f"- ... and {len(failed) - 20} more")
    return [*lines, ""]


PLOT_TITLES = {
    "training_loss": "Training loss per client and mean",
    "eval_metrics": "Evaluation metrics per round",
    "uplink_vs_metric": "Metric vs cumulative uplink",
    "phase_times": "Time per phase",
}


def _section(name: str, build: Callable[[], list[str]]) -> list[str]:
    try:
        return build()
    except Exception as exc:  # a broken section must not cost the rest of the report
        log.warning("report section '%s' failed: %s", name, exc)
        log.debug("%s", traceback.format_exc())
        return [f"## {name}", "", f"(could not be built: {type(exc).__name__}: {exc})", ""]


def _method_section(run: RunLog, out_dir: Path) -> list[str]:
    """The run's method's own section, when it registered one (``report_section``; FL-TAC's clusters)."""
    name = run.method
    if not name or normalize_method_name(str(name)) not in STRATEGIES:
        return []
    hook = STRATEGIES[normalize_method_name(str(name))].report_section
    return hook(run.run_dir, out_dir) if hook is not None else []


def render_report(run: RunLog, out_dir: Path) -> str:
    """The markdown text; writes the plots into ``out_dir`` on the way."""
    lines = [f"# Run report: {run.name}", ""]
    if str(_get(run.config, "model.name") or "").startswith("random:"):
        lines += ["**Random weights (`model.name: random:<shape>`): the numbers below measure throughput and "
                  "memory only, never quality.**", ""]
    lines += _section("Status", lambda: _status(run))
    lines += _section("Final metrics", lambda: _final_metrics(run))
    lines += _section("Personalised evaluation", lambda: _personalised(run))
    lines += _section("Costs", lambda: _costs(run))
    lines += _section("Setup", lambda: _setup(run))

    def plots() -> list[str]:
        written = plot_run(run, out_dir)
        if not written:
            return []
        out = ["## Plots", ""]
        for name, path in written.items():
            out += [f"### {PLOT_TITLES.get(name, name)}", "", f"![{PLOT_TITLES.get(name, name)}]({path.name})", ""]
        return out

    lines += _section("Plots", plots)
    lines += _section(f"Method: {run.method}", lambda: _method_section(run, out_dir))
    lines += _section("Differential privacy", lambda: privacy_section(run, out_dir))
    lines += _section("Privacy", lambda: privacy_report_section(run.run_dir))
    lines += _section("Per round", lambda: _per_round(run))
    lines += _section("Data partition", lambda: _partition(run))
    lines += _section("Failed local jobs", lambda: _failures(run))
    return "\n".join(lines).rstrip() + "\n"


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``RUN_DIR/report/report.md`` (and PNGs) from ``RUN_DIR/metrics.jsonl``; return its path.

    Never raises: problems are logged as warnings and, at worst, the report says what went wrong.
    """
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / REPORT_DIR
    path = out / REPORT_FILE
    try:
        out.mkdir(parents=True, exist_ok=True)
        run = load_run(run_dir)
        text = render_report(run, out)
    except Exception as exc:  # noqa: BLE001 - the engine's run must not fail on its report
        log.warning("report of %s failed: %s", run_dir, exc)
        text = f"# Run report: {run_dir.name}\n\nThe report could not be built: {type(exc).__name__}: {exc}\n"
    try:
        tmp = path.with_suffix(".md.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except Exception as exc:  # noqa: BLE001
        log.warning("cannot write %s: %s", path, exc)
    return path
