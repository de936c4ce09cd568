"""The run directory, before anything slow starts: the lock, the directory and its ``config.yaml``, and
for a resume the choice of checkpoint. Standard library and the config only (no torch), so the CLI does
all of this in its first fraction of a second and a kill at any later moment leaves a resumable run.

- Lock: ``RUN_DIR/.lock`` held with ``fcntl.flock`` for the life of the run (the kernel releases it when
  the process dies, kill -9 included). A second run or resume of the directory fails at once, naming the
  holder's pid.
- A new run into a non-empty directory is refused unless it resumes or asks to overwrite.
- Resume: the newest checkpoint that is committed (at most LATEST), matches its manifest, has the client
  store files its index names, and whose metrics offset lies within ``metrics.jsonl`` at a line boundary.
  Each one skipped is reported with its reason. A run that already finished is recognised (its
  ``run_end`` event is after the last checkpoint) so that resuming it changes nothing.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from fedpeft.config import ExperimentConfig
from fedpeft.federation.durable import replace_durable, storage_error, verify_manifest

log = logging.getLogger(__name__)

LOCK = ".lock"
CHECKPOINTS = "checkpoints"
REQUIRED = ("global.safetensors", "strategy.safetensors", "strategy.json", "state.json")
_ROUND_DIR = re.compile(r"^round_(\d{4,})$")
_IGNORED = (LOCK, ".config.yaml.tmp")  # what a run killed before writing config.yaml leaves behind
# Keys that may differ between --config and the run directory's config.yaml: where and how it displays.
_COSMETIC = {("output", "dir"), ("output", "run_name"), ("output", "progress")}


class RunDirError(ValueError):
    """The run directory cannot be used as asked; the message says why and what to do."""


def missing_files(root: str | Path, index: Mapping[str, int]) -> list[str]:
    """Entries of ``index`` (``"<client>/<name>" -> round``) whose version file is absent under ``root``."""
    root = Path(root)
    missing = []
    for key, version in index.items():
        client, _, name = key.partition("/")
        if not (root / client / f"{name}.r{int(version)}.safetensors").is_file():
            missing.append(f"{client}/{name}.r{int(version)}.safetensors")
    return missing


# --- checkpoints, without loading them ---------------------------------------------------------------
def round_dirs(root: Path) -> list[Path]:
    """Checkpoint folders, newest first (temporary ``.round_*.tmp`` ones excluded)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _ROUND_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_ROUND_DIR.match(p.name).group(1)), reverse=True)


def candidates(root: Path) -> tuple[list[Path], list[str]]:
    """Checkpoints to try, newest first, and notes on LATEST. LATEST is the commit point: a folder newer
    than it was never committed. Without a readable LATEST every folder is a candidate."""
    folders = round_dirs(root)
    latest = root / "LATEST"
    try:
        match = _ROUND_DIR.match(latest.read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError):
        match = None
    if match is None:
        if not folders:
            return [], []
        note = "LATEST is missing" if not latest.exists() else "LATEST is unreadable"
        return folders, [f"{note}; trying every checkpoint, newest first"]
    limit = int(match.group(1))
    return [p for p in folders if int(_ROUND_DIR.match(p.name).group(1)) <= limit], []


def verify_checkpoint(path: Path) -> str | None:
    """None when ``path`` is an intact checkpoint, else what is wrong with it (no tensor is loaded)."""
    if (path / "strategy.pt").exists() and not (path / "manifest.json").exists():
        return "written by an older fedpeft (pickled strategy.pt, no checksums): not loaded"
    return verify_manifest(path, REQUIRED)


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "state.json").read_text(encoding="utf-8"))


def retained_store_indexes(root: Path) -> list[dict[str, int]]:
    """The client-store index of every checkpoint folder still on disk (their files must be kept)."""
    indexes = []
    for folder in round_dirs(root):
        try:
            indexes.append(read_state(folder).get("client_store_index", {}))
        except (OSError, ValueError):
            continue  # a damaged checkpoint: resume will not use it
    return indexes


def check_metrics_log(path: Path, offset: int) -> str | None:
    """None when ``path`` holds at least ``offset`` bytes ending a line there, else the problem."""
    if offset == 0:
        return None
    if not path.is_file():
        return f"{path.name} is missing (the checkpoint expects {offset} bytes of events)"
    size = path.stat().st_size
    if size < offset:
        return f"{path.name} is {size} bytes, shorter than the {offset} bytes the checkpoint recorded"
    with open(path, "rb") as handle:
        handle.seek(offset - 1)
        if handle.read(1) != b"\n":
            return f"{path.name} does not end a line at the checkpoint's offset {offset} (replaced or edited)"
    return None


def finished_event(path: Path, offset: int) -> dict | None:
    """The ``run_end`` event logged after ``offset`` (the last checkpoint), if any."""
    if not path.is_file():
        return None
    with open(path, "rb") as handle:
        handle.seek(offset)
        tail = handle.read()
    for line in tail.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "run_end":
            return event
    return None


@dataclass
class ResumePoint:
    checkpoint: Path | None
    """The checkpoint folder to load; None: start from round 1."""
    round: int = 0
    notes: list[str] = field(default_factory=list)
    """Checkpoints skipped and why (also logged as warnings)."""
    finished: dict | None = None
    """The run's ``run_end`` event when it had already finished: nothing is left to do."""


