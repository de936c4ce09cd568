"""Atomic, verified round checkpoints.

Layout: ``RUN_DIR/checkpoints/round_0003/{global.safetensors, strategy.safetensors, strategy.json,
base_weights.safetensors?, state.json, manifest.json}`` and ``RUN_DIR/checkpoints/LATEST`` naming the
newest committed one. A round is written under a temporary name, every file fsynced, then the manifest
(SHA-256 of each file), then the folder is renamed and LATEST switched (both fsynced). A kill at any
moment leaves the previous or the new checkpoint as LATEST, never a half-written one, and damage that
happens later (a truncated or flipped file) is caught by the manifest before anything is loaded.

No pickle: the strategy's state and the RNG states are split into tensors (safetensors) and a JSON
skeleton, so resuming a run directory from an untrusted source cannot execute code.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load, save

from fedpeft.adapters import AdapterState
from fedpeft.federation.durable import fsync_dir, replace_durable, write_bytes_durable, write_manifest
from fedpeft.federation.run_dir import candidates, round_dirs, verify_checkpoint

log = logging.getLogger(__name__)

FORMAT = 2


@dataclass
class Checkpoint:
    round: int
    global_state: AdapterState
    strategy_state: dict[str, Any]
    base_weights: dict[str, torch.Tensor]
    state: dict[str, Any]
    rng: dict[str, Any] = field(default_factory=dict)
    """Python, numpy and torch RNG states at the commit; ``set_rng_states`` applies them."""


class CheckpointError(RuntimeError):
    """No checkpoint of a run directory can be used; the message lists each one and why."""


# --- RNG ------------------------------------------------------------------------------------------------
def rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.random.set_rng_state(states["torch"])


# --- state <-> (JSON skeleton, tensors) --------------------------------------------------------------------
def pack_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split nested dicts/lists/tuples of tensors, numpy arrays and JSON scalars into a JSON-able
    skeleton and a flat tensor dict. Anything else (objects that would need pickle) is refused."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, where: str) -> Any:
        if isinstance(value, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = value.detach().cpu().clone().contiguous()  # clone: safetensors refuses shared storage
            return {"$tensor": key}
        if isinstance(value, np.ndarray):
            return {"$ndarray": value.tolist(), "dtype": str(value.dtype)}
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                if not isinstance(key, str) or key.startswith("$"):
                    raise TypeError(f"checkpoint: key {key!r} at {where or '<root>'} must be a string not starting with '$'")
                out[key] = walk(item, f"{where}.{key}")
            return out
        if isinstance(value, tuple):
            return {"$tuple": [walk(item, f"{where}[{i}]") for i, item in enumerate(value)]}
        if isinstance(value, list):
            return [walk(item, f"{where}[{i}]") for i, item in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"checkpoint: cannot store a {type(value).__name__} at {where or '<root>'} "
                        "(tensors, numpy arrays and JSON values only)")

    return walk(obj, ""), tensors


def unpack_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, list):
        return [unpack_state(item, tensors) for item in skeleton]
    if isinstance(skeleton, dict):
        if "$tensor" in skeleton:
            return tensors[skeleton["$tensor"]]
        if "$ndarray" in skeleton:
            return np.array(skeleton["$ndarray"], dtype=skeleton["dtype"])
        if "$tuple" in skeleton:
            return tuple(unpack_state(item, tensors) for item in skeleton["$tuple"])
        return {key: unpack_state(item, tensors) for key, item in skeleton.items()}
    return skeleton


# --- writing ---------------------------------------------------------------------------------------------
def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def save_checkpoint(root: Path, ckpt: Checkpoint, keep: int = 2, before_commit=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    name = f"round_{ckpt.round:04d}"
    final = root / name
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    skeleton, tensors = pack_state({"strategy": ckpt.strategy_state, "rng": rng_states()})
    files = {
        "global.safetensors": _tensor_bytes(ckpt.global_state),
        "strategy.safetensors": save(tensors),
        "strategy.json": json.dumps({"format": FORMAT, "state": skeleton}).encode(),
        "state.json": json.dumps(ckpt.state, indent=1).encode(),
    }
    if ckpt.base_weights:
        files["base_weights.safetensors"] = _tensor_bytes(ckpt.base_weights)
    for file_name, data in files.items():
        write_bytes_durable(tmp / file_name, data)
    write_manifest(tmp, list(files), extra={"format": FORMAT, "round": ckpt.round})
    fsync_dir(tmp)
    if before_commit is not None:
        before_commit()
    shutil.rmtree(final, ignore_errors=True)  # left by a killed attempt at this round
    os.replace(tmp, final)
    fsync_dir(root)
    replace_durable(root / "LATEST", name.encode())
    for old in round_dirs(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# --- reading ----------------------------------------------------------------------------------------------
def read_checkpoint(path: Path) -> Checkpoint:
    """Load a checkpoint folder that ``verify_checkpoint`` accepted. RNG states are returned, not applied."""
    blob = json.loads((path / "strategy.json").read_text(encoding="utf-8"))
    if blob.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {blob.get('format')!r}, this fedpeft reads {FORMAT}")
    unpacked = unpack_state(blob["state"], load((path / "strategy.safetensors").read_bytes()))
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    base = path / "base_weights.safetensors"
    return Checkpoint(
        round=int(state["round"]),
        global_state=load((path / "global.safetensors").read_bytes()),
        strategy_state=unpacked["strategy"],
        base_weights=load(base.read_bytes()) if base.is_file() else {},
        state=state,
        rng=unpacked["rng"],
    )


def load_latest(root: Path) -> Checkpoint | None:
    """The newest intact committed checkpoint (RNG states applied), None when there is none at all;
    damaged ones are skipped with a warning; CheckpointError when some exist and none is intact."""
    folders, notes = candidates(root)
    for note in notes:
        log.warning("%s: %s", root, note)
    problems = []
    for folder in folders:
        problem = verify_checkpoint(folder)
        if problem is None:
            ckpt = read_checkpoint(folder)
            set_rng_states(ckpt.rng)
            return ckpt
        log.warning("checkpoint %s skipped: %s", folder, problem)
        problems.append(f"{folder.name}: {problem}")
    if problems:
        raise CheckpointError(f"no intact checkpoint in {root}: " + "; ".join(problems))
    return None
