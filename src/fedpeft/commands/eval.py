"""``fedpeft eval``: evaluate a base model, or a base model + trained adapter, on a benchmark suite."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedpeft.commands.common import exit_on

console = Console(stderr=True)

_EVALUATOR_SHORT = {"multiple_choice": "mc", "generate": "gen", "lm_loss": "loss", "mt_bench": "judge"}
_METRIC_ORDER = ("acc", "acc_norm", "acc_macro", "no_answer", "loss", "perplexity", "rougeL", "score",
                 "score_turn1", "score_turn2", "judged", "judge_failures")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def results_table(results, title: str) -> Table:
    """One row per (task, split, evaluator): examples, each metric, examples/second, and why a task was
    skipped. Per-category metrics (``stem/acc``...) are in the category table instead."""
    from fedpeft.evaluation.suites import SUITES, flat_metrics

    keys = [k for k in _METRIC_ORDER if any(k in r.metrics for r in results)]
    keys += sorted({k for r in results for k in r.metrics if "/" not in k} - set(keys) - {"tokens"})
    table = Table(title=title)
    table.add_column("task")
    table.add_column("split")
    table.add_column("evaluator")
    table.add_column("n", justify="right")
    for key in keys:
        table.add_column(key, justify="right")
    table.add_column("ex/s", justify="right")
    table.add_column("note")
    for r in results:
        evaluator = _EVALUATOR_SHORT.get(r.evaluator, r.evaluator)
        if r.skipped:
            table.add_row(r.task, r.split, evaluator, "0", *["-"] * len(keys), "-", "skipped: no data")
            continue
        speed = r.examples_per_second
        table.add_row(r.task, r.split, evaluator, str(r.num_examples), *[_fmt(r.metrics.get(k)) for k in keys],
                      "-" if speed is None else f"{speed:.2f}", "")
    tasks = {r.task for r in results}
    for key, value in flat_metrics(results).items():  # suite means: commonsense8/test/acc, ...
        parts = key.split("/")
        if parts[0] in SUITES and parts[0] not in tasks and key.endswith("/acc"):
            cells = [_fmt(value) if k == "acc" else "" for k in keys]
            split = parts[1] if len(parts) > 2 and parts[1] not in ("multiple_choice", "generate") else ""
            table.add_row(f"[bold]{parts[0]}[/bold]", split, "mean", "", *cells, "", "")
    return table


def group_tables(result) -> list[Table]:
    """MMLU's per-category and per-subject accuracy tables (as the papers print them) for one result."""
    tables = []
    categories, subjects = result.groups.get("category", {}), result.groups.get("subject", {})
    if categories:
        table = Table(title=f"{result.task} ({result.split}, {result.evaluator}) by category")
        for column in ("category", "subjects", "n", "acc"):
            table.add_column(column, justify="left" if column == "category" else "right")
        for category, row in categories.items():
            count = sum(1 for s in subjects.values() if s.get("category") == category)
            table.add_row(category, str(count), str(row["n"]), f"{row['acc']:.4f}")
        total = sum(row["n"] for row in categories.values())
        correct = sum(row["correct"] for row in categories.values())
        table.add_row("[bold]all[/bold]", str(len(subjects)), str(total), f"{correct / total:.4f}" if total else "-")
        tables.append(table)
    if subjects:
        table = Table(title=f"{result.task} ({result.split}, {result.evaluator}) by subject")
        for column in ("subject", "category", "n", "acc"):
            table.add_column(column, justify="left" if column in ("subject", "category") else "right")
        for subject, row in subjects.items():
            table.add_row(subject, row["category"], str(row["n"]), f"{row['acc']:.4f}")
        tables.append(table)
    return tables


def _run_dir_of(adapter: Path | None) -> Path | None:
    """The run directory an adapter belongs to (``RUN_DIR/final`` -> ``RUN_DIR``) when it has a config."""
    if adapter is None:
        return None
    for candidate in (adapter, adapter.parent):
        if (candidate / "config.yaml").is_file():
            return candidate
    return None


