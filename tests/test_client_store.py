"""The versioned ClientStore: each write is a new file for its round, the index (committed with a
checkpoint) says which version is current, and garbage collection keeps exactly the indexed versions."""

from __future__ import annotations

import pytest
import torch

from fedpeft.federation.client_store import ClientStore


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_each_write_is_a_version_of_its_round_and_reads_return_the_indexed_one(tmp_path):
    store = ClientStore(tmp_path)
    store.begin_round(1)
    store.put(0, "b", {"x": torch.tensor([1.0])})
    store.begin_round(3)
    store.put(0, "b", {"x": torch.tensor([3.0])})
    # both versions are on disk until garbage collection; the index points at round 3
    assert _files(tmp_path) == ["0/b.r1.safetensors", "0/b.r3.safetensors"]
    assert store.snapshot() == {"0/b": 3}
    assert torch.equal(store.get(0, "b")["x"], torch.tensor([3.0]))
    assert store.get(1, "b") is None and store.get(0, "other") is None and len(store) == 1


def test_restoring_an_older_index_reads_the_older_version_and_collects_the_newer(tmp_path):
    """A run killed in round 3 resumes with round 2's index: the round-3 file is an orphan."""
    store = ClientStore(tmp_path)
    store.begin_round(2)
    store.put(5, "c", {"x": torch.tensor([2.0])})
    committed = store.snapshot()
    store.begin_round(3)
    store.put(5, "c", {"x": torch.tensor([9.0])})
    store.put(6, "c", {"x": torch.tensor([9.0])})
    (tmp_path / "5" / "c.r3.tmp").write_bytes(b"half-written")  # a kill inside put

    resumed = ClientStore(tmp_path)
    resumed.restore(committed)
    assert torch.equal(resumed.get(5, "c")["x"], torch.tensor([2.0]))
    assert resumed.get(6, "c") is None
    assert _files(tmp_path) == ["5/c.r2.safetensors"]


def test_garbage_collection_keeps_exactly_the_indexed_versions(tmp_path):
    store = ClientStore(tmp_path)
    for round_idx in (1, 2, 3):
        store.begin_round(round_idx)
        store.put(0, "a", {"x": torch.full((2,), float(round_idx))})
        if round_idx != 2:
            store.put(1, "a", {"x": torch.full((2,), float(round_idx))})
    store.collect_garbage()
    assert _files(tmp_path) == ["0/a.r3.safetensors", "1/a.r3.safetensors"]
    assert store.snapshot() == {"0/a": 3, "1/a": 3}


def test_names_with_a_slash_or_empty_are_refused(tmp_path):
    store = ClientStore(tmp_path)
    for bad in ("", "a/b"):
        with pytest.raises(ValueError, match="client store name"):
            store.put(0, bad, {"x": torch.zeros(1)})
