"""A split run killed mid-round (or while checkpointing) and resumed ends bit-identical to an uninterrupted one:
the per-client trunks and client parts live in the client store, the defence noise is seeded per job."""

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY_CONFIG, assert_same_tensors, final_adapter, kill_and_resume, reference_run, run_events

OVERRIDES = ["federation.rounds=3", "evaluation.every_rounds=0", "evaluation.before_training=false",
             "method.name=sfl", "method.options.cut=1-2", "method.options.trunk=per_client",
             "method.options.aggregate_client_parts=false", "method.options.activation_noise=0.05"]


def _store_files(run_dir):
    return {p.relative_to(run_dir / "client_store"): load_file(str(p))
            for p in sorted((run_dir / "client_store").glob("*/*.safetensors"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(TINY_CONFIG, OVERRIDES, tmp_path_factory.mktemp("sfl_ref") / "run")


@pytest.mark.parametrize("kill_at", ["client:2:1"])  # mid-round: staged private state matters
def test_split_run_resumes_bit_identically(tmp_path, reference, kill_at):
    run_dir = tmp_path / "run"
    kill_and_resume(TINY_CONFIG, OVERRIDES, run_dir, kill_at)
    assert_same_tensors(final_adapter(reference), final_adapter(run_dir))
    ref_store, got_store = _store_files(reference), _store_files(run_dir)
    assert any("sfl_trunk" in str(p) for p in ref_store) and any("sfl_client_parts" in str(p) for p in ref_store)
    assert ref_store.keys() == got_store.keys()
    for path in ref_store:
        assert all(torch.equal(ref_store[path][k], got_store[path][k]) for k in ref_store[path]), path

    def train(run):
        return [(e["round"], e["client"], e["losses"]) for e in run_events(run, "client_train")]

    def split_bytes(run):
        return [e["split_clients"] for e in run_events(run, "aggregate")]

    assert train(run_dir) == train(reference)
    assert split_bytes(run_dir) == split_bytes(reference)
