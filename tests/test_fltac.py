"""FL-TAC: K-means over received adapters recovers the tasks, cluster averages are exact, assignments go
back to each (client, local task), the server never reads task names, and the engine runs it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from fedpeft.strategies.base import ClientUpdate, TrainResult
from fedpeft.strategies.fltac import (
    ASSIGNMENTS_FILE,
    cluster_average,
    clustering_accuracy,
    local_tasks,
    plot_cluster_rounds,
)
from strategy_fakes import MODULES, MemoryStore, a_key, adapter, b_key, make

R = 4
TASKS = ["arithmetic", "reverse", "uppercase", "sort_numbers"]
# client -> its local tasks (every task on at least two clients)
CLIENT_TASKS = {0: ["arithmetic", "reverse"], 1: ["reverse", "uppercase", "sort_numbers"], 2: ["arithmetic", "uppercase"],
                3: ["sort_numbers", "arithmetic"], 4: ["uppercase", "reverse", "sort_numbers"]}
# the ground truth a simulation knows: (client, job) -> task; client adapters t0, t1... follow sorted labels
TRUTH = {(c, f"t{j}"): t for c, ts in CLIENT_TASKS.items() for j, t in enumerate(sorted(ts))}


def truth_of(u):
    return TRUTH[(u.client_id, u.job)]


def centres(scale=10.0):
    """One well-separated adapter per task."""
    return {t: {k: v * scale for k, v in adapter(R, seed=100 + i).items()} for i, t in enumerate(TASKS)}


def fake_server(tmp_path=None, client_tasks=CLIENT_TASKS, per_task=5):
    """What begin_round reads: per-record labels and each client's record indices (and a run dir)."""
    labels, indices = [], []
    for cid in sorted(client_tasks):
        idx = []
        for t in client_tasks[cid]:
            idx.extend(range(len(labels), len(labels) + per_task))
            labels.extend([t] * per_task)
        indices.append(idx)
    return SimpleNamespace(labels=labels, client_indices=indices, run_dir=tmp_path)


def synthetic_updates(noise=0.01, seed=0, jobs=None):
    """One adapter per (client, local task): the task's centre + small noise; sizes differ."""
    g = torch.Generator().manual_seed(seed)
    cs = centres()
    updates = []
    for cid, tasks in CLIENT_TASKS.items():
        for j, t in enumerate(sorted(tasks)):
            tensors = {k: v + noise * torch.randn(v.shape, generator=g) for k, v in cs[t].items()}
            job = jobs(cid, j) if jobs else f"t{j}"
            updates.append(ClientUpdate(client_id=cid, tensors=tensors, num_examples=3 + 7 * cid + 2 * j, job=job,
                                        metrics={"loss": 1.0}))
    return updates


def expected_task_average(updates, task):
    members = [u for u in updates if truth_of(u) == task]
    total = sum(u.num_examples for u in members)
    return {k: sum(u.tensors[k] * (u.num_examples / total) for u in members) for k in members[0].tensors}


def test_kmeans_recovers_well_separated_tasks_and_averages_exactly(tmp_path):
    strategy = make("fltac", r=R, num_tasks=len(TASKS), seed=7)
    glob = strategy.init_global(adapter(R, seed=1, zero_b=True))
    strategy.begin_round(1, fake_server())  # the simulation's ground truth, for the accuracy only
    updates = synthetic_updates()
    agg = strategy.aggregate(1, glob, updates)
    assert agg.metrics["cluster_accuracy"] == 1.0
    assert sorted(agg.metrics["cluster_sizes"]) == sorted(sum(t == task for ts in CLIENT_TASKS.values() for t in ts)
                                                          for task in TASKS)
    assignment = {(c, j): cl for c, j, cl, _ in agg.metrics["cluster_assignments"]}
    for task in TASKS:
        members = [u for u in updates if truth_of(u) == task]
        clusters = {assignment[(u.client_id, u.job)] for u in members}
        assert len(clusters) == 1
        got = strategy.clusters[clusters.pop()]
        want = expected_task_average(updates, task)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5)
    # the single "global" adapter is the sample-weighted mean of everything received
    total = sum(u.num_examples for u in updates)
    for k in glob:
        torch.testing.assert_close(agg.global_state[k], sum(u.tensors[k] * u.num_examples / total for u in updates),
                                   rtol=0, atol=1e-5)


def test_cluster_average_is_the_weighted_mean_of_members():
    states = [{"x": torch.tensor([float(i), 2.0 * i])} for i in range(5)]
    avgs, totals = cluster_average(states, [1, 2, 3, 4, 5], [0, 1, 0, 1, 1])
    assert totals == {0: 4, 1: 11}
    torch.testing.assert_close(avgs[0]["x"], (1 * states[0]["x"] + 3 * states[2]["x"]) / 4)
    torch.testing.assert_close(avgs[1]["x"], (2 * states[1]["x"] + 4 * states[3]["x"] + 5 * states[4]["x"]) / 11)


