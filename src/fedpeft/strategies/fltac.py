"""FL-TAC (Ping et al. 2024, seed 001): one adapter per (client, local task), clustered on the server.

Each sampled client trains one adapter per local task: one ``ClientPlan`` per task with ``job`` = an
opaque local id (``t0``, ``t1``...) and no data key. No task label travels: the client resolves ``t<j>``
to its own j-th local task (its partition labels with at least ``min_task_examples`` records, sorted:
``local_tasks``) in ``local_data_key``, on the client, and its update carries no label either. The server
only needs how many adapters each client keeps (in this simulation it reads the count from the
partition). The server never reads job names to aggregate: it flattens every received adapter, runs K-means with K = ``num_tasks`` (scikit-learn,
``n_init`` 10, ``random_state`` derived from the run seed and round), averages the adapters of each
cluster weighted by their sample counts, and returns to each (client, local adapter) its cluster's
average, which initialises that adapter the next time the client is sampled. An adapter never seen
before starts from the initial adapter.

Clustering accuracy against the true tasks is for the simulation's evaluation only: ``begin_round`` takes
the ground truth ((client, job) -> task) from the simulation's own partition (``ServerContext.labels`` and
``client_indices``, the same ``local_tasks`` rule the clients apply), never from anything a client sends;
``aggregate`` uses it for nothing but the Hungarian-matched accuracy it logs, the per-task evaluation
adapters and the artifacts. Without that ground truth no accuracy is reported.

Per round the strategy reports ``cluster_accuracy``, ``cluster_sizes``, ``cluster_inertia`` and the
compact assignment list in ``AggregateResult.metrics``; when it knows an artifact directory (option
``artifact_dir``, else ``ServerContext.run_dir`` when the engine provides it) it also appends one line
per round to ``<dir>/cluster_assignments.jsonl`` (assignments, matched tasks, accuracy, a 2-D PCA
projection of the adapters) and writes ``<dir>/adapters_round_<t>.pt`` (the cluster adapters). The
jsonl's byte offset is part of ``state_dict`` so a resumed run truncates lines of the unfinished round.

The "global" adapter (``global_state``, saved as ``final/`` and evaluated by default) is the
sample-weighted mean of the cluster adapters: the single adapter FL-TAC would have if forced to one.
``task_evaluation_states`` gives the per-task view: each task's records evaluated with the cluster
adapter that most of that task's examples were assigned to in the last round.

Options: ``num_tasks`` (K; default the number of distinct partition labels), ``n_init`` (10),
``cluster_on`` (``adapter``, the paper; or ``delta``: the adapter minus the state it started the round
from, which keeps fresh and returning adapters comparable under partial participation),
``min_task_examples`` (1: a local task with fewer records gets no adapter), ``save_adapters`` (true),
``artifact_dir``. Server optimizers are refused: there is no single average to step on.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from fedpeft.adapters import AdapterState, flatten
from fedpeft.seeding import derive_seed
from fedpeft.strategies.base import AggregateResult, ClientPlan, ClientUpdate, TrainResult, weighted_average
from fedpeft.strategies.common import MethodStrategy
from fedpeft.strategies.registry import MethodOptions, register_method

STORE_PREFIX = "fltac_"
ASSIGNMENTS_FILE = "cluster_assignments.jsonl"


# ------------------------------------------------------------------------------------------ pure parts
def kmeans_labels(vectors: np.ndarray, k: int, seed: int, n_init: int = 10) -> tuple[np.ndarray, float]:
    """K-means cluster ids (0..k-1) of the rows of ``vectors`` and the inertia."""
    from sklearn.cluster import KMeans

    k = max(1, min(k, len(vectors)))
    km = KMeans(n_clusters=k, n_init=n_init, random_state=int(seed % (2**32)))
    labels = km.fit_predict(vectors)
    return labels.astype(int), float(km.inertia_)


def cluster_average(states: Sequence[Mapping[str, torch.Tensor]], sizes: Sequence[int], labels: Sequence[int]
                    ) -> tuple[dict[int, AdapterState], dict[int, int]]:
    """Per cluster id: sum_i (n_i / sum_j n_j) state_i over the members (sample-weighted FedAvg)."""
    members: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(labels):
        members[int(c)].append(i)
    out, totals = {}, {}
    for c, idx in sorted(members.items()):
        total = sum(sizes[i] for i in idx)
        weights = [sizes[i] / total if total > 0 else 1.0 / len(idx) for i in idx]
        out[c] = weighted_average([states[i] for i in idx], weights)
        totals[c] = int(total)
    return out, totals


def clustering_accuracy(labels: Sequence[int], truth: Sequence[str]) -> tuple[float, dict[int, str]]:
    """Fraction of items whose cluster is matched to their true task under the best one-to-one matching
    of clusters to tasks (Hungarian, ``scipy.optimize.linear_sum_assignment``); and that matching."""
    from scipy.optimize import linear_sum_assignment

    if not labels:
        return 0.0, {}
    clusters = sorted(set(int(c) for c in labels))
    tasks = sorted(set(truth))
    counts = np.zeros((len(clusters), len(tasks)), dtype=np.int64)
    for c, t in zip(labels, truth):
        counts[clusters.index(int(c)), tasks.index(t)] += 1
    rows, cols = linear_sum_assignment(counts, maximize=True)
    matched = int(counts[rows, cols].sum())
    return matched / len(labels), {clusters[r]: tasks[c] for r, c in zip(rows, cols)}


def majority_cluster(labels: Sequence[int], truth: Sequence[str], sizes: Sequence[int]) -> dict[str, int]:
    """Task -> the cluster that most of its examples (sample-weighted) were assigned to."""
    votes: dict[str, Counter] = defaultdict(Counter)
    for c, t, n in zip(labels, truth, sizes):
        votes[t][int(c)] += max(int(n), 1)
    return {t: min(v, key=lambda c: (-v[c], c)) for t, v in votes.items()}


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """Rows projected on their first two principal components (zeros where there are fewer)."""
    centred = vectors - vectors.mean(axis=0, keepdims=True)
    out = np.zeros((len(vectors), 2))
    if len(vectors) < 2:
        return out
    # SVD of the small side: U S = projections; the n x n Gram matrix keeps this cheap for wide rows.
    gram = centred @ centred.T
    values, vecs = np.linalg.eigh(gram)
    order = np.argsort(values)[::-1][:2]
    for j, i in enumerate(order):
        out[:, j] = vecs[:, i] * np.sqrt(max(values[i], 0.0))
    return out


def local_tasks(label_counts: Mapping[str, int], min_examples: int) -> list[str]:
    """A client's local tasks, in the order its adapters ``t0``, ``t1``... are numbered: its partition
    labels with at least ``min_examples`` records, sorted. The client applies it to its own records; the
    simulation's evaluation applies it to the partition to know the truth."""
    return sorted(str(label) for label, n in label_counts.items() if n >= min_examples)


