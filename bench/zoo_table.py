"""Issue 19's one table: LoRA, DoRA, prompt tuning, P-tuning, prefix tuning, IA3 (each under FedIT), FedOT
with drop ratio 0.2 and 0.5, and FedKSeed, on the same data, clients, rounds and evaluation set.

Each row is one ``python -m fedpeft run`` of ``configs/quickstart.yaml`` (SmolLM2-135M-Instruct, bundled;
the generated tasks, 10 clients, Dirichlet 0.5 by task) in its own process, so a row's peak RSS is its
own. Columns: exact match (mean over the tasks) after the last round; uplink bytes per client per round;
what left the model owner, once per client (FedOT: the adapter blocks + the emulator, frozen; every other
row: the whole model); seconds per round (train + aggregate, evaluation left out); the evaluation's
seconds; peak RSS. A first row (``base``, method zero_shot) scores the untrained model on the same set.

Row settings are reused from the two scripts it joins: the PEFT types run as ``bench/peft_types.py``
runs them (each type's defaults; ``--lr-prompt`` for the prompt-learning types), FedOT and FedKSeed as
``bench/offsite_zo_smollm2.py`` defines them (its ``ROWS``: LoRA adapter on the first ``--a`` and last
``--b`` blocks; FedKSeed on all parameters, K = 4096, learning rate ``--zo-lr``) with their own local
step count for FedKSeed (``--zo-steps``: a zeroth-order step costs two forwards plus four draws of a
134.5M-entry direction on the client and one more on the server's replay).

    PYTHONPATH=src python bench/zoo_table.py                            # the whole table
    PYTHONPATH=src python bench/zoo_table.py --model tiny-llama --rounds 1 --local-steps 1 --eval-per-task 1
    PYTHONPATH=src python bench/zoo_table.py --rows lora,fedkseed       # some rows
    PYTHONPATH=src python bench/zoo_table.py --collect /tmp/a /tmp/b    # one table from rows run separately
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from offsite_zo_smollm2 import ROWS as OFFSITE_ROWS
from offsite_zo_smollm2 import mb, row_for
from peft_types import PROMPT_LEARNING

from fedpeft.models.registry import load_base_model

REPO = Path(__file__).resolve().parents[1]
PEFT_ROWS = ("lora", "dora", "prompt_tuning", "p_tuning", "prefix_tuning", "ia3")
ALL_ROWS = ("base", *PEFT_ROWS, "fedot0.2", "fedot0.5", "fedkseed")
ROW_FILE = "zoo_row.json"


def row_overrides(label: str, args) -> list[str]:
    """The command-line overrides of one row on top of the shared ones."""
    if label == "base":
        return ["method.name=zero_shot"]
    if label in PEFT_ROWS:
        ov = ["method.name=fedit", f"peft.type={label}"]
        if label != "lora":  # the quickstart's LoRA options belong to lora/dora only: each type takes its defaults
            ov += ["peft.r=null", "peft.alpha=null", "peft.dropout=null", "peft.target_modules=null"]
        if label in PROMPT_LEARNING:
            ov += [f"training.lr={args.lr_prompt}", f"training.lr_min={args.lr_prompt / 4}"]
        return ov
    method, extra = OFFSITE_ROWS[label]
    ov = [f"method.name={method}", *extra]
    if method == "fedot":
        ov += [f"method.options.a={args.a}", f"method.options.b={args.b}"]
    if method == "fedkseed":
        ov += [f"training.lr={args.zo_lr}", f"training.lr_min={args.zo_lr}", f"federation.local_steps={args.zo_steps}"]
    return ov


def shared_overrides(args) -> list[str]:
    """Settings every row shares: the model, the budget and the evaluation (once, after the last round)."""
    ov = [f"model.name={args.model}", f"model.threads={args.threads}", f"federation.rounds={args.rounds}",
          f"federation.local_steps={args.local_steps}", f"data.eval_examples_per_task={args.eval_per_task}",
          f"evaluation.every_rounds={args.rounds}", "evaluation.before_training=false",
          "output.progress=false", "output.report=false", f"seed={args.seed}"]
    if args.model != "smollm2-135m-instruct":  # a smoke test: the tiny models' vocabulary holds no chat template
        ov.append("data.template=plain")
    return ov


def run_row(label: str, args, out: Path) -> dict:
    run_dir = out / label
    command = [sys.executable, "-m", "fedpeft", "run", "--config", str(REPO / "configs" / "quickstart.yaml"),
               "--run-dir", str(run_dir), "--overwrite", *shared_overrides(args), *row_overrides(label, args)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    t0, cpu0 = time.perf_counter(), child_cpu_seconds()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    measured = {"label": label, "wall": time.perf_counter() - t0, "cpu_s": child_cpu_seconds() - cpu0,
                "overrides": row_overrides(label, args)}
    if proc.returncode != 0:
        return {**measured, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    (run_dir / ROW_FILE).write_text(json.dumps(measured) + "\n")
    return collect_row(run_dir)


def collect_row(run_dir: Path) -> dict:
    """One table row from a finished run directory: its metrics.jsonl and the row's own measurements
    (``zoo_row.json``: wall and CPU seconds of the row's process, its overrides)."""
    row = row_for(run_dir)
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rounds = max(1, sum(e["event"] == "round_end" for e in events))
    first = [e["loss"] for e in events if e["event"] == "client_train" and e["round"] == 1]
    row["loss_first_round"] = sum(first) / len(first) if first else None
    phases = row["phase_seconds"]
    row.update(json.loads((run_dir / ROW_FILE).read_text()))
    row.update(train_s_per_round=(phases["train"] + phases["aggregate"]) / rounds, eval_s=phases["evaluate"],
               uplink_per_client=(row["uplink_per_client"] or [0])[0])
    return row


def child_cpu_seconds() -> float:
    """User + system CPU seconds of the finished child processes: on shared cores a row's wall seconds
    depend on the other jobs, its CPU seconds much less."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def whole_model_bytes(model_name: str) -> int:
    """Bytes of the whole model (parameters and buffers, tied tensors once): what a client receives when
    it trains on the full model. FedOT rows report the same number as ``owner_model_bytes``."""
    model = load_base_model(model_name, seed=0).model
    unique = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in unique.values())


def exact_match(metrics: dict) -> float | None:
    return metrics.get("exact_match")


def per_task(metrics: dict) -> str:
    return " / ".join(f"{v:.2f}" for k, v in sorted(metrics.items())
                      if k.count("/") == 1 and not k.startswith("emulator/"))


def write_table(args, rows: list[dict], out_md: Path) -> None:
    owner = next((r["owner_model"] for r in rows if r.get("owner_model")), None) or whole_model_bytes(args.model)
    head = (f"# One table, issue 19: {args.model}, configs/quickstart.yaml's data and federation (4 generated "
            f"tasks, 10 clients, 2 per round, Dirichlet 0.5 by task, batch 8), {args.rounds} rounds x "
            f"{args.local_steps} local steps (FedKSeed {args.zo_steps}), {args.eval_per_task} evaluation prompts per "
            "task (the same for every row)")
    lines = [head, "",
             "| row | exact match (mean) | per task (arith / reverse / unit / upper) | train loss, round 1 -> last "
             "| uplink per client per round "
             "| left the owner (per client, once) | s/round (train + aggregate) | eval s | row CPU s (wall s) "
             "| peak RSS |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error']} | | | | | | | | |")
            continue
        em = exact_match(r["metrics"])
        emu = exact_match(r.get("emulator") or {})
        em_text = "-" if em is None else f"{em:.3f}" + (f" (emulator {emu:.3f})" if emu is not None else "")
        left = r["left_owner"] or owner
        left_text = "-" if left is None else mb(left) + ("" if r["left_owner"] else " (the whole model)")
        if r["label"] == "base":
            uplink, left_text, sround = "-", "-", "-"
        else:
            uplink, sround = f"{r['uplink_per_client']:,} B", f"{r['train_s_per_round']:.1f}"
        loss = "-" if r["loss_first_round"] is None else f"{r['loss_first_round']:.2f} -> {r['loss_last_round']:.2f}"
        lines.append(f"| {r['label']} | {em_text} | {per_task(r['metrics'])} | {loss} | {uplink} | {left_text} | "
                     f"{sround} | {r['eval_s']:.1f} | {r['cpu_s']:.0f} ({r['wall']:.0f}) | {r['peak_rss_mb']:.0f} MB |")
    lines += ["", "Command: `nice -n 5 env PYTHONPATH=src python bench/zoo_table.py " + " ".join(sys.argv[1:]) + "`"]
    out_md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ALL_ROWS), help=f"comma-separated, of {', '.join(ALL_ROWS)}")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--zo-steps", type=int, default=4, help="FedKSeed's local steps per round")
    parser.add_argument("--eval-per-task", type=int, default=10)
    parser.add_argument("--lr-prompt", type=float, default=3e-2)
    parser.add_argument("--zo-lr", type=float, default=1e-6)
    parser.add_argument("--a", type=int, default=2, help="FedOT: adapter blocks at the bottom")
    parser.add_argument("--b", type=int, default=2, help="FedOT: adapter blocks at the top")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per row (1: best on cores shared with other jobs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/zoo_table", help="run directories (kept)")
    parser.add_argument("--collect", nargs="*", help="no runs: build the table from the row directories under "
                        "these work directories (rows run by several invocations with --rows and --work)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "zoo_table"),
                        help="writes <out>.md and <out>.json")
    args = parser.parse_args()
    labels = [x for x in args.rows.split(",") if x]
    unknown = [x for x in labels if x not in ALL_ROWS]
    if unknown:
        parser.error(f"--rows: unknown row(s) {unknown}; expected some of {', '.join(ALL_ROWS)}")
    rows = []
    if args.collect:  # rows run earlier (e.g. split over processes): the table from their run directories
        found = {d.name: d for work in args.collect for d in Path(work).iterdir() if (d / ROW_FILE).exists()}
        rows = [collect_row(found[label]) for label in labels if label in found]
    else:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        for label in labels:
            print(f"== {label}", flush=True)
            row = run_row(label, args, work)
            print(json.dumps({k: row.get(k) for k in ("label", "error", "wall", "cpu_s", "train_s_per_round",
                                                      "peak_rss_mb")}), flush=True)
            rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=1, default=str) + "\n")
    write_table(args, rows, out.with_suffix(".md"))


if __name__ == "__main__":
    main()
