"""The run report's privacy section, read from ``RUN_DIR/privacy/attack.json`` (written by
``fedpeft attack --run RUN_DIR``): one row per attack and defence setting with ROUGE-L F, METEOR
(exact stage) and token accuracy. Rows written by ``fedpeft attack --model ... --out RUN_DIR/privacy``
(simulated noise levels instead of a recorded defence) are shown too, with their noise level."""

from __future__ import annotations

import json
from pathlib import Path

PRIVACY_DIR = "privacy"
ATTACK_FILE = "attack.json"


def _defence(row: dict) -> str:
    if row.get("defence") is not None:
        return str(row["defence"])
    return f"simulated noise {float(row.get('noise', 0)):g}× RMS"


def privacy_report_section(run_dir: Path) -> list[str]:
    """Markdown lines of the section; empty when the run has not been attacked."""
    path = Path(run_dir) / PRIVACY_DIR / ATTACK_FILE
    if not path.is_file():
        return []
    payload = json.loads(path.read_text(encoding="utf-8"))
    rows = payload.get("results") or []
    weights = payload.get("weights")
    knows = {"base": "the pre-trained base model only", "final": "the base model + the run's final adapter"}
    intro = ("Data-reconstruction attacks an honest-but-curious server mounts on what crossed the cuts, scored "
             "against the clients' true inputs (higher = more leaked)."
             + (f" The attacker knows {knows.get(weights, weights)}." if weights else "")
             + f" Source: `{PRIVACY_DIR}/{ATTACK_FILE}` (`fedpeft attack --run`).")
    lines = ["## Privacy: attack success", "", intro, "",
             "| attack | defence | sequences | ROUGE-L F | METEOR (exact) | token accuracy |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        count = r.get("sequences", r.get("samples", ""))
        lines.append(f"| {r['attack']} | {_defence(r)} | {count} | {r['rouge_l_f']:.3f} | {r['meteor']:.3f} | "
                     f"{r['token_accuracy']:.3f} |")
    return lines + [""]