def job_name(slot: int) -> str:
    return f"t{slot}"


def client_label_counts(server: Any) -> list[dict[str, int]]:
    """Each client's local tasks: partition label -> number of its training records.

    Uses ``server.client_indices`` and ``server.labels`` when the engine provides them (indices after
    unencodable records were dropped); otherwise recomputes the engine's partition from the config and
    the data (deterministic from the seed: the same call the engine makes)."""
    indices = getattr(server, "client_indices", None)
    labels = getattr(server, "labels", None)
    if indices is None or labels is None:
        from fedpeft.data.partition import partition

        cfg = server.config
        labels = server.data.labels()
        pcfg = cfg.data.partition
        indices = partition(labels, cfg.federation.num_clients, pcfg.kind, cfg.seed, alpha=pcfg.alpha,
                            min_frac=pcfg.min_frac, classes_per_client=pcfg.classes_per_client)
    return [dict(Counter(str(labels[i]) for i in idx)) for idx in indices]


def cluster_report_section(run_dir: Path, out_dir: Path) -> list[str]:
    """The run report's section: the received adapters in 2-D per round, coloured by cluster (from
    ``cluster_assignments.jsonl``); nothing when the run wrote no assignments."""
    assignments = Path(run_dir) / ASSIGNMENTS_FILE
    if not assignments.is_file():
        return []
    path = plot_cluster_rounds(assignments, Path(out_dir) / "adapter_clusters.png")
    return ["## Adapter clusters", "",
            "Every adapter received in a round, projected on its first two principal components; colour is the "
            "K-means cluster, marker the true task (never seen by the server).", "",
            f"![Adapter clusters]({Path(path).name})", ""]


