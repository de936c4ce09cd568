"""Per-client persistent state on disk (FedSA's B, SCAFFOLD controls, FL-TAC task adapters...).

Nothing is held in RAM between uses, so memory stays flat in the number of registered clients. Every
write is a new versioned file ``<client>/<name>.r<round>.safetensors`` (fsynced, renamed); the index
(which version is current) is committed with the round's checkpoint. A run killed mid-round therefore
resumes with the index of its last completed round, and files written by the unfinished round are
ignored and removed. Versions referenced by any retained checkpoint are kept, so a resume can fall back
to an older checkpoint when the newest is damaged.

A write that fails (disk full, read-only disk) raises ``StorageError`` naming the path: it is a fault of
the machine, not of the client, and must stop the run rather than drop the client.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from safetensors.torch import load, save

from fedpeft.adapters import AdapterState
from fedpeft.federation.durable import StorageError, fsync_dir, storage_error, write_bytes_durable
from fedpeft.federation.run_dir import missing_files

_VERSION = re.compile(r"^(?P<name>.+)\.r(?P<round>\d+)\.safetensors$")


class ClientStoreError(RuntimeError):
    """The committed index names a file that is not on disk: a client's private state was lost."""


class ClientStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, int] = {}  # "<client>/<name>" -> round of the current version
        self.round = 0

    def _path(self, client_id: int, name: str, round_idx: int) -> Path:
        return self.root / str(client_id) / f"{name}.r{round_idx}.safetensors"

    def begin_round(self, round_idx: int) -> None:
        self.round = round_idx

    def get(self, client_id: int, name: str) -> AdapterState | None:
        version = self.index.get(f"{client_id}/{name}")
        if version is None:
            return None
        path = self._path(client_id, name, version)
        if not path.is_file():
            raise ClientStoreError(f"client {client_id}'s stored '{name}' ({path}) is missing")
        return load(path.read_bytes())

    def put(self, client_id: int, name: str, state: AdapterState) -> None:
        if "/" in name or not name:
            raise ValueError(f"client store name must be non-empty without '/': {name!r}")
        path = self._path(client_id, name, self.round)
        tmp = path.with_suffix(".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_durable(tmp, save({k: v.contiguous() for k, v in state.items()}))
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except StorageError:
            raise
        except OSError as exc:
            raise storage_error(path, exc) from exc
        self.index[f"{client_id}/{name}"] = self.round

    def snapshot(self) -> dict[str, int]:
        return dict(self.index)

    def restore(self, index: dict[str, int], keep: Iterable[Mapping[str, int]] = ()) -> None:
        """Adopt a committed index (every file it names must exist) and delete every version that
        neither it nor ``keep`` references."""
        index = {k: int(v) for k, v in index.items()}
        lost = missing_files(self.root, index)
        if lost:
            raise ClientStoreError(f"client store {self.root}: {len(lost)} file(s) of the checkpoint's index are "
                                   f"missing ({', '.join(lost[:5])}); those clients' private state is lost")
        self.index = index
        self.collect_garbage(keep)

    def collect_garbage(self, keep: Iterable[Mapping[str, int]] = ()) -> None:
        """Delete versions referenced neither by the current index nor by an index in ``keep`` (those of
        older retained checkpoints, so that a resume can fall back to them)."""
        wanted = {(k, int(v)) for k, v in self.index.items()}
        for other in keep:
            wanted.update((k, int(v)) for k, v in other.items())
        for path in self.root.glob("*/*"):
            match = _VERSION.match(path.name)
            key = f"{path.parent.name}/{match.group('name')}" if match else None
            if match is None or (key, int(match.group("round"))) not in wanted:
                path.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self.index)