def register(app: typer.Typer) -> None:
    @app.command(
        "eval",
        help=(
            "Evaluate a model (optionally with a trained adapter) on a benchmark suite.\n\n"
            "Suites: commonsense8, mmlu, gsm8k, mt_bench, glue, dolly, code (humaneval, mbpp) (or task names, comma-separated: "
            "boolq,piqa).\n\n"
            "Examples:\n\n"
            "  fedpeft eval --suite commonsense8 --limit 100   (zero-shot baseline of the bundled SmolLM2)\n\n"
            "  fedpeft eval --adapter runs/commonsense-20261122/final --suite commonsense8\n\n"
            "  fedpeft eval --suite gsm8k --limit 50 --mode generate\n\n"
            "  fedpeft eval --suite mmlu --split validation --limit 570   (10 per subject on average, every subject)\n\n"
            "  fedpeft eval --suite mt_bench --judge-url http://localhost:8000/v1 --judge-model qwen2.5-7b\n\n"
            "Data comes from --data-dir, $FEDPEFT_DATA_DIR or ../shared/data, else the Hugging Face Hub. "
            "Results are printed as a table and appended to a metrics.jsonl (the run's, with --adapter)."
        ),
    )
    def eval_command(
        model: str = typer.Option(None, "--model", "-m",
                                  help="Base model spec (default: the adapter run's model, else smollm2-135m-instruct)."),
        adapter: Path = typer.Option(None, "--adapter", "-a", help="PEFT adapter directory, e.g. RUN_DIR/final."),
        suite: str = typer.Option("commonsense8", "--suite", "-s", help="Suite or task names, comma-separated."),
        limit: int = typer.Option(None, "--limit", "-n", min=1,
                                  help="At most N examples per task: a seeded sample covering every MMLU subject "
                                       "(Dolly/MT-Bench category) present, in proportion to its size (default: all)."),
        split: str = typer.Option(None, "--split",
                                  help="Data split for every task (default: each task's own: test for MMLU and the "
                                       "commonsense sets, validation for GLUE); or per part: --suite mmlu:validation."),
        data_dir: Path = typer.Option(None, "--data-dir", help="Local data root (default: $FEDPEFT_DATA_DIR or ../shared/data)."),
        mode: str = typer.Option("auto", "--mode",
                                 help="auto | loglik | generate | both (auto: generation for gsm8k and mt_bench)."),
        template: str = typer.Option("auto", "--template",
                                     help="Prompt template: auto (the run's data.template, else chat) | chat | alpaca | plain."),
        mc_format: str = typer.Option("label", "--mc-format",
                                      help="Commonsense multiple choice: label (LLM-Adapters answer labels) | text (option texts, lm-eval)."),
        batch_size: int = typer.Option(16, "--batch-size", "-b", min=1),
        max_new_tokens: int = typer.Option(None, "--max-new-tokens", min=1, help="Generation length (default per task)."),
        fewshot: int = typer.Option(0, "--fewshot", min=0, help="MMLU exemplars per subject from the dev set."),
        lenient: bool = typer.Option(False, "--lenient", help="Case-insensitive commonsense label extraction."),
        seed: int = typer.Option(0, "--seed", help="Seed of the --limit sample."),
        judge_url: str = typer.Option(None, "--judge-url",
                                      help="OpenAI-compatible API root for MT-Bench (or $FEDPEFT_JUDGE_URL); "
                                           "'local' grades with --judge-model loaded by fedpeft."),
        judge_model: str = typer.Option(None, "--judge-model",
                                        help="Judge model name (or $FEDPEFT_JUDGE_MODEL); a model spec with --judge-url local."),
        judge_timeout: float = typer.Option(120.0, "--judge-timeout", help="Seconds per judge request."),
        judge_max_tokens: int = typer.Option(None, "--judge-max-tokens", min=1,
                                             help="Judgment length (default 2048 remote, 512 local)."),
        metrics_path: Path = typer.Option(None, "--metrics",
                                          help="metrics.jsonl to append to (default: RUN_DIR/metrics.jsonl with --adapter, "
                                               "else runs/eval/metrics.jsonl)."),
        dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16"),
        threads: int = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
    ) -> None:
        import torch

        from fedpeft.evaluation.judge import JudgeSettings, OpenAIChatClient
        from fedpeft.evaluation.suites import EvalOptions, flat_metrics, resolve_suite, run_suite
        from fedpeft.models.loading import load_model_for_eval
        from fedpeft.models.registry import ModelNotFoundError

        if mode not in ("auto", "loglik", "generate", "both"):
            raise typer.BadParameter(f"'{mode}' is not one of auto, loglik, generate, both", param_hint="--mode")
        if template not in ("auto", "chat", "alpaca", "plain"):
            raise typer.BadParameter(f"'{template}' is not one of auto, chat, alpaca, plain", param_hint="--template")
        if mc_format not in ("label", "text"):
            raise typer.BadParameter(f"'{mc_format}' is not one of label, text", param_hint="--mc-format")
        try:
            entries = resolve_suite(suite)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--suite") from None
        if split is not None:
            try:
                entries = resolve_suite(suite, split)
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="--split") from None
        if adapter is not None and not adapter.exists():
            raise typer.BadParameter(f"'{adapter}' does not exist", param_hint="--adapter")
        if data_dir is not None and not data_dir.is_dir():
            raise typer.BadParameter(f"'{data_dir}' is not a directory", param_hint="--data-dir")
        if threads:
            torch.set_num_threads(threads)

        run_dir = _run_dir_of(adapter)
        run_config = None
        if run_dir is not None:
            import yaml

            run_config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        model_spec = model or (run_config or {}).get("model", {}).get("name") or "smollm2-135m-instruct"

        with exit_on(ModelNotFoundError, FileNotFoundError, ValueError):
            loaded_model, tokenizer, description = load_model_for_eval(model_spec, adapter, dtype=dtype)
        if template == "auto":
            template = (run_config or {}).get("data", {}).get("template") or (
                "chat" if getattr(tokenizer, "chat_template", None) else "alpaca")

        judge = None
        settings = JudgeSettings.from_env(judge_url, judge_model, timeout=judge_timeout, max_tokens=judge_max_tokens)
        if settings is not None and settings.base_url == "local":
            from fedpeft.evaluation.judge import LocalModelJudge
            from fedpeft.models.registry import load_base_model

            judge_loaded = load_base_model(settings.model, dtype=dtype)
            judge = LocalModelJudge(judge_loaded.model, judge_loaded.tokenizer, max_new_tokens=judge_max_tokens or 512)
        elif settings is not None:
            judge = OpenAIChatClient(settings)
        elif "mt_bench" in [entry.task for entry in entries]:
            console.print("[yellow]no judge configured[/yellow] (--judge-url/--judge-model or FEDPEFT_JUDGE_URL/"
                          "FEDPEFT_JUDGE_MODEL): MT-Bench answers are generated and saved, not scored")

        options = EvalOptions(data_dir=data_dir, limit=limit, split=split, mode=mode, template=template,
                              mc_format=mc_format, batch_size=batch_size, max_new_tokens=max_new_tokens,
                              num_fewshot=fewshot, lenient_extraction=lenient, judge=judge, seed=seed)
        splits = ", ".join(sorted({f"{e.task}:{e.split}" for e in entries}))
        console.print(f"evaluating [bold]{description}[/bold] on {suite} (template={template}, mode={mode}, "
                      f"limit={limit or 'all'}, splits {splits})")

        def progress(result) -> None:
            what = f"skipped ({result.skipped[:80]})" if result.skipped else \
                ", ".join(f"{k}={_fmt(v)}" for k, v in result.metrics.items()) + f" in {result.seconds:.1f} s"
            console.print(escape(f"  {result.task} ({result.split}) [{result.evaluator}]: {what}"))

        start = time.perf_counter()
        results = run_suite(loaded_model, tokenizer, suite, options, on_result=progress)
        seconds = time.perf_counter() - start
        console.print(results_table(results, f"fedpeft eval: {suite}"))
        for result in results:
            for table in group_tables(result):
                console.print(table)
        for result in results:
            if result.skipped:
                console.print(f"[yellow]skipped {result.task}:[/yellow] {escape(result.skipped)}")

        if metrics_path is None:
            metrics_path = (run_dir / "metrics.jsonl") if run_dir is not None else Path("runs") / "eval" / "metrics.jsonl"
        from fedpeft.federation.metrics_log import MetricsLog

        log = MetricsLog(metrics_path)
        try:
            log.log("eval_suite", suite=suite, model=model_spec, adapter=str(adapter) if adapter else None,
                    template=template, mode=mode, mc_format=mc_format, limit=limit, seed=seed,
                    splits={r.task: r.split for r in results}, seconds=seconds,
                    examples=sum(r.num_examples for r in results), metrics=flat_metrics(results),
                    tasks=[r.to_dict() for r in results])
        finally:
            log.close()
        extras = {r.task: r.extra for r in results if r.extra}
        if extras:
            details = metrics_path.parent / f"eval-{suite.replace(',', '+')}-{time.strftime('%Y%m%d-%H%M%S')}.json"
            details.write_text(json.dumps(extras, indent=1, default=str))
            console.print(f"samples, answers and judge failures: {details}")
        console.print(f"appended to {metrics_path}")
        skipped = [r.task for r in results if r.skipped]
        if skipped:  # a partial evaluation must not look like a finished one to a script
            console.print(f"[red]error:[/red] {len(skipped)} task(s) did not run: {', '.join(skipped)}. Give their data "
                          f"with --data-dir DIR (or $FEDPEFT_DATA_DIR); see the reasons above")
            raise typer.Exit(1)
