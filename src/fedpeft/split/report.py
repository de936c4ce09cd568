"""The run report's split-learning section: bytes per round of the split run against plain FL.

Read from ``metrics.jsonl``: each ``aggregate`` event of an ``sfl`` run carries the round's cut-crossing
bytes and the client parts' adapter bytes (``split_*``, docs/metrics.md). Plain FL (FedIT) on the same
model sends every sampled client the whole adapter and receives it back: 2 * adapter_bytes per client,
``adapter_bytes`` being the ``run_start`` event's size of the full adapter state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def split_byte_rows(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per aggregated round: split crossing, client-adapter and wire bytes, and plain FL's bytes
    for the same number of clients."""
    start = next((e for e in events if e.get("event") == "run_start"), {})
    adapter_bytes = int(start.get("adapter_bytes") or 0)
    rows = []
    for e in events:
        if e.get("event") != "aggregate" or "split_wire_bytes" not in e:
            continue
        clients = len(e.get("split_clients") or {})
        rows.append({
            "round": e["round"], "clients": clients, "crossing_bytes": e["split_crossing_bytes"],
            "client_adapter_bytes": e["split_client_adapter_bytes"], "wire_bytes": e["split_wire_bytes"],
            "plain_fl_bytes": 2 * adapter_bytes * clients,
        })
    return rows


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f}"


def split_report_section(run_dir: Path, out_dir: Path) -> list[str]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = split_byte_rows(events)
    if not rows:
        return []
    intro = ("What a split deployment sends per round (activations and gradients at both cuts, plus the client "
             "parts' adapters when they are averaged) against plain FL (FedIT: the whole adapter down and up per "
             "client) on the same model and clients.")
    lines = ["## Split learning: bytes per round", "", intro, "",
             "| round | clients | cut crossings (MB) | client adapters (MB) | split total (MB) | plain FL (MB) | split / plain |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['wire_bytes'] / r['plain_fl_bytes']:.2f}" if r["plain_fl_bytes"] else "n/a"
        lines.append(f"| {r['round']} | {r['clients']} | {_mb(r['crossing_bytes'])} | {_mb(r['client_adapter_bytes'])} | "
                     f"{_mb(r['wire_bytes'])} | {_mb(r['plain_fl_bytes'])} | {ratio} |")
    split_mean = sum(r["wire_bytes"] for r in rows) / len(rows)
    plain_mean = sum(r["plain_fl_bytes"] for r in rows) / len(rows)
    lines += ["", f"Mean per round: split {_mb(split_mean)} MB, plain FL {_mb(plain_mean)} MB.", ""]
    return lines