def choose_checkpoint(run_dir: Path, rounds: int) -> ResumePoint:
    root = run_dir / CHECKPOINTS
    folders, notes = candidates(root)
    problems: list[str] = []
    for folder in folders:
        problem = verify_checkpoint(folder)
        state: dict[str, Any] = {}
        if problem is None:
            try:
                state = read_state(folder)
                offset = int(state["metrics_offset"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                problem = f"state.json is unusable ({type(exc).__name__})"
        if problem is None:
            problem = check_metrics_log(run_dir / "metrics.jsonl", offset)
        if problem is None:
            lost = missing_files(run_dir / "client_store", state.get("client_store_index", {}))
            if lost:
                problem = (f"{len(lost)} client-store file(s) it references are missing "
                           f"({', '.join(lost[:3])}): those clients' private state is lost")
        if problem is not None:
            problems.append(f"{folder.name}: {problem}")
            continue
        point = ResumePoint(folder, int(state["round"]), notes + [f"skipped {p}" for p in problems])
        if problems:
            point.notes.append(f"resuming from {folder.name} (round {point.round}), the newest intact checkpoint")
        if point.round >= rounds and (run_dir / "final" / "adapter_model.safetensors").is_file():
            point.finished = finished_event(run_dir / "metrics.jsonl", offset)
        return point
    if problems:
        raise RunDirError(
            f"no usable checkpoint in {root}:\n  " + "\n  ".join(problems)
            + f"\nstart the run again with --overwrite (or restore the files) to use {run_dir}")
    return ResumePoint(None, 0, notes)


# --- configs ---------------------------------------------------------------------------------------------
def _flatten(data: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(data, dict) and data:
        out: dict[tuple[str, ...], Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, prefix + (str(key),)))
        return out
    return {prefix: data}


def config_differences(saved: ExperimentConfig, given: ExperimentConfig) -> list[str]:
    """Keys whose values differ (``output.dir``/``run_name``/``progress`` ignored), as ``key: a != b``."""
    a, b = _flatten(saved.model_dump(mode="json")), _flatten(given.model_dump(mode="json"))
    return [f"{'.'.join(k)}: run directory has {a.get(k)!r}, --config gives {b.get(k)!r}"
            for k in sorted(set(a) | set(b)) if k[:2] not in _COSMETIC and a.get(k) != b.get(k)]


def default_run_dir(config: ExperimentConfig) -> Path:
    name = config.output.run_name or f"{config.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return Path(config.output.dir) / name


# --- the directory ------------------------------------------------------------------------------------------
def _make_dir(path: Path) -> None:
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise RunDirError(f"cannot create run directory {path}: {parent} is a file, not a directory "
                              "(check output.dir / --run-dir)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(path, exc, "creating run directory") from exc


def _lock(path: Path):
    lock_path = path / LOCK
    try:
        handle = open(lock_path, "a+")
    except OSError as exc:
        raise storage_error(lock_path, exc, "opening lock file") from exc
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            handle.close()
            raise storage_error(lock_path, exc, "locking") from exc
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunDirError(f"run directory {path} is in use by process {holder} (another fedpeft run or resume); "
                          "wait for it to end or stop it, or choose another --run-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


class RunDirectory:
    """A locked run directory. ``open`` does everything that needs no model; ``close`` releases the lock."""

    def __init__(self, path: Path, config: ExperimentConfig, resuming: bool, lock_handle,
                 resume: ResumePoint | None) -> None:
        self.path = path
        self.config = config
        self.resuming = resuming
        self.resume = resume or ResumePoint(None)
        self._lock = lock_handle

    @classmethod
    def open(cls, path: str | Path, config: ExperimentConfig, resume: bool = False,
             overwrite: bool = False) -> "RunDirectory":
        path = Path(path)
        _make_dir(path)
        handle = _lock(path)
        try:
            if resume:
                if not (path / "config.yaml").is_file():
                    raise RunDirError(f"--resume {path}: no config.yaml there; is it a fedpeft run directory?")
                point = choose_checkpoint(path, config.federation.rounds)
                for note in point.notes:
                    log.warning("%s: %s", path, note)
                if point.finished is not None:
                    log.info("run %s already finished (%d rounds): nothing to do", path, point.round)
                return cls(path, config, True, handle, point)
            entries = sorted(p.name for p in path.iterdir() if p.name not in _IGNORED)
            if entries and not overwrite:
                raise RunDirError(
                    f"run directory {path} is not empty ({', '.join(entries[:6])}{', ...' if len(entries) > 6 else ''}); "
                    f"continue it with --resume {path}, or pass --overwrite to replace it")
            if entries:
                if not (path / "config.yaml").is_file():
                    raise RunDirError(f"--overwrite: {path} is not a fedpeft run directory (no config.yaml); "
                                      "it is left untouched: choose an empty or new --run-dir")
                for name in entries:
                    target = path / name
                    shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
                log.info("--overwrite: cleared %s", path)
            replace_durable(path / "config.yaml", config.to_yaml().encode())
            return cls(path, config, False, handle, None)
        except BaseException:
            handle.close()
            raise

    def close(self) -> None:
        if self._lock is not None and not self._lock.closed:
            self._lock.close()  # closing the descriptor releases the flock

    def store_indexes_to_keep(self) -> list[dict[str, int]]:
        return retained_store_indexes(self.path / CHECKPOINTS)
