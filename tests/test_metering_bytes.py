"""Bytes on the wire equal the methods' formulas (tiny model), and the report carries the same totals.

tiny config: LoRA r=4 on q_proj (64 -> 64) and v_proj (64 -> 32, 2 kv heads of 16) in 2 layers, float32.
  FedIT:     down = up = sum_modules r (d_in + d_out) x 4 bytes per job
  FFA-LoRA:  down = up = sum_modules r d_out x 4 (B only; A is rebuilt from the seed)
  FLoRA:     up = r (d_in + d_out) x 4 per module and job, down = 0 per job; after aggregation every
             registered client receives, per module, the stacked factors K r (d_in + d_out) or the dense
             d_out x d_in delta, whichever is smaller (x 4 bytes).
"""

from __future__ import annotations

import pytest

from fedpeft.federation.engine import run_experiment
from fedpeft.report.markdown import write_report
from fedpeft.report.metrics_io import load_run

R, LAYERS, NUM_CLIENTS = 4, 2, 4
MODULES = [(64, 64), (64, 32)]  # (d_in, d_out) of q_proj and v_proj
F32 = 4


def _run(tmp_path, method):
    overrides = ["federation.rounds=2", f"method.name={method}", "evaluation.before_training=false",
                 "data.eval_examples_per_task=1", "evaluation.max_new_tokens=1"]
    return run_experiment("configs/tiny.yaml", overrides, run_dir=tmp_path / method)


@pytest.mark.parametrize("method", ["fedit", "ffa_lora", "flora"])
def test_bytes_equal_formula(tmp_path, method):
    summary = _run(tmp_path, method)
    run = load_run(summary.run_dir)
    full = LAYERS * sum(R * (d_in + d_out) for d_in, d_out in MODULES) * F32
    b_only = LAYERS * sum(R * d_out for _, d_out in MODULES) * F32
    per_job = {"fedit": (full, full), "ffa_lora": (b_only, b_only), "flora": (0, full)}[method]
    assert run.client_train
    for e in run.client_train:
        assert (e["downlink_bytes"], e["uplink_bytes"]) == per_job, e
    for r, end in run.round_end.items():
        k = run.aggregate[r]["num_updates"]
        broadcast = 0
        if method == "flora":
            broadcast = LAYERS * sum(min(k * R * (d_in + d_out), d_in * d_out) for d_in, d_out in MODULES) * F32
            assert run.aggregate[r]["broadcast_bytes_per_client"] == broadcast
        assert end["uplink_bytes"] == k * per_job[1]
        assert end["downlink_bytes"] == k * per_job[0] + NUM_CLIENTS * broadcast
    assert summary.uplink_bytes == sum(e["uplink_bytes"] for e in run.round_end.values())
    # the report states the same exact totals
    text = write_report(summary.run_dir).read_text()
    assert f"| uplink, total | {summary.uplink_bytes:,} bytes" in text
    assert f"| downlink, total | {summary.downlink_bytes:,} bytes" in text
