"""Per-round time and peak memory: in-process engine vs a Flower rehearsal (SuperLink + SuperNodes on
127.0.0.1), warm worker and cold (model built in every ClientApp process), and warm with Flower's SecAgg+
(``secagg``: what secure aggregation costs in bytes and seconds per protocol stage), same config and seed.

    python bench/deploy_flower.py [--rounds 4] [--modes in-process,warm,cold,secagg] [key=value ...]

Memory of a rehearsal is the sum of the resident set sizes of every process of the federation (SuperLink,
ServerApp, SuperNodes, SuperExecs, ClientApps, warm workers), sampled every 0.25 s; the peak of that sum
and the peak per kind of process are reported. Time per round is the server's ``round_end`` seconds;
``deploy_round`` events split the wait for a client into its training, its build and the rest (Flower:
process start, polling, transfer).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

KINDS = [("flwr-serverapp", "serverapp"), ("flower-superlink", "superlink"), ("flower-supernode", "supernode"),
         ("flower-superexec", "superexec"), ("flwr-clientapp", "clientapp"),
         ("fedpeft.deploy.flower.worker", "warm worker")]


def kind_of(proc: psutil.Process) -> str | None:
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    for needle, kind in KINDS:
        if needle in cmd:
            return kind
    return None


class MemorySampler(threading.Thread):
    """Sums RSS over the processes in ``groups()`` (process-group ids): warm workers outlive the ClientApp
    that started them and are re-parented, but stay in their SuperNode's process group."""

    def __init__(self, groups, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.groups = groups
        self.interval = interval
        self.stop_event = threading.Event()
        self.peak_total = 0.0
        self.peak_by_kind: dict[str, float] = {}
        self.count_by_kind: dict[str, set[int]] = {}

    def run(self) -> None:
        import os

        while not self.stop_event.is_set():
            total, by_kind = 0.0, {}
            groups = self.groups()
            procs = {}
            for root in groups:  # the SuperLink starts its SuperExec/ServerApp in new sessions: follow parents
                try:
                    procs.update({c.pid: c for c in psutil.Process(root).children(recursive=True)})
                except psutil.NoSuchProcess:
                    pass
            for proc in psutil.process_iter():
                try:
                    if os.getpgid(proc.pid) in groups:
                        procs[proc.pid] = proc
                except (psutil.NoSuchProcess, ProcessLookupError):
                    continue
            for proc in procs.values():
                try:
                    kind = kind_of(proc)
                    rss = proc.memory_info().rss / 2**20
                except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
                    continue
                if kind is None:
                    continue
                total += rss
                by_kind[kind] = by_kind.get(kind, 0.0) + rss
                self.count_by_kind.setdefault(kind, set()).add(proc.pid)
            self.peak_total = max(self.peak_total, total)
            for kind, rss in by_kind.items():
                self.peak_by_kind[kind] = max(self.peak_by_kind.get(kind, 0.0), rss)
            time.sleep(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()


def events(run_dir: Path, kind: str) -> list[dict]:
    from fedpeft.federation.metrics_log import read_events

    return [e for e in read_events(run_dir / "metrics.jsonl") if e["event"] == kind]


def round_summary(run_dir: Path) -> dict:
    rounds = events(run_dir, "round_end")
    out = {"round_seconds": [round(e["seconds"], 2) for e in rounds],
           "train_phase_seconds": [round(e["phase_seconds"]["train"], 2) for e in rounds]}
    later = rounds[1:] or rounds
    out["round1_seconds"] = round(rounds[0]["seconds"], 2)
    out["later_round_mean_seconds"] = round(statistics.mean(e["seconds"] for e in later), 2)
    deploy = events(run_dir, "deploy_round")
    if deploy and deploy[0].get("secagg"):
        stages: dict[str, dict[str, list[float]]] = {}
        for e in deploy:
            for st in e["stages"]:
                acc = stages.setdefault(st["stage"], {"seconds": [], "down_bytes": [], "up_bytes": []})
                for k in acc:
                    acc[k].append(st[k])
        out["secagg_stages_mean"] = {name: {k: round(statistics.mean(v), 3) for k, v in acc.items()}
                                     for name, acc in stages.items()}
        out["secagg_message_bytes_per_round"] = {"down": statistics.mean(e["message_down_bytes"] for e in deploy),
                                                 "up": statistics.mean(e["message_up_bytes"] for e in deploy)}
        out["secagg_error_bound"] = max(e["error_bound"] for e in deploy)
    elif deploy:
        out["message_bytes_per_round"] = {"down": statistics.mean(e["message_down_bytes"] for e in deploy),
                                          "up": statistics.mean(e["message_up_bytes"] for e in deploy)}
        split = []
        for e in deploy:
            for client in e["clients"].values():
                if not client.get("ok"):
                    continue
                split.append({"round": e["round"], "reply": round(client["reply_seconds"], 2),
                              "train": round(client["client_seconds"], 2),
                              **{k.removesuffix("_seconds"): round(client[k], 2) for k in
                                 ("build_seconds", "queue_seconds", "startup_seconds", "handler_seconds",
                                  "return_seconds") if k in client}})
        out["client_reply_split"] = split
    trains = events(run_dir, "client_train")
    out["client_train_seconds_mean"] = round(statistics.mean(e["seconds"] for e in trains), 3)
    return out


def run_in_process(cfg, work: Path) -> dict:
    from fedpeft.federation.engine import run_experiment

    start = time.perf_counter()
    summary = run_experiment(cfg, run_dir=work / "in-process")
    return {"mode": "in-process", "total_seconds": round(time.perf_counter() - start, 1),
            "peak_rss_mb_total": round(summary.peak_rss_mb, 1), **round_summary(summary.run_dir)}


def run_rehearsal(cfg, work: Path, warm: bool, secagg: bool = False) -> dict:
    from fedpeft.deploy.flower.app import write_app
    from fedpeft.deploy.flower.local import LocalFederation, rehearsal_node_configs

    mode = "rehearsal-secagg" if secagg else "rehearsal-warm" if warm else "rehearsal-cold"
    base = work / mode
    run_dir = base / "run"
    app = write_app(base / "app", cfg, run_dir=str(run_dir), secagg=True if secagg else None)
    nodes = rehearsal_node_configs(cfg.federation.num_clients, cfg.federation.num_clients, base / "stores",
                                   warm_worker=warm)
    federation = LocalFederation(base, nodes)
    sampler = MemorySampler(federation.process_groups)
    sampler.start()
    start = time.perf_counter()
    with federation:
        up = time.perf_counter() - start
        run_id, status = federation.run(app, timeout=1800)
    total = time.perf_counter() - start
    sampler.stop()
    if status != "finished:completed":
        raise RuntimeError(f"{mode}: run {run_id} {status}; logs in {base / 'logs'}")
    return {"mode": mode, "total_seconds": round(total, 1), "federation_start_seconds": round(up, 1),
            "peak_rss_mb_total": round(sampler.peak_total, 1),
            "peak_rss_mb_by_kind": {k: round(v, 1) for k, v in sampler.peak_by_kind.items()},
            "processes_by_kind": {k: len(v) for k, v in sampler.count_by_kind.items()},
            **round_summary(run_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=2, help="clients = SuperNodes, all sampled each round")
    parser.add_argument("--modes", default="in-process,warm,cold")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from fedpeft.config import load_config

    cfg = load_config(args.config, [f"federation.rounds={args.rounds}", f"federation.num_clients={args.clients}",
                                    f"federation.clients_per_round={args.clients}", "output.report=false",
                                    "evaluation.every_rounds=0", *args.overrides])
    work = Path(tempfile.mkdtemp(prefix="fedpeft-bench-deploy-"))
    results = []
    for mode in args.modes.split(","):
        if mode == "in-process":
            results.append(run_in_process(cfg, work))
        else:
            results.append(run_rehearsal(cfg, work, warm=(mode in ("warm", "secagg")), secagg=(mode == "secagg")))
        print(json.dumps(results[-1]), flush=True)
    report = {"config": args.config, "rounds": args.rounds, "clients": args.clients, "cpu_count": psutil.cpu_count(),
              "load_avg_1m": round(psutil.getloadavg()[0], 2), "results": results}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1), file=sys.stderr)


if __name__ == "__main__":
    main()
