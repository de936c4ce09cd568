"""``fedpeft data``: the first few training and evaluation records of a config as the run will see them
(after column mapping and the task's normalisation), the record counts and the label sets. Loads the
data only, never a model."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import typer

from fedpeft.commands.common import OVERRIDES, exit_on

# Fields shown first, in this order; the rest of a record follows alphabetically.
_FIRST = ("task", "instruction", "input", "output", "head_text", "reference")


def shorten(value: Any, limit: int = 160) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def record_lines(record: dict, index: int, head: str) -> list[str]:
    """``record`` as indented ``field: value`` lines; the text a classification head reads is
    ``head_text``, which a generating model does not use (and the reverse for ``instruction``)."""
    if head == "classification" and record.get("head_text"):
        skip = {"task_type", "instruction", "input"}  # the head reads head_text only
    else:
        skip = {"task_type", "head_text"}
    keys = [k for k in _FIRST if k in record and k not in skip]
    keys += sorted(k for k in record if k not in _FIRST and k not in skip)
    lines = [f"  [{index}]"]
    if record.get("reference") == record.get("output"):
        keys.remove("reference")  # the same text twice says nothing
    lines += [f"    {key}: {shorten(record[key])}" for key in keys if record[key] not in (None, "")]
    return lines


def summary_lines(data, head: str, count: int) -> list[str]:
    info = data.info
    train_tasks = Counter(str(r.get("task")) for r in data.train)
    eval_tasks = Counter(str(r.get("task")) for r in data.evaluation)
    split = info.get("eval_split", "?")
    where = {"local file": "the whole file", "held_out": "held out of the training records",
             "generated": "generated"}.get(split, f"split {split}")
    lines = [f"training records: {len(data.train)} from {info.get('source', '?')} "
             f"({', '.join(f'{t} {n}' for t, n in sorted(train_tasks.items()))})",
             f"evaluation records: {len(data.evaluation)} from {info.get('eval_source', info.get('source', '?'))}, "
             f"{where} ({', '.join(f'{t} {n}' for t, n in sorted(eval_tasks.items()))})"]
    sample = info.get("evaluation_sample")
    if sample:
        lines.append(f"evaluation.max_examples={sample['max_examples_per_group']}: every evaluation uses the same seeded "
                     f"sample of {sample['kept']} of the {sample['of']} evaluation records")
    lines += data.label_set_lines()
    if head == "classification":
        lines.append(f"classification head classes ({len(data.classes())}): {', '.join(data.classes())}")
    lines.append(f"first {min(count, len(data.train))} training records:")
    for i, record in enumerate(data.train[:count]):
        lines += record_lines(record, i, head)
    lines.append(f"first {min(count, len(data.evaluation))} evaluation records:")
    for i, record in enumerate(data.evaluation[:count]):
        lines += record_lines(record, i, head)
    return lines


def register(app: typer.Typer) -> None:
    @app.command(
        "data",
        context_settings=OVERRIDES,
        help=(
            "Show the first few training and evaluation records of a config, normalised as a run sees them, "
            "with the record counts and the label sets. Loads the data only, never a model.\n\n"
            "Examples:\n\n"
            "  fedpeft data --config examples/news/news.yaml\n\n"
            "  fedpeft data --config my.yaml -n 5 data.fieldnames=[label,text]\n\n"
            "Any config key can be overridden as key.sub=value after the options."
        ),
    )
    def data_command(
        ctx: typer.Context,
        config: Path = typer.Option(None, "--config", "-c", help="Experiment YAML (default: the built-in defaults)."),
        count: int = typer.Option(3, "--records", "-n", min=0, help="Records to show from each of train and evaluation."),
    ) -> None:
        from fedpeft.config import ConfigError, load_config
        from fedpeft.data.dataset import load_experiment_data
        from fedpeft.data.sources import DataError

        with exit_on(ConfigError, DataError, ValueError, FileNotFoundError):
            cfg = load_config(config, list(ctx.args), check_method=False)  # no method runs here
            data = load_experiment_data(cfg)
            data.labels()  # a missing partition field is reported here, as a run would
        for line in summary_lines(data, cfg.model.head, count):
            typer.echo(line)
