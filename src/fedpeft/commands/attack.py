"""``fedpeft attack``: run data-reconstruction attacks on a model and a sample of clients' texts, and
write a table of ROUGE-L F / METEOR / token accuracy per attack and noise level (docs/attacks.md)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fedpeft.commands.common import exit_on


def _names(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _levels(text: str) -> list[float]:
    try:
        return [float(v) for v in _names(text)]
    except ValueError:
        raise ValueError(f"--noise: {text!r} is not a comma-separated list of numbers (σ in units of the "
                         "observed tensor's RMS, e.g. 0,1,4)") from None


def register(app: typer.Typer) -> None:
    @app.command(
        "attack",
        help=(
            "Run data-reconstruction attacks (EIA, SIP, BiSR, DLG/TAG on the split gradient, DLG/TAG on a "
            "FedIT LoRA step) on a model and a sample of a data source's texts, scored with ROUGE-L F, "
            "METEOR (exact stage) and token accuracy; one row per attack and noise level.\n\n"
            "Example:\n\n"
            "  fedpeft attack --model tiny-llama --attacks eia,sip,bisr,tag-split,tag-fedit "
            "--aux-source generated --aux-tasks uppercase,sort_numbers --noise 0,1,4 --out runs/attack\n\n"
            "On a split run's recorded crossings (method.name=sfl, method.options.save_crossings=N), written to "
            "RUN/privacy/ and shown in its report:\n\n"
            "  fedpeft attack --run runs/sfl --attacks eia,tag-split"
        ),
    )
    def attack_command(
        model: str = typer.Option("tiny-llama", "--model", "-m", help="Causal LM: tiny-llama, smollm2, a directory or hub id."),
        attacks: str = typer.Option("eia,tag-split", "--attacks", "-a",
                                    help="Comma-separated: eia, sip, bisr, dlg-split, tag-split, dlg-fedit, tag-fedit."),
        source: str = typer.Option("generated", "--source", help="The clients' data: generated, a built-in name or a file."),
        tasks: str = typer.Option("arithmetic", "--tasks", help="Generated tasks of the clients (with --source generated)."),
        aux_source: str = typer.Option(None, "--aux-source", help="Auxiliary public data for SIP/BiSR (not the clients')."),
        aux_tasks: str = typer.Option(None, "--aux-tasks", help="Generated tasks of the auxiliary data."),
        aux_samples: int = typer.Option(64, "--aux-samples", min=1, help="Auxiliary texts to train the inversion model on."),
        samples: int = typer.Option(4, "--samples", "-n", min=1, help="Client texts attacked (one at a time)."),
        max_tokens: int = typer.Option(32, "--max-tokens", min=2, help="Each text is cut to this many tokens."),
        cut: int = typer.Option(1, "--cut", help="Bottom cut a: embeddings + blocks 1..a on the client."),
        top_cut: int = typer.Option(None, "--top-cut", help="Top cut b: blocks after b on the client (default: blocks − 1)."),
        noise: str = typer.Option("0", "--noise", help="Gaussian noise levels on what is observed, σ in units of its RMS."),
        steps: int = typer.Option(None, "--steps", min=1, help="Optimisation steps of EIA/DLG/TAG/BiSR (default: each one's)."),
        sip_steps: int = typer.Option(300, "--sip-steps", min=1, help="Training steps of the SIP inversion model."),
        lora_r: int = typer.Option(8, "--lora-r", min=1, help="LoRA rank of the FedIT client (fedit attacks)."),
        lora_targets: str = typer.Option("q_proj,v_proj", "--lora-targets", help="LoRA target modules (fedit attacks)."),
        seed: int = typer.Option(0, "--seed"),
        out: Path = typer.Option(None, "--out", "-o", help="Directory for attack.json and attack.md."),
        run: Path = typer.Option(None, "--run", help="A split (sfl) run directory: attack its recorded crossings "
                                 "(method.options.save_crossings) and write RUN/privacy/attack.json and attack.md."),
        crossings: Path = typer.Option(None, "--crossings", help="With --run: attack only the crossings under this "
                                       "directory (e.g. RUN/split_crossings/round_0001)."),
        weights: str = typer.Option("base", "--weights", help="With --run, what the attacker knows: base (the "
                                    "pre-trained model) or final (base + the run's final adapter)."),
        max_batches: int = typer.Option(None, "--max-batches", min=1, help="With --run: micro-batches per job attacked."),
    ) -> None:
        from fedpeft.attacks.runner import AttackSettings

        if run is not None:
            _run_recorded(run, crossings, _names(attacks), weights, steps, max_batches, aux_source, _names(aux_tasks),
                          aux_samples, max_tokens, sip_steps, seed)
            return

        with exit_on(ValueError, message=_first_error):  # pydantic's ValidationError is a ValueError
            settings = AttackSettings(attacks=_names(attacks), cut=cut, top_cut=top_cut, samples=samples,
                                      max_tokens=max_tokens, noise_levels=_levels(noise), steps=steps,
                                      sip_steps=sip_steps, has_auxiliary=aux_source is not None, lora_r=lora_r,
                                      lora_targets=_names(lora_targets), seed=seed)
            if aux_source is not None and aux_source == source and \
                    (source != "generated" or set(_names(aux_tasks)) & set(_names(tasks))):
                raise ValueError(f"--aux-source: '{aux_source}' (tasks {aux_tasks}) overlaps the clients' data "
                                 f"('{source}', tasks {tasks}); the auxiliary data must be a different dataset")
        _run(settings, model, source, _names(tasks), aux_source, _names(aux_tasks), aux_samples, out)


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return "; ".join(str(e.get("msg", "")).removeprefix("Value error, ") for e in errors())
    return str(exc)


def _run(settings, model_name, source, tasks, aux_source, aux_tasks, aux_samples, out) -> None:
    from fedpeft.attacks.runner import markdown_table, run_attacks
    from fedpeft.attacks.texts import source_texts
    from fedpeft.models.registry import load_base_model

    with exit_on(ValueError):
        victims = source_texts(source, tasks, settings.samples, settings.seed)
        auxiliary = source_texts(aux_source, aux_tasks, aux_samples, settings.seed + 1) if aux_source else []
        loaded = load_base_model(model_name, seed=settings.seed)
        model, tokenizer = loaded.model, loaded.tokenizer
        rows = run_attacks(model, tokenizer, victims, settings, auxiliary)
    table = markdown_table(rows)
    typer.echo(table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        payload = {"model": model_name, "source": source, "tasks": tasks, "aux_source": aux_source,
                   "aux_tasks": aux_tasks, "settings": settings.model_dump(), "results": rows}
        (out / "attack.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (out / "attack.md").write_text(table, encoding="utf-8")
        typer.echo(f"saved {out / 'attack.json'} and {out / 'attack.md'}")


def _run_recorded(run_dir, crossings, attacks, weights, steps, max_batches, aux_source, aux_tasks, aux_samples,
                  max_tokens, sip_steps, seed) -> None:
    """``--run``: every check before the model loads, then the attacks on what the run recorded."""
    from peft import PeftModel

    from fedpeft.attacks.recorded import (CROSSINGS_DIR, WEIGHTS, attack_recorded, check_attacks, load_crossings,
                                          markdown_table, run_config, write_privacy)
    from fedpeft.attacks.runner import auxiliary_batches
    from fedpeft.attacks.sip import SIPOptions, train_inversion_model
    from fedpeft.attacks.texts import source_texts
    from fedpeft.models.loading import adapter_dir
    from fedpeft.models.registry import load_base_model
    from fedpeft.report import write_report
    from fedpeft.report.markdown import REPORT_DIR, REPORT_FILE

    with exit_on(ValueError, FileNotFoundError):
        if weights not in WEIGHTS:
            raise ValueError(f"--weights: '{weights}' is not one of {', '.join(WEIGHTS)}")
        config = run_config(run_dir)
        jobs = load_crossings(crossings if crossings is not None else run_dir / CROSSINGS_DIR)
        attacks = check_attacks(attacks, aux_source is not None)
        adapter = adapter_dir(run_dir) if weights == "final" else None
        model_cfg = config.get("model") or {}
        loaded = load_base_model(model_cfg.get("name"), model_cfg.get("dtype") or "float32",
                                 seed=int(config.get("seed") or 0), head=model_cfg.get("head") or "causal_lm")
        model, tokenizer = loaded.model, loaded.tokenizer
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter))
        inversion = None
        if "sip" in attacks:
            first = jobs[0].cut[0]
            texts = source_texts(aux_source, aux_tasks, aux_samples, seed + 1)
            inversion = train_inversion_model(model, first, auxiliary_batches(tokenizer, texts, max_tokens),
                                              SIPOptions(steps=sip_steps, seed=seed))
        rows = attack_recorded(model, tokenizer, jobs, attacks, steps=steps, max_batches=max_batches, seed=seed,
                               inversion=inversion)
    payload = {"run": str(run_dir), "model": model_cfg.get("name"), "weights": weights,
               "crossings": [str(j.path) for j in jobs], "aux_source": aux_source, "aux_tasks": aux_tasks,
               "steps": steps, "seed": seed, "results": rows}
    path = write_privacy(run_dir, payload)
    typer.echo(markdown_table(rows))
    typer.echo(f"saved {path} and {path.with_suffix('.md')}")
    if (run_dir / REPORT_DIR / REPORT_FILE).is_file():  # the run's report gains its privacy section
        typer.echo(f"report: {write_report(run_dir)}")