def test_hungarian_clustering_accuracy():
    acc, matching = clustering_accuracy([0, 0, 1, 1, 1, 2], ["a", "a", "b", "b", "a", "c"])
    assert acc == pytest.approx(5 / 6)
    assert matching == {0: "a", 1: "b", 2: "c"}
    # cluster ids are arbitrary: a relabelling scores the same
    assert clustering_accuracy([5, 5, 3, 3, 3, 9], ["a", "a", "b", "b", "a", "c"])[0] == pytest.approx(5 / 6)


def test_aggregation_never_reads_job_names_or_task_labels():
    """Renamed jobs and no ground truth give the same clusters and averages (the truth only feeds the log)."""
    a = make("fltac", r=R, num_tasks=len(TASKS), seed=7)
    b = make("fltac", r=R, num_tasks=len(TASKS), seed=7)
    glob = a.init_global(adapter(R, seed=1, zero_b=True))
    b.init_global(glob)
    a.begin_round(1, fake_server())
    ua = synthetic_updates()
    ub = synthetic_updates(jobs=lambda c, j: f"zz{97 - 13 * j}")
    ra, rb = a.aggregate(1, glob, ua), b.aggregate(1, glob, ub)
    assert "cluster_accuracy" not in rb.metrics
    assert [x[2] for x in ra.metrics["cluster_assignments"]] == [x[2] for x in rb.metrics["cluster_assignments"]]
    for c in a.clusters:
        for k in glob:
            assert torch.equal(a.clusters[c][k], b.clusters[c][k])


def test_each_client_task_gets_its_cluster_adapter_next_round(tmp_path):
    strategy = make("fltac", r=R, num_tasks=len(TASKS), seed=7, artifact_dir=str(tmp_path))
    glob = strategy.init_global(adapter(R, seed=1, zero_b=True))
    store = MemoryStore()
    server = fake_server()
    strategy.begin_round(1, server)
    plans = strategy.configure_round(1, [0, 1, 2, 3, 4], glob, store)
    # one plan per (client, local task); opaque job ids; no task label on the wire: the client resolves its job
    assert [(p.client_id, p.job) for p in plans] == [(c, f"t{j}") for c in CLIENT_TASKS for j in range(len(CLIENT_TASKS[c]))]
    for p in plans:
        assert p.data_key is None and not any(t in json.dumps([p.job, p.info, p.data_key]) for t in TASKS)
        counts = {t: 5 for t in CLIENT_TASKS[p.client_id]}
        assert strategy.local_data_key(p, counts) == TRUTH[(p.client_id, p.job)]
    for p in plans:  # round 1 starts from the initial adapter
        for k in glob:
            assert torch.equal(p.downlink[k], glob[k])
    cs = centres()
    updates = []
    for p in plans:
        trained = {k: v.clone() for k, v in cs[TRUTH[(p.client_id, p.job)]].items()}
        up = strategy.client_update(1, p, trained, TrainResult(1, 1, 5, 1.0, 1.0, 0.1, 0.0), store)
        assert not any(t in json.dumps(up.metrics) for t in TASKS)  # no label goes up either
        updates.append(up)
    agg = strategy.aggregate(1, glob, updates)
    assert agg.metrics["cluster_accuracy"] == 1.0
    strategy.begin_round(2, server)
    plans2 = strategy.configure_round(2, [1, 3], agg.global_state, store)
    for p in plans2:
        for k in glob:
            torch.testing.assert_close(p.downlink[k], cs[TRUTH[(p.client_id, p.job)]][k])
    # per-task evaluation: each task scored with the cluster adapter its clients were assigned
    per_task = strategy.task_evaluation_states(agg.global_state, store)
    assert set(per_task) == set(TASKS)
    for t in TASKS:
        torch.testing.assert_close(per_task[t][a_key(next(iter(MODULES)))], cs[t][a_key(next(iter(MODULES)))])
    # artifacts: one jsonl line per round, the cluster adapters of the round
    lines = [json.loads(x) for x in (tmp_path / ASSIGNMENTS_FILE).read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["round"] == 1 and lines[0]["accuracy"] == 1.0
    assert len(lines[0]["adapters"]) == len(plans) and all(len(a["xy"]) == 2 for a in lines[0]["adapters"])
    saved = torch.load(tmp_path / "adapters_round_1.pt")
    assert len(saved["clusters"]) == len(TASKS)
    assert plot_cluster_rounds(tmp_path / ASSIGNMENTS_FILE, tmp_path / "clusters.png").exists()


def test_resume_truncates_the_assignment_log_and_restores_clusters(tmp_path):
    a = make("fltac", r=R, num_tasks=len(TASKS), seed=7, artifact_dir=str(tmp_path))
    glob = a.init_global(adapter(R, seed=1, zero_b=True))
    server = fake_server()
    a.begin_round(1, server)
    a.aggregate(1, glob, synthetic_updates(seed=1))
    saved = a.state_dict()
    a.aggregate(2, glob, synthetic_updates(seed=2))  # a round that "did not complete"
    assert len((tmp_path / ASSIGNMENTS_FILE).read_text().splitlines()) == 2
    b = make("fltac", r=R, num_tasks=len(TASKS), seed=7, artifact_dir=str(tmp_path))
    b.load_state_dict(saved)
    b.begin_round(2, server)
    assert len((tmp_path / ASSIGNMENTS_FILE).read_text().splitlines()) == 1
    assert b.pending == saved["pending"] and b.pending  # assignments not yet delivered survive
    for c in b.clusters:
        for k in glob:
            assert torch.equal(b.clusters[c][k], saved["clusters"][str(c)][k])
    store = MemoryStore()
    plans = b.configure_round(2, [0], glob, store)
    assert len(plans) == len(CLIENT_TASKS[0])


def test_server_optimizers_are_refused():
    with pytest.raises(ValueError, match="cannot be combined with server optimizer"):
        make("fltac", server_optimizer="fedadam", r=R)


def test_engine_runs_fltac_on_the_tiny_model(tmp_path):
    from fedpeft.federation.engine import run_experiment

    art = tmp_path / "art"
    summary = run_experiment("configs/tiny.yaml", [
        "method.name=fltac", "federation.rounds=2", "evaluation.every_rounds=0", "evaluation.before_training=false",
        f"method.options.artifact_dir={art}",
    ], run_dir=tmp_path / "run")
    events = [json.loads(x) for x in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "client_train"]
    agg = [e for e in events if e["event"] == "aggregate"]
    assert len(agg) == 2 and all(0 < e["cluster_accuracy"] <= 1 for e in agg)
    assert all(e["num_clusters"] <= 3 for e in agg)
    # several adapters per sampled client, each a full adapter up and down
    assert len(train) > 2 * 2 and all(e["job"].startswith("t") for e in train)
    assert all(e["uplink_bytes"] == e["downlink_bytes"] for e in train)
    assert not [e for e in events if e["event"] == "client_failed"]
    lines = (art / ASSIGNMENTS_FILE).read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2]
    assert (art / "adapters_round_2.pt").exists()


