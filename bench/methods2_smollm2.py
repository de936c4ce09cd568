"""FedIT vs FL-TAC vs FedLS vs FedGPL: metric per task, uplink bytes, clustering accuracy (FL-TAC),
time per round, under one budget.

Scenarios (``--data``):
* ``generated`` (default): SmolLM2-135M-Instruct on four generated tasks with exact answers,
  Dirichlet(0.5) per task with min_frac 0.01 over the clients;
* ``dolly``: SmolLM2-135M-Instruct on Dolly-15k's 8 categories (all training records split by category;
  ROUGE-L on the 80 global test records, reported per category with ``evaluation.group_by``);
* ``minilm``: ``configs/fltac_minilm.yaml``, the MiniLM encoder with a classification head on SST-2
  plus the generated sentiment/topic/parity tasks (accuracy per task).

Every method runs the same clients (all of them every round: FL-TAC's clustering needs the tasks
present), rounds, local steps per adapter and seed. FL-TAC trains one adapter per (client, local task),
so it runs more local jobs per round. It is reported twice: with its single "global" adapter (the
sample-weighted mean of the cluster adapters: what the engine evaluates) and per task, each task's
records scored with the cluster adapter its clients' adapters were assigned to in the last round
(``Strategy.task_evaluation_states``; the engine's ``task_adapters`` evaluation).

    python bench/methods2_smollm2.py --threads 1 --rounds 3 --steps 4 --batch 4 --eval-per-task 10
    python bench/methods2_smollm2.py --data dolly --threads 1 --clients 3 --rounds 3 --steps 3 --batch 4 \
        --seq-len 192 --max-new-tokens 48
    python bench/methods2_smollm2.py --data minilm --threads 1 --clients 6 --rounds 5 --steps 10 --batch 32 \
        --per-task 600 --eval-per-task 100
    python bench/methods2_smollm2.py --model tiny-llama --eval-per-task 2   # seconds: smoke test

Each writes a markdown table with its command (``--out``); the measured ones are in ``bench/results/``
(``methods2_generated_smollm2.md``, ``methods2_dolly_smollm2.md``, ``methods2_minilm.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ["fedit", "fltac", "fedls", "fedgpl"]
GENERATED_TASKS = ["arithmetic", "reverse", "uppercase", "unit_conversion"]


def base_config(args) -> Path:
    return REPO / "configs" / ("fltac_minilm.yaml" if args.data == "minilm" else "tiny.yaml")


def common_overrides(args, method: str) -> list[str]:
    return [
        f"model.threads={args.threads}", f"seed={args.seed}", "data.partition.kind=dirichlet",
        "data.partition.alpha=0.5", "data.partition.min_frac=0.01",
        f"federation.num_clients={args.clients}", f"federation.clients_per_round={args.clients}",
        f"federation.rounds={args.rounds}", f"federation.local_steps={args.steps}", f"federation.batch_size={args.batch}",
        f"method.name={method}", "evaluation.every_rounds=0", "evaluation.before_training=false",
        "output.progress=false", "output.report=false",
    ]


def overrides_for(args, method: str, run_dir: Path) -> list[str]:
    ov = common_overrides(args, method)
    if args.data == "minilm":
        # configs/fltac_minilm.yaml: MiniLM encoder + classification head, r=4 on query/value, SST-2 plus the
        # generated sentiment/topic/parity tasks; its lr and sequence length unless given here.
        ov += [f"data.train_examples_per_task={args.per_task}", f"data.max_train_examples_per_task={args.per_task}",
               f"data.eval_examples_per_task={args.eval_per_task}", "evaluation.batch_size=64"]
        if args.model:
            ov.append(f"model.name={args.model}")
        if args.lr:
            ov += [f"training.lr={args.lr}", f"training.lr_min={args.lr}"]
    else:
        rank = args.fltac_rank if method == "fltac" and args.fltac_rank else args.rank
        lr = args.lr or 2e-3
        ov += [
            f"model.name={args.model or 'smollm2-135m-instruct'}", f"peft.r={rank}", f"peft.alpha={2 * rank}",
            "peft.target_modules=[q_proj,k_proj,v_proj,o_proj]", "data.template=chat",
            f"training.lr={lr}", f"training.lr_min={lr / 4}", f"training.max_seq_len={args.seq_len}",
            f"evaluation.max_new_tokens={args.max_new_tokens}", "evaluation.batch_size=32",
        ]
    if args.data == "generated":
        ov += ["data.source=generated", f"data.tasks=[{','.join(GENERATED_TASKS)}]",
               f"data.train_examples_per_task={args.per_task}", f"data.eval_examples_per_task={args.eval_per_task}",
               "data.partition.by=task"]
    elif args.data == "dolly":
        # final eval: all 80 global test records, ROUGE-L reported per category
        ov += ["data.source=dolly", "data.partition.by=category", "evaluation.group_by=category"]
    if method == "fltac":
        ov += [f"method.options.artifact_dir={run_dir}", "method.options.min_task_examples=4"]
    if method == "fedls":
        ov += ["method.options.variant=all_momentum", "method.options.min_prob=0.4", "method.options.max_prob=0.99"]
    if method == "fedgpl":
        ov += ["method.options.grad_eval=lora_per_l1", "method.options.min_layer_num=2", "method.options.max_layer_num=6",
               f"method.options.server_batch={args.server_examples}"]
    return ov


def events_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summarise(run_dir: Path) -> dict:
    ev = events_of(run_dir)
    of = lambda kind: [e for e in ev if e.get("event") == kind]
    rounds = of("round_end")
    aggs = of("aggregate")
    evals = [e for e in of("eval") if "split" not in e]  # the global adapter's evaluations
    final = evals[-1]["metrics"] if evals else {}
    # FL-TAC: the engine also scores each task's records with the cluster adapter assigned to that task
    task_evals = [e for e in of("eval") if e.get("split") == "task_adapters"]
    per_task = {k.split("/")[1]: v for k, v in task_evals[-1]["metrics"].items() if k.count("/") == 2} if task_evals else {}
    train_agg = [e["phase_seconds"]["train"] + e["phase_seconds"]["aggregate"] for e in rounds]
    row = {
        "metrics": final,
        "uplink_total": sum(e["uplink_bytes"] for e in rounds),
        "uplink_per_round": sum(e["uplink_bytes"] for e in rounds) / max(1, len(rounds)),
        "jobs_per_round": len(of("client_train")) / max(1, len(rounds)),
        "round_seconds": sum(train_agg) / max(1, len(train_agg)),
        "failed": len(of("client_failed")),
    }
    if per_task:
        row["per_task_cluster"] = per_task
    if aggs and "cluster_accuracy" in aggs[-1]:
        row["cluster_accuracy"] = [round(e["cluster_accuracy"], 3) for e in aggs]
    if aggs and "uplink_ratio" in aggs[-1]:
        row["uplink_ratio"] = [round(e["uplink_ratio"], 3) for e in aggs]
    if aggs and "selected_layers" in aggs[-1]:
        row["selected_layers"] = [e["selected_layers"] for e in aggs]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=METHODS)
    parser.add_argument("--model", default=None, help="default: smollm2-135m-instruct (minilm: the config's encoder)")
    parser.add_argument("--data", choices=["generated", "dolly", "minilm"], default="generated",
                        help="minilm: configs/fltac_minilm.yaml (MiniLM classifier; SST-2 + 3 generated tasks)")
    parser.add_argument("--per-task", type=int, default=120)
    parser.add_argument("--eval-per-task", type=int, default=10)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--fltac-rank", type=int, help="FL-TAC's per-task rank (the paper uses a lower one); default --rank")
    parser.add_argument("--lr", type=float, default=None, help="default 2e-3 (minilm: the config's)")
    parser.add_argument("--server-examples", type=int, default=8, help="FedGPL: server-held training records")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--keep", help="keep run directories under this folder")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "methods2_smollm2.md"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from fedpeft.federation.engine import run_experiment

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        for method in args.methods:
            run_dir = root / method
            print(f"== {method}", flush=True)
            t0 = time.perf_counter()
            try:
                run_experiment(base_config(args), overrides=overrides_for(args, method, run_dir), run_dir=run_dir)
                row = summarise(run_dir)
            except Exception as exc:  # one broken method must not hide the others
                row = {"error": f"{type(exc).__name__}: {exc}"}
            row.update(method=method, wall=time.perf_counter() - t0)
            print(json.dumps({k: v for k, v in row.items()}, default=str), flush=True)
            rows.append(row)
    write_table(args, rows)


def write_table(args, rows) -> None:
    minilm = args.data == "minilm"
    model = args.model or ("all-minilm-l6-v2" if minilm else "smollm2-135m-instruct")
    adapter = ("LoRA r=4 query/value + classification head (configs/fltac_minilm.yaml)" if minilm
               else f"LoRA r={args.rank} q/k/v/o")
    lr = args.lr or ("5e-3 (config)" if minilm else 2e-3)
    fmt_b = lambda b: f"{b / 1e6:.2f} MB" if b >= 1e6 else f"{b / 1e3:.1f} kB"
    tasks = sorted({k.split("/")[0] for r in rows for k in r.get("metrics", {}) if "/" in k}
                   | {t for r in rows for t in r.get("per_task_cluster", {})})
    head = "| method | " + " | ".join(tasks) + " | overall | uplink total | uplink/round | jobs/round | train+agg s/round | cluster acc | notes |"
    lines = [
        f"# FedIT vs FL-TAC vs FedLS vs FedGPL on {model}, data {args.data}: {args.clients} clients (all per round), "
        f"{args.rounds} rounds, {args.steps} local steps x batch {args.batch} per adapter, {adapter}, "
        f"{args.per_task} train / {args.eval_per_task} eval per task, lr {lr}, seed {args.seed}",
        "", "Command: `python bench/methods2_smollm2.py " + " ".join(sys.argv[1:]) + "`",
        "", head, "|" + "---|" * (len(tasks) + 8),
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | error: {r['error'][:150]} |" + " |" * (len(tasks) + 6))
            continue
        m = r["metrics"]
        per = [next((f"{v:.2f}" for k, v in m.items() if k.startswith(t + "/")), "") for t in tasks]
        overall = next((f"{m[k]:.3f}" for k in ("exact_match", "rougeL", "accuracy", "score") if k in m), "")
        notes = []
        if "uplink_ratio" in r:
            notes.append("uplink ratio vs FedIT " + "/".join(f"{x:.2f}" for x in r["uplink_ratio"]))
        if "selected_layers" in r:
            notes.append("layers " + "; ".join(",".join(map(str, s)) for s in r["selected_layers"]))
        acc = "/".join(f"{x:.2f}" for x in r.get("cluster_accuracy", [])) or "-"
        label = r["method"] + (" (mean adapter)" if r["method"] == "fltac" else "")
        lines.append(f"| {label} | " + " | ".join(per) + f" | {overall} | {fmt_b(r['uplink_total'])} | "
                     f"{fmt_b(r['uplink_per_round'])} | {r['jobs_per_round']:.1f} | {r['round_seconds']:.1f} | {acc} | "
                     + "; ".join(notes) + " |")
        if r.get("per_task_cluster"):
            pt = r["per_task_cluster"]
            vals = [f"{pt[t]:.2f}" if t in pt else "" for t in tasks]
            mean = sum(pt.values()) / len(pt)
            lines.append("| fltac (per-task cluster adapter) | " + " | ".join(vals) + f" | {mean:.3f} (task mean) | | | | | | |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