# ------------------------------------------------------------------------------------------ strategy
class FLTACOptions(MethodOptions):
    num_tasks: int | None = Field(None, ge=1, description="K of K-means; null: the number of distinct partition labels.")
    n_init: int = Field(10, ge=1, description="K-means restarts (scikit-learn n_init).")
    cluster_on: Literal["adapter", "delta"] = Field(
        "adapter", description="Cluster the adapters (the paper) or their change this round (delta).")
    min_task_examples: int = Field(1, ge=1, description="A local task with fewer records gets no adapter.")
    save_adapters: bool = Field(True, description="Write the cluster adapters of each round (adapters_round_<t>.pt).")
    artifact_dir: str | None = Field(None, description="Where cluster assignments go (default: the run directory).")


@register_method
class FLTAC(MethodStrategy):
    name = "fltac"
    peft_type_refusal = "FL-TAC's per-task adapters are LoRA adapters (seed 001); other types are not checked with it"
    summary = "one adapter per (client, local task); server K-means over adapters, FedAvg within clusters"
    Options = FLTACOptions
    report_section = staticmethod(cluster_report_section)
    server_optimizer_refusal = "FL-TAC averages within K clusters; there is no single average to step on"

    def __init__(self, options=None, server_optimizer=None) -> None:
        super().__init__(options, server_optimizer)
        self.num_tasks = self.opts.num_tasks
        self.n_init = self.opts.n_init
        self.cluster_on = self.opts.cluster_on
        self.min_task_examples = self.opts.min_task_examples
        self.save_adapters = self.opts.save_adapters
        self.seed = self.opts.seed or 0
        self.artifact_dir: Path | None = Path(self.opts.artifact_dir) if self.opts.artifact_dir else None
        # server state
        self.initial: AdapterState = {}
        self.clusters: dict[int, AdapterState] = {}
        self.pending: dict[str, int] = {}  # "client/job" -> cluster id of the last aggregate, not yet delivered
        self.task_cluster: dict[str, int] = {}  # evaluation harness: task -> cluster its examples went to
        self.log_offset = 0
        # recomputed at the first begin_round, not state: how many adapters each client keeps, and the
        # simulation's ground truth "client/job" -> task (evaluation only; never sent by a client)
        self.client_jobs: list[int] | None = None
        self.truth: dict[str, str] = {}
        self._sent: dict[str, AdapterState] = {}  # cluster_on=delta: "client/job" -> state sent this round
        self._truncate_log = True  # at the first begin_round: a fresh run starts the jsonl empty

    # --- set-up / per round -----------------------------------------------------------------------
    def init_global(self, initial: AdapterState) -> AdapterState:
        self.initial = {k: v.detach().float().clone() for k, v in initial.items()}
        return super().init_global(initial)

    def begin_round(self, round_idx: int, server: Any) -> None:
        if self.artifact_dir is None and getattr(server, "run_dir", None) is not None:
            self.artifact_dir = Path(server.run_dir)
        if self._truncate_log:
            if self.artifact_dir is not None:  # lines written by a round that did not complete
                truncate_log(self.artifact_dir / ASSIGNMENTS_FILE, self.log_offset)
            self._truncate_log = False
        if self.client_jobs is None:
            counts = client_label_counts(server)
            tasks = [local_tasks(c, self.min_task_examples) for c in counts]
            self.client_jobs = [len(t) for t in tasks]
            self.truth = {f"{cid}/{job_name(j)}": task for cid, ts in enumerate(tasks) for j, task in enumerate(ts)}
            if self.num_tasks is None:
                self.num_tasks = len({lab for c in counts for lab in c})

    def _start_state(self, client_id: int, job: str, store: Any) -> AdapterState:
        stored = store.get(client_id, STORE_PREFIX + job) if store is not None else None
        state = {k: v.clone() for k, v in self.initial.items()}
        if stored is not None:
            state.update(stored)
        return state

    def configure_round(self, round_idx: int, clients: Sequence[int], global_state: AdapterState, store: Any
                        ) -> list[ClientPlan]:
        if not self.initial:  # resumed without init_global: the state_dict holds it; this is a fresh strategy
            self.initial = {k: v.clone() for k, v in global_state.items()}
        # Deliver the last round's cluster adapters to the (client, adapter) pairs they belong to.
        for key, cluster in sorted(self.pending.items()):
            cid, job = key.split("/", 1)
            if store is not None and cluster in self.clusters:
                store.put(int(cid), STORE_PREFIX + job, self.clusters[cluster])
        self.pending = {}
        self._sent = {}
        if self.client_jobs is None:
            raise RuntimeError("fltac: begin_round must run before configure_round (it learns each client's "
                               "number of local adapters)")
        plans = []
        for cid in clients:
            for j in range(self.client_jobs[cid]):
                job = job_name(j)
                start = self._start_state(cid, job, store)
                if self.cluster_on == "delta":  # server-side memory of what each adapter started from
                    self._sent[f"{cid}/{job}"] = start
                plans.append(ClientPlan(client_id=cid, downlink=start, job=job))
        return plans

    def local_data_key(self, plan: ClientPlan, label_counts: Mapping[str, int]) -> str | None:
        """On the client: adapter ``t<j>`` trains on the client's own j-th local task."""
        tasks = local_tasks(label_counts, self.min_task_examples)
        slot = int(plan.job[1:]) if plan.job[:1] == "t" and plan.job[1:].isdigit() else -1
        if not 0 <= slot < len(tasks):
            raise ValueError(f"fltac: client {plan.client_id} has {len(tasks)} local task(s); no adapter '{plan.job}'")
        return tasks[slot]

    # --- server -----------------------------------------------------------------------------------
    def aggregate(self, round_idx: int, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        if not updates:
            raise ValueError("fltac: aggregate needs at least one client update")
        keys = sorted(global_state)
        for u in updates:
            if set(u.tensors) != set(keys):
                raise ValueError(f"fltac: client {u.client_id} must upload its whole adapter")
        states = [u.tensors for u in updates]
        sizes = [int(u.num_examples) for u in updates]
        if self.cluster_on == "delta":  # (client, job) is only the return address of an adapter
            vecs = [flatten(u.tensors, keys) - flatten(self._sent.get(f"{u.client_id}/{u.job}", self.initial), keys)
                    for u in updates]
        else:
            vecs = [flatten(u.tensors, keys) for u in updates]
        matrix = torch.stack(vecs).double().numpy()
        k = int(self.num_tasks or 1)
        labels, inertia = kmeans_labels(matrix, k, derive_seed(self.seed, "fltac_kmeans", round_idx), self.n_init)
        clusters, totals = cluster_average(states, sizes, labels)
        self.clusters = clusters
        self.pending = {f"{u.client_id}/{u.job}": int(c) for u, c in zip(updates, labels)}
        total = sum(totals.values())
        mean = weighted_average([clusters[c] for c in sorted(clusters)],
                                [totals[c] / total if total else 1.0 / len(clusters) for c in sorted(clusters)])
        new_global = {kk: v.clone() for kk, v in global_state.items()}
        new_global.update(mean)

        truth = [self.truth.get(f"{u.client_id}/{u.job}") for u in updates]  # the simulation's, for evaluation
        metrics: dict[str, Any] = {
            "num_adapters": len(updates), "num_clusters": len(clusters),
            "cluster_sizes": [int((labels == c).sum()) for c in sorted(clusters)],
            "cluster_examples": [totals[c] for c in sorted(clusters)], "cluster_inertia": inertia,
        }
        matching: dict[int, str] = {}
        if all(t is not None for t in truth):
            acc, matching = clustering_accuracy(list(labels), [str(t) for t in truth])
            metrics["cluster_accuracy"] = acc
            self.task_cluster.update(majority_cluster(list(labels), [str(t) for t in truth], sizes))
        metrics["cluster_assignments"] = [
            [u.client_id, u.job, int(c), truth[i]] for i, (u, c) in enumerate(zip(updates, labels))]
        self._write_artifacts(round_idx, updates, labels, truth, matching, metrics, matrix)
        return AggregateResult(global_state=new_global, metrics=metrics)

    def _write_artifacts(self, round_idx, updates, labels, truth, matching, metrics, matrix) -> None:
        if self.artifact_dir is None:
            return
        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        xy = pca_2d(matrix)
        record = {
            "round": round_idx, "k": int(self.num_tasks or 1), "accuracy": metrics.get("cluster_accuracy"),
            "inertia": metrics["cluster_inertia"], "cluster_sizes": metrics["cluster_sizes"],
            "cluster_to_task": {str(c): t for c, t in sorted(matching.items())},
            "adapters": [{"client": u.client_id, "job": u.job, "cluster": int(c), "true_task": t,
                          "num_examples": int(u.num_examples), "xy": [float(xy[i, 0]), float(xy[i, 1])]}
                         for i, (u, c, t) in enumerate(zip(updates, labels, truth))],
        }
        path = self.artifact_dir / ASSIGNMENTS_FILE
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.log_offset = path.stat().st_size
        if self.save_adapters:
            tmp = self.artifact_dir / f"adapters_round_{round_idx}.pt.tmp"
            torch.save({"round": round_idx, "clusters": {int(c): s for c, s in self.clusters.items()},
                        "cluster_to_task": {int(c): t for c, t in matching.items()},
                        "cluster_sizes": metrics["cluster_sizes"]}, tmp)
            tmp.replace(self.artifact_dir / f"adapters_round_{round_idx}.pt")

    # --- evaluation -------------------------------------------------------------------------------
    def task_evaluation_states(self, global_state: AdapterState, store: Any) -> dict[str, AdapterState] | None:
        if not self.clusters or not self.task_cluster:
            return None
        return {task: self.clusters[c] for task, c in sorted(self.task_cluster.items()) if c in self.clusters}

    # --- resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({
            "initial": {k: v.clone() for k, v in self.initial.items()},
            "clusters": {str(c): {k: v.clone() for k, v in s.items()} for c, s in self.clusters.items()},
            "pending": dict(self.pending), "task_cluster": dict(self.task_cluster),
            "log_offset": self.log_offset, "num_tasks": self.num_tasks,
        })
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.initial = {k: torch.as_tensor(v).float().clone() for k, v in state.get("initial", {}).items()}
        self.clusters = {int(c): {k: torch.as_tensor(v).float().clone() for k, v in s.items()}
                         for c, s in state.get("clusters", {}).items()}
        self.pending = {str(k): int(v) for k, v in state.get("pending", {}).items()}
        self.task_cluster = {str(k): int(v) for k, v in state.get("task_cluster", {}).items()}
        if state.get("num_tasks") is not None:
            self.num_tasks = int(state["num_tasks"])
        self.log_offset = int(state.get("log_offset", 0))
        self._truncate_log = True