def test_cluster_on_delta_separates_tasks_whose_adapters_started_far_apart():
    """Adapters that returned from different starting points: clustering the raw adapters groups them by
    start, clustering the update (adapter - what the server sent) groups them by task."""
    cs = centres(scale=1.0)
    starts = {cid: adapter(R, seed=500 + cid) for cid in CLIENT_TASKS}
    starts = {cid: {k: 50 * v for k, v in s.items()} for cid, s in starts.items()}
    results = {}
    for mode in ("adapter", "delta"):
        strategy = make("fltac", r=R, num_tasks=len(TASKS), seed=7, cluster_on=mode)
        glob = strategy.init_global(adapter(R, seed=1, zero_b=True))
        strategy.begin_round(1, fake_server())
        updates = []
        for cid, tasks in CLIENT_TASKS.items():
            for j, t in enumerate(sorted(tasks)):
                strategy._sent[f"{cid}/t{j}"] = starts[cid]
                updates.append(ClientUpdate(client_id=cid, tensors={k: starts[cid][k] + cs[t][k] for k in glob},
                                            num_examples=5, job=f"t{j}"))
        results[mode] = strategy.aggregate(1, glob, updates).metrics["cluster_accuracy"]
    assert results["delta"] == 1.0 and results["adapter"] < 1.0


def test_local_tasks_and_a_job_the_client_does_not_have():
    assert local_tasks({"b": 3, "a": 1, "c": 2}, 2) == ["b", "c"]
    strategy = make("fltac", r=R, min_task_examples=2)
    from fedpeft.strategies.base import ClientPlan

    assert strategy.local_data_key(ClientPlan(0, {}, job="t1"), {"b": 3, "a": 1, "c": 2}) == "c"
    with pytest.raises(ValueError, match="no adapter 't2'"):
        strategy.local_data_key(ClientPlan(0, {}, job="t2"), {"b": 3, "a": 1, "c": 2})
