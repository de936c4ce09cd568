"""Seeded stratified samples (suite --limit) and benchmark loading errors."""

from __future__ import annotations

import pytest

from fedpeft.data import benchmarks
from fedpeft.data.benchmarks import BenchmarkDataMissing, load_benchmark, stratified_sample

# 3 subjects of 50, 30 and 20 records
RECORDS = [{"id": i, "subject": s} for i, s in enumerate(["a"] * 50 + ["b"] * 30 + ["c"] * 20)]


def _counts(records):
    out: dict[str, int] = {}
    for r in records:
        out[r["subject"]] = out.get(r["subject"], 0) + 1
    return out


def by_subject(record):
    return record["subject"]


def test_proportional_quotas_cover_every_subject():
    # 10 = 3 (one each) + 7 shared by the 49/29/19 remaining: 7*49/97 = 3.54, 7*29/97 = 2.09, 7*19/97 = 1.37
    # -> floors 3, 2, 1 (6), the spare one to the largest remainder (a: .54) -> 1+4, 1+2, 1+1
    sample = stratified_sample(RECORDS, 10, seed=0, key=by_subject)
    assert _counts(sample) == {"a": 5, "b": 3, "c": 2}
    assert [r["id"] for r in sample] == sorted(r["id"] for r in sample)  # original order kept
    assert all(r in RECORDS for r in sample) and len({r["id"] for r in sample}) == 10
    # a budget equal to the number of subjects: one each
    assert _counts(stratified_sample(RECORDS, 3, seed=0, key=by_subject)) == {"a": 1, "b": 1, "c": 1}


def test_seeds_pick_different_records_and_the_same_seed_the_same():
    picks = {tuple(r["id"] for r in stratified_sample(RECORDS, 10, seed=s, key=by_subject)) for s in range(5)}
    assert len(picks) == 5  # 5 seeds, 5 different samples (C(50,5)*C(30,3)*C(20,2) of them)
    first = [r["id"] for r in stratified_sample(RECORDS, 10, seed=3, key=by_subject)]
    assert first == [r["id"] for r in stratified_sample(list(RECORDS), 10, seed=3, key=by_subject)]


def test_fewer_slots_than_subjects_and_no_limit():
    sample = stratified_sample(RECORDS, 2, seed=0, key=by_subject)
    assert len(sample) == 2 and len(_counts(sample)) == 2  # two different subjects, one record each
    assert stratified_sample(RECORDS, None) == RECORDS and stratified_sample(RECORDS, 500) == RECORDS
    unstratified = stratified_sample(RECORDS, 7, seed=1)
    assert len(unstratified) == 7 and unstratified != RECORDS[:7]
    with pytest.raises(ValueError, match="limit must be >= 1"):
        stratified_sample(RECORDS, 0)


def test_missing_benchmark_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmarks, "_HUB_REACHABLE", False)
    with pytest.raises(BenchmarkDataMissing, match=r"'mmlu' split 'test': no local copy.*huggingface.co is unreachable"):
        load_benchmark("mmlu", "test", tmp_path)
