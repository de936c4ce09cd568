"""Atomic round checkpoints: written under a temporary name, renamed, then LATEST is switched.

Layout: ``RUN_DIR/checkpoints/round_0003/{global.safetensors, strategy.pt, base_weights.safetensors?,
state.json}`` and ``RUN_DIR/checkpoints/LATEST`` naming the newest complete one. A kill at any moment
leaves either the previous or the new checkpoint as LATEST, never a half-written one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedpeft.adapters import AdapterState


@dataclass
class Checkpoint:
    round: int
    global_state: AdapterState
    strategy_state: dict[str, Any]
    base_weights: dict[str, torch.Tensor]
    state: dict[str, Any]


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.random.set_rng_state(states["torch"])


def save_checkpoint(root: Path, ckpt: Checkpoint, keep: int = 2, before_commit=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    name = f"round_{ckpt.round:04d}"
    final = root / name
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in ckpt.global_state.items()}, str(tmp / "global.safetensors"))
    if ckpt.base_weights:
        save_file({k: v.contiguous() for k, v in ckpt.base_weights.items()}, str(tmp / "base_weights.safetensors"))
    torch.save({"strategy": ckpt.strategy_state, "rng": rng_states()}, tmp / "strategy.pt")
    (tmp / "state.json").write_text(json.dumps(ckpt.state, indent=1))
    if before_commit is not None:
        before_commit()
    shutil.rmtree(final, ignore_errors=True)  # left by a killed attempt at this round
    os.replace(tmp, final)
    _write_text_atomic(root / "LATEST", name)
    for old in sorted(p for p in root.glob("round_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(root: Path) -> Checkpoint | None:
    latest = root / "LATEST"
    if not latest.is_file():
        return None
    path = root / latest.read_text().strip()
    blob = torch.load(path / "strategy.pt", weights_only=False)
    base = path / "base_weights.safetensors"
    state = json.loads((path / "state.json").read_text())
    set_rng_states(blob["rng"])
    return Checkpoint(
        round=int(state["round"]),
        global_state=load_file(str(path / "global.safetensors")),
        strategy_state=blob["strategy"],
        base_weights=load_file(str(base)) if base.is_file() else {},
        state=state,
    )
