"""The run's state between rounds, and its checkpoint: what a resume restores and a round commits.

:class:`RunState` is everything the round loop carries from one round to the next (the global adapter,
the byte counters, the base weights a method changed, the metrics before training). :func:`start`
builds it fresh or from the latest checkpoint (truncating ``metrics.jsonl`` and the client store back to
that checkpoint); :func:`commit` writes a round's checkpoint atomically and then drops client-store
versions the new index no longer references. See docs/architecture.md "Why resume is exact".
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedpeft.adapters import AdapterState, get_adapter_state
from fedpeft.federation.checkpoint import Checkpoint, read_checkpoint, save_checkpoint, set_rng_states
from fedpeft.federation.run_dir import retained_store_indexes
from fedpeft.models.peft_wrap import base_weights, master_from_saved, set_base_weights

log = logging.getLogger(__name__)


@dataclass
class RunState:
    global_state: AdapterState
    next_round: int = 1
    cum_up: int = 0
    cum_down: int = 0
    elapsed_before: float = 0.0
    """Seconds spent by earlier processes of this run (before a resume)."""
    initial_metrics: dict[str, float] = field(default_factory=dict)
    base_touched: set[str] = field(default_factory=set)
    """Base modules whose weights the method changed (FLoRA, FedEx-LoRA); checkpointed with the round."""
    base_master: dict[str, torch.Tensor] = field(default_factory=dict)
    """float32 masters of merged lower-precision base weights (``peft_wrap.add_to_base_weight``)."""
    privacy: dict = field(default_factory=dict)
    """Differential privacy's server state (clip norm, accountant history; ``privacy/``), JSON."""


def start(run_dir: Path, checkpoint: Path | None, model, strategy, store, metrics, resuming: bool = False) -> RunState:
    """A fresh state (the strategy's ``init_global`` of the model's adapter), or that of ``checkpoint``
    (the folder ``run_dir.RunDirectory`` chose and verified before the model loaded)."""
    ckpt = read_checkpoint(checkpoint) if checkpoint is not None else None
    if ckpt is None:
        if resuming:
            log.warning("no completed round in %s: starting from round 1", run_dir)
            metrics.truncate(0)
            store.restore({})
        return RunState(strategy.init_global(get_adapter_state(model)))
    set_rng_states(ckpt.rng)
    metrics.truncate(ckpt.state["metrics_offset"])
    strategy.load_state_dict(ckpt.strategy_state)
    store.restore(ckpt.state["client_store_index"], keep=retained_store_indexes(run_dir / "checkpoints"))
    if ckpt.base_weights:
        set_base_weights(model, ckpt.base_weights)
    master = master_from_saved(model, ckpt.base_weights) if ckpt.base_weights else {}
    log.info("resuming %s after round %d", run_dir, ckpt.round)
    return RunState(ckpt.global_state, ckpt.round + 1, ckpt.state["cum_uplink_bytes"],
                    ckpt.state["cum_downlink_bytes"], ckpt.state.get("elapsed_seconds", 0.0),
                    ckpt.state.get("initial_metrics", {}), set(ckpt.base_weights), master,
                    ckpt.state.get("privacy", {}))


def commit(run_dir: Path, round_idx: int, state: RunState, model, strategy, store, metrics, keep: int,
           elapsed: float, before_commit: Callable[[], None] | None = None) -> None:
    """Checkpoint round ``round_idx`` (atomic: a kill leaves the previous or this one as LATEST)."""
    saved = {
        "round": round_idx, "metrics_offset": metrics.offset(), "client_store_index": store.snapshot(),
        "cum_uplink_bytes": state.cum_up, "cum_downlink_bytes": state.cum_down,
        "initial_metrics": state.initial_metrics, "elapsed_seconds": state.elapsed_before + elapsed,
    }
    if state.privacy:
        saved["privacy"] = state.privacy
    touched = base_weights(model, sorted(state.base_touched), state.base_master) if state.base_touched else {}
    save_checkpoint(run_dir / "checkpoints",
                    Checkpoint(round_idx, state.global_state, strategy.state_dict(), touched, saved),
                    keep=keep, before_commit=before_commit)
    store.collect_garbage(retained_store_indexes(run_dir / "checkpoints"))  # older checkpoints stay usable
