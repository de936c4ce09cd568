"""The report and compare commands build their files from a synthetic metrics.jsonl."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedpeft.cli import app
from fedpeft.report import compare_runs, write_report
from fedpeft.report.metrics_io import load_run, read_events

ROUNDS = 3
CLIENTS = [0, 1, 2]
UPLINK = 4096  # bytes per client job
DOWNLINK = 8192


def synthetic_events(seed: int = 0, method: str = "fedit", exact_match=(0.125, 0.25, 0.375, 0.4375)) -> list[dict]:
    """A complete 3-round run: 3 clients per round, eval before round 1 and after each round."""
    t = 1_000.0
    config = {"name": "synthetic", "seed": seed, "model": {"name": "tiny-llama"}, "peft": {"type": "lora", "r": 4, "alpha": 8.0,
              "target_modules": ["q_proj", "v_proj"]}, "federation": {"num_clients": 3, "clients_per_round": 3, "rounds": ROUNDS,
              "local_steps": 2, "batch_size": 2}, "method": {"name": method}, "output": {"dir": "runs"}}
    events = [
        {"event": "run_start", "time": t, "run_dir": "x", "resumed_from_round": 0, "model_source": "bundled:tiny-llama",
         "model_load_seconds": 0.5, "trainable_params": 1024, "adapter_bytes": UPLINK, "base_params": 100_000,
         "num_clients": 3, "method": method, "config": config},
        {"event": "partition", "time": t, "clients": [{"client": c, "examples": 10 + c, "labels": {"a": 5, "b": 5 + c}} for c in CLIENTS]},
        {"event": "eval", "time": t + 1, "round": 0, "metrics": {"exact_match": exact_match[0], "arithmetic/exact_match": 0.0},
         "examples": 16, "seconds": 0.2},
    ]
    cum_up = cum_down = 0
    for r in range(1, ROUNDS + 1):
        for c in CLIENTS:
            loss = 3.0 - 0.5 * r - 0.1 * c + 0.01 * seed
            events.append({"event": "client_train", "time": t + r * 10 + c, "round": r, "client": c, "job": "default", "steps": 2,
                           "loss": loss, "last_loss": loss - 0.05, "losses": [loss + 0.05, loss - 0.05], "lr": 1e-3,
                           "examples": 10 + c, "examples_seen": 4, "tokens": 100, "seconds": 1.0 + 0.1 * c,
                           "downlink_bytes": DOWNLINK, "uplink_bytes": UPLINK})
        events.append({"event": "aggregate", "time": t + r * 10 + 5, "round": r, "clients": CLIENTS, "num_updates": 3, "seconds": 0.05})
        events.append({"event": "eval", "time": t + r * 10 + 6, "round": r,
                       "metrics": {"exact_match": exact_match[r], "arithmetic/exact_match": 0.1 * r}, "examples": 16, "seconds": 0.25})
        cum_up += UPLINK * len(CLIENTS)
        cum_down += DOWNLINK * len(CLIENTS)
        events.append({"event": "round_end", "time": t + r * 10 + 7, "round": r, "seconds": 4.0, "uplink_bytes": UPLINK * 3,
                       "downlink_bytes": DOWNLINK * 3, "cum_uplink_bytes": cum_up, "cum_downlink_bytes": cum_down,
                       "phase_seconds": {"train": 3.3, "aggregate": 0.05, "evaluate": 0.25, "checkpoint": 0.1},
                       "peak_rss_mb": 500.0 + r, "lr": 1e-3})
    events.append({"event": "run_end", "time": t + 50, "rounds": ROUNDS, "seconds": 13.5,
                   "final_metrics": {"exact_match": exact_match[-1], "arithmetic/exact_match": 0.3},
                   "peak_rss_mb": 503.0, "cum_uplink_bytes": cum_up, "cum_downlink_bytes": cum_down})
    return events


def write_log(run_dir: Path, events: list[dict], tail: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(e) + "\n" for e in events) + tail
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    """Cells of the first table under ``## heading``."""
    section = markdown.split(f"## {heading}\n", 1)[1].lstrip("\n")
    rows = []
    for line in section.splitlines():
        if not line.startswith("|"):
            break
        rows.append(line)
    body = rows[2:]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in body]


def test_report_command_writes_markdown_and_plots(tmp_path):
    run_dir = write_log(tmp_path / "run", synthetic_events())
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    report = run_dir / "report" / "report.md"
    assert report.exists()
    for name in ("training_loss", "eval_metrics", "uplink_vs_metric", "phase_times"):
        png = run_dir / "report" / f"{name}.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name}.png)" in report.read_text()
    text = report.read_text()
    assert "complete" in text
    finals = {row[0]: row for row in table_rows(text, "Final metrics")}
    assert finals["exact_match"][1] == "0.125"  # base (round 0)
    assert finals["exact_match"][2] == "0.4375"  # final
    assert finals["exact_match"][4] == "0.4375 (round 3)"  # best
    assert finals["arithmetic/exact_match"][2] == "0.3"
    costs = {row[0]: row[1] for row in table_rows(text, "Costs")}
    assert costs["uplink, total"].startswith(f"{UPLINK * 3 * ROUNDS:,} bytes")
    assert costs["downlink, total"].startswith(f"{DOWNLINK * 3 * ROUNDS:,} bytes")
    assert costs["peak RSS"] == "503 MiB"
    assert costs["training tokens"] == f"{100 * 3 * ROUNDS:,}"
    # 4 x base + 6 x lora FLOPs per token (fedpeft.metering.flops)
    assert costs["training FLOPs (estimate, see fedpeft.metering.flops)"] == f"{900 * (4 * 100_000 + 6 * 1024):.3e}"
    per_round = table_rows(text, "Per round")
    assert [row[0] for row in per_round] == ["0", "1", "2", "3"]
    mean_loss_r1 = sum(3.0 - 0.5 - 0.1 * c for c in CLIENTS) / 3
    assert per_round[1][1] == f"{mean_loss_r1:.4g}"
    assert per_round[1][2] == "3"


