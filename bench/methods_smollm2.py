"""Every federated method on SmolLM2-135M-Instruct with real data: loss, accuracy, bytes on the wire.

Data: ARC-Easy, OpenBookQA and BoolQ train sets from ``$FEDPEFT_DATA_DIR`` (default ``../shared/data``),
``--per-task`` records each, ``--eval-per-task`` of them held out for evaluation (generation + answer
extraction, exact match), split non-IID over clients by task (Dirichlet alpha 0.5). Every method runs
the same rounds, sampled clients, local steps and seeds; ``centralized`` runs one client holding all
the data for as many local steps per round as the federated clients do together. ``zero_shot`` is the
base model (evaluated once, before training). Heterogeneous-rank methods use ``--ranks`` per client
inside the shared rank-``--rank`` adapter.

Per method: mean client training loss of the last round, the final accuracy, and uplink / downlink
bytes per round (mean over rounds, all clients together, as the engine meters them), next to the
formula for one rank-r client (FedIT: sum over modules of r (d_in + d_out) x 4 bytes, both ways).

    python bench/methods_smollm2.py                          # all methods, ~1-2 min each on 2 cores
    python bench/methods_smollm2.py --methods fedit ffa_lora --rounds 2
    python bench/methods_smollm2.py --model tiny-llama       # seconds: a smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

METHODS = [
    ("zero_shot", "none"), ("fedit", "none"), ("centralized", "none"), ("local_only", "none"), ("fedit", "fedadam"), ("fedprox", "none"), ("scaffold", "none"),
    ("ffa_lora", "none"), ("flora", "none"), ("fedex_lora", "none"), ("fedsa_lora", "none"),
    ("zero_padding", "none"), ("hetlora", "none"), ("flexlora", "none"),
]
HETERO = {"flora", "zero_padding", "hetlora", "flexlora"}
TASKS = ["ARC-Easy", "openbookqa", "boolq"]


def data_dir(explicit: str | None) -> Path:
    path = Path(explicit or os.environ.get("FEDPEFT_DATA_DIR") or REPO.parent / "shared" / "data")
    if not (path / "commonsense").is_dir():
        sys.exit(f"no commonsense data under {path}: pass --data-dir or set FEDPEFT_DATA_DIR")
    return path


def write_subset(root: Path, per_task: int, out: Path, seed: int) -> Path:
    rng = random.Random(seed)
    rows = []
    for task in TASKS:
        records = json.loads((root / "commonsense" / task / "train.json").read_text())
        rng.shuffle(records)
        rows += [{**r, "task": task} for r in records[:per_task]]
    path = out / "commonsense_subset.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def overrides_for(args, method: str, server_optimizer: str, data_path: Path) -> list[str]:
    clients, per_round, steps = args.clients, args.per_round, args.steps
    if method == "centralized":
        clients, per_round, steps = 1, 1, args.steps * args.per_round
    ov = [
        f"model.name={args.model}", "model.threads=" + str(args.threads),
        f"peft.r={args.rank}", f"peft.alpha={2 * args.rank}", "peft.target_modules=[q_proj,k_proj,v_proj,o_proj]",
        f"data.source={data_path}", f"data.eval_examples_per_task={args.eval_per_task}", "data.template=chat",
        "data.partition.kind=dirichlet", "data.partition.alpha=0.5", "data.partition.by=task",
        f"federation.num_clients={clients}", f"federation.clients_per_round={per_round}",
        f"federation.rounds={args.rounds}", f"federation.local_steps={steps}", f"federation.batch_size={args.batch}",
        f"method.name={method}", f"method.server_optimizer.name={server_optimizer}",
        f"training.lr={args.lr}", f"training.lr_min={args.lr / 10}", f"training.max_seq_len={args.seq_len}",
        "evaluation.every_rounds=0",
        "evaluation.max_new_tokens=8", "evaluation.batch_size=32", "output.progress=false", f"seed={args.seed}",
    ]
    if server_optimizer != "none":
        # eta_s = 3e-3: adaptive steps are about eta_s per coordinate, so eta_s must be of the size of a round's
        # adapter change (~ local lr x steps); 1e-2 overshot here (degenerate generations after 3 rounds), 1e-3 barely moved.
        ov.append("method.server_optimizer.lr=0.003")
    if method == "scaffold":  # AdamW local steps: option II is refused for them (see strategies/scaffold.py)
        ov += ["method.options.control_update=mean_gradient", "method.options.local_optimizer=adamw"]
    if method in HETERO:
        ov.append(f"method.options.client_ranks={json.dumps(args.ranks)}")
    if method == "fedprox":
        ov.append("method.options.mu=0.01")
    return ov


def summarise(run_dir: Path) -> dict:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    of = lambda kind: [e for e in events if e.get("event") == kind]
    rounds = of("round_end")
    trains = of("client_train")
    last = max((e["round"] for e in trains), default=None)
    last_losses = [e["loss"] for e in trains if e["round"] == last]
    evals = [e for e in of("eval") if e.get("split") != "personal"]
    personal = [e for e in of("eval") if e.get("split") == "personal"]
    start = of("run_start")[0]
    before = [e for e in evals if e.get("round") == 0]
    after = [e for e in evals if e.get("round") != 0]
    return {
        "loss_last_round": sum(last_losses) / len(last_losses) if last_losses else None,
        "metrics": after[-1]["metrics"] if after else {},
        "initial_metrics": before[-1]["metrics"] if before else {},
        "personal": personal[-1]["metrics"] if personal else {},
        "uplink_per_round": sum(e["uplink_bytes"] for e in rounds) / len(rounds) if rounds else 0,
        "downlink_per_round": sum(e["downlink_bytes"] for e in rounds) / len(rounds) if rounds else 0,
        "failed_clients": len(of("client_failed")),
        "adapter_bytes": start.get("adapter_bytes"),
        "seconds": (of("run_end") or [{}])[0].get("seconds"),
        "phase_seconds": {k: round(sum(e.get("phase_seconds", {}).get(k, 0.0) for e in rounds), 1)
                          for k in ("train", "aggregate", "evaluate", "checkpoint")},
    }


def accuracy(metrics: dict) -> float | None:
    for key in ("exact_match", "accuracy", "acc"):
        if key in metrics:
            return metrics[key]
    nums = [v for v in metrics.values() if isinstance(v, (int, float))]
    return nums[0] if nums else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", help="method names (fedit+fedadam for a composition); default: all")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data-dir")
    parser.add_argument("--per-task", type=int, default=200)
    parser.add_argument("--eval-per-task", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=160)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--ranks", type=int, nargs="*", default=[8, 4, 4, 2, 2, 8, 4, 4, 2, 2])
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="keep the run directories under this folder (default: a temporary one)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "methods_smollm2.md"))
    parser.add_argument("--from-runs", help="only rebuild the table from run directories kept by --keep")
    args = parser.parse_args()
    if args.from_runs:
        rebuild(args)
        return

    import torch

    torch.set_num_threads(args.threads)
    from fedpeft.federation.engine import run_experiment

    wanted = METHODS
    if args.methods:
        wanted = [(m.split("+")[0], m.split("+")[1] if "+" in m else "none") for m in args.methods]
    # zero_shot is the base model: its accuracy is the before-training evaluation of the first trained run
    # (the engine runs no round without client plans), so it costs no run of its own.
    zero_shot = ("zero_shot", "none") in wanted
    wanted = [w for w in wanted if w[0] != "zero_shot"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(args.keep) if args.keep else Path(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        data_path = write_subset(data_dir(args.data_dir), args.per_task, tmp, args.seed)
        for index, (method, so) in enumerate(wanted):
            label = method if so == "none" else f"{method}+{so}"
            evaluate_base = zero_shot and index == 0
            run_dir = tmp / label
            t0 = time.perf_counter()
            print(f"== {label}", flush=True)
            try:
                overrides = overrides_for(args, method, so, data_path)
                overrides.append(f"evaluation.before_training={'true' if evaluate_base else 'false'}")
                summary = run_experiment(REPO / "configs" / "tiny.yaml", overrides=overrides, run_dir=run_dir)
                row = summarise(run_dir)
                if evaluate_base:
                    rows.append({"method": "zero_shot (base model)", "metrics": summary.initial_metrics,
                                 "uplink_per_round": 0, "downlink_per_round": 0, "wall": 0.0})
            except Exception as exc:  # report and go on: one broken method must not hide the others
                row = {"error": f"{type(exc).__name__}: {exc}"}
            row.update(method=label, wall=time.perf_counter() - t0)
            print(json.dumps({k: v for k, v in row.items() if k != "metrics"}), flush=True)
            rows.append(row)
    write_table(args, rows)


def rebuild(args) -> None:
    """The table from kept run directories, in the order of METHODS (zero_shot from a before-training eval)."""
    root = Path(args.from_runs)
    rows = []
    for method, so in METHODS:
        label = method if so == "none" else f"{method}+{so}"
        run_dir = root / label
        if method == "zero_shot" or not (run_dir / "metrics.jsonl").is_file():
            continue
        row = summarise(run_dir)
        row.update(method=label, wall=row.get("seconds") or 0.0)
        if row.get("initial_metrics"):
            rows.insert(0, {"method": "zero_shot (base model)", "metrics": row["initial_metrics"],
                            "uplink_per_round": 0, "downlink_per_round": 0, "wall": 0.0})
        rows.append(row)
    write_table(args, rows)


def write_table(args, rows) -> None:
    fmt_b = lambda b: (f"{b / 1e6:.2f} MB" if b >= 1e6 else f"{b / 1e3:.1f} kB") if b else "0"
    fedit = next((r for r in rows if r.get("method") == "fedit" and "error" not in r), None)
    ratio = lambda r: f"{r['uplink_per_round'] / fedit['uplink_per_round']:.2f}" if fedit and fedit["uplink_per_round"] else ""
    lines = [
        f"# Methods on {args.model}: {args.rounds} rounds, {args.per_round} of {args.clients} clients per round, "
        f"{args.steps} local steps x batch {args.batch}, LoRA r={args.rank} on q/k/v/o, "
        f"ARC-Easy + OBQA + BoolQ ({args.per_task} train each, {args.eval_per_task} held out each), "
        f"heterogeneous ranks {args.ranks}",
        "",
        "| method | last-round train loss | accuracy (global model) | per-client accuracy, mean ± std | uplink / round "
        "| uplink vs FedIT | downlink / round | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['method']} | error: {row['error'][:120]} | | | | | | {row['wall']:.0f} |")
            continue
        loss = "-" if row.get("loss_last_round") is None else f"{row['loss_last_round']:.3f}"
        acc = accuracy(row.get("metrics", {}))
        acc_s = "" if acc is None else f"{acc:.3f}"
        if row["method"] == "local_only":
            acc_s += " (= base model)"
        elif row["method"].split("+")[0] == "fedsa_lora":
            acc_s += " (global A + mean personal B)"
        pers = row.get("personal") or {}
        pers_s = f"{pers['personal/mean']:.3f} ± {pers['personal/std']:.3f}" if "personal/mean" in pers else ""
        failed = f" ({row['failed_clients']} client failures)" if row.get("failed_clients") else ""
        wall = f"{row['wall']:.0f}" if row.get("wall") else "-"
        lines.append(f"| {row['method']}{failed} | {loss} | {acc_s} | {pers_s} | {fmt_b(row['uplink_per_round'])} | {ratio(row)} | "
                     f"{fmt_b(row['downlink_per_round'])} | {wall} |")
    if fedit:
        lines += ["", f"One client's full adapter (FedIT's per-client uplink = downlink, sum over modules of "
                      f"r (d_in + d_out) x 4 bytes): {fmt_b(fedit['adapter_bytes'])}; per round x {args.per_round} clients."]
    lines += ["", "Command: `python bench/methods_smollm2.py " + " ".join(sys.argv[1:]) + "`", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