def truncate_log(path: Path, offset: int) -> None:
    """Cut ``path`` back to ``offset`` bytes (lines of a round that did not complete)."""
    if path.exists() and path.stat().st_size > offset:
        with open(path, "r+b") as fh:
            fh.truncate(offset)


def plot_cluster_rounds(assignments_path: str | Path, out_path: str | Path, rounds: Sequence[int] | None = None) -> Path:
    """One panel per round: the adapters' 2-D PCA projection (from ``cluster_assignments.jsonl``),
    coloured by cluster, marker by true task; the title gives the clustering accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(assignments_path).read_text().splitlines() if line.strip()]
    if rounds is not None:
        records = [r for r in records if r["round"] in set(rounds)]
    if not records:
        raise ValueError(f"{assignments_path}: no rounds to plot")
    n = len(records)
    cols = min(n, 5)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    markers = "osD^v<>pP*hX"
    tasks = sorted({a["true_task"] for r in records for a in r["adapters"] if a["true_task"] is not None})
    for ax, rec in zip(axes.flat, records):
        for a in rec["adapters"]:
            m = markers[tasks.index(a["true_task"]) % len(markers)] if a["true_task"] in tasks else "o"
            ax.scatter(a["xy"][0], a["xy"][1], c=f"C{a['cluster'] % 10}", marker=m, s=28)
        acc = rec.get("accuracy")
        ax.set_title(f"round {rec['round']}" + (f" acc {acc:.2f}" if acc is not None else ""), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color="gray", marker=markers[i % len(markers)], linestyle="", label=t)
               for i, t in enumerate(tasks)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8)
    fig.suptitle("FL-TAC adapters (PCA); colour = cluster, marker = true task", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