def test_partial_log_gets_a_report_without_raising(tmp_path, caplog):
    events = synthetic_events()
    cut = next(i for i, e in enumerate(events) if e["event"] == "round_end" and e["round"] == 2)
    run_dir = write_log(tmp_path / "run", events[:cut], tail='{"event": "client_train", "round": 2, "cli')
    with caplog.at_level("WARNING"):
        path = write_report(run_dir)
    assert "truncated" in caplog.text
    text = path.read_text()
    assert "Partial log" in text and "last completed round is 1" in text
    assert (run_dir / "report" / "training_loss.png").exists()


@pytest.mark.parametrize("content", ["", "not json\n", '{"event": "eval", "round": "x", "metrics": null}\n[1, 2]\n'])
def test_garbage_or_empty_logs_never_raise(tmp_path, content):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(content)
    path = write_report(run_dir)
    assert path.exists()
    assert "Run report" in path.read_text()


def test_missing_run_dir_never_raises(tmp_path):
    path = write_report(tmp_path / "nowhere")
    assert path.exists()


def test_report_command_rejects_a_dir_without_log(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "metrics.jsonl" in result.output


def test_reader_keeps_last_record_of_a_repeated_round(tmp_path):
    events = synthetic_events()
    again = dict(next(e for e in events if e["event"] == "eval" and e["round"] == 1))
    again["metrics"] = {"exact_match": 0.9}
    run = load_run(write_log(tmp_path / "run", events + [again]))
    assert run.evals[1]["exact_match"] == 0.9
    assert len(read_events(tmp_path / "run" / "metrics.jsonl")) == len(events) + 1


def test_phase_seconds_rebuilt_when_not_logged(tmp_path):
    events = [e for e in synthetic_events() if e["event"] != "round_end"]
    run = load_run(write_log(tmp_path / "run", events))
    phases = run.phase_seconds()
    assert phases[1]["train"] == pytest.approx(1.0 + 1.1 + 1.2)
    assert phases[1]["aggregate"] == pytest.approx(0.05)
    assert run.cumulative_bytes("uplink")[3] == UPLINK * 3 * 3


def test_compare_groups_seeds_as_mean_std(tmp_path):
    a0 = write_log(tmp_path / "a0", synthetic_events(seed=0, method="fedit", exact_match=(0.1, 0.2, 0.3, 0.4)))
    a1 = write_log(tmp_path / "a1", synthetic_events(seed=1, method="fedit", exact_match=(0.1, 0.2, 0.3, 0.6)))
    b = write_log(tmp_path / "b", synthetic_events(seed=0, method="flora", exact_match=(0.1, 0.15, 0.2, 0.25)))
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", str(a0), str(a1), str(b), "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = (out / "compare.md").read_text()
    rows = {row[0]: row for row in table_rows(text, "Summary")}
    assert set(rows) == {"method=fedit", "method=flora"}
    assert rows["method=fedit"][1].startswith("2 (seeds 0, 1)")
    assert rows["method=fedit"][4] == "0.5 ± 0.1414"  # final exact_match: mean, sample std of 0.4, 0.6
    assert rows["method=flora"][4] == "0.25"
    for name in ("exact_match_vs_round.png", "exact_match_vs_uplink.png"):
        assert (out / name).exists()


def test_compare_default_out_dir(tmp_path):
    a = write_log(tmp_path / "runs" / "a", synthetic_events())
    path = compare_runs([a])
    assert path == tmp_path / "runs" / "compare" / "compare.md"
    assert re.search(r"\| synthetic|fedit", path.read_text())


def test_checkpoint_events_and_compression_fields(tmp_path):
    events = synthetic_events()
    for e in events:
        if e["event"] == "round_end":
            e["phase_seconds"]["checkpoint"] = 0.0
        if e["event"] == "client_train":
            e["uplink_bytes_raw"] = UPLINK * 4
    events.insert(-1, {"event": "checkpoint", "time": 1.0, "round": 3, "seconds": 0.75})
    events[0]["compression"] = "int8"
    run_dir = write_log(tmp_path / "run", events)
    run = load_run(run_dir)
    assert run.phase_seconds()[3]["checkpoint"] == 0.75
    assert run.time_breakdown()["checkpoint"] == 0.75
    costs = {row[0]: row[1] for row in table_rows(write_report(run_dir).read_text(), "Costs")}
    assert costs["uplink compression"].startswith(f"int8: {UPLINK * 9:,} bytes")
    assert costs["uplink compression"].endswith("(4.00x smaller)")


def test_eval_splits_of_one_round_are_merged(tmp_path):
    events = synthetic_events()
    events.insert(-1, {"event": "eval", "time": 1.0, "round": 3, "split": "personal",
                       "metrics": {"personal/mean": 0.625}, "examples": 3, "seconds": 2.0})
    run = load_run(write_log(tmp_path / "run", events))
    assert run.evals[3]["exact_match"] == 0.4375 and run.evals[3]["personal/mean"] == 0.625
    assert run.eval_seconds()[3] == pytest.approx(2.25)
