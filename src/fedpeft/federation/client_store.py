"""Per-client persistent state on disk (FedSA's B, SCAFFOLD controls, FL-TAC task adapters...).

Nothing is held in RAM between uses, so memory stays flat in the number of registered clients. Every
write is a new versioned file ``<client>/<name>.r<round>.safetensors``; the index (which version is
current) is committed with the round's checkpoint. A run killed mid-round therefore resumes with the
index of its last completed round, and files written by the unfinished round are ignored and removed.
"""

from __future__ import annotations

import re
from pathlib import Path

from safetensors.torch import load_file, save_file

from fedpeft.adapters import AdapterState

_VERSION = re.compile(r"^(?P<name>.+)\.r(?P<round>\d+)\.safetensors$")


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
        return None if version is None else load_file(self._path(client_id, name, version))

    def put(self, client_id: int, name: str, state: AdapterState) -> None:
        if "/" in name or not name:
            raise ValueError(f"client store name must be non-empty without '/': {name!r}")
        path = self._path(client_id, name, self.round)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        tmp.replace(path)
        self.index[f"{client_id}/{name}"] = self.round

    def snapshot(self) -> dict[str, int]:
        return dict(self.index)

    def restore(self, index: dict[str, int]) -> None:
        """Adopt a committed index and delete every version it does not reference."""
        self.index = {k: int(v) for k, v in index.items()}
        self.collect_garbage()

    def collect_garbage(self) -> None:
        for path in self.root.glob("*/*"):
            match = _VERSION.match(path.name)
            key = f"{path.parent.name}/{match.group('name')}" if match else None
            if match is None or self.index.get(key) != int(match.group("round")):
                path.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self.index)
