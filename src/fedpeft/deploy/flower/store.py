"""The client store on a SuperNode: the engine's ``ClientStore`` with its index kept on disk.

In process the index is committed with the server's checkpoint; on a SuperNode every message may run in
a fresh process, so the index is written (atomically) after each ``put`` and read back at start-up.
Older versions of a name are removed once the new one is indexed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedpeft.adapters import AdapterState
from fedpeft.federation.client_store import _VERSION, ClientStore

INDEX_FILE = "index.json"


class NodeClientStore(ClientStore):
    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        index = self.root / INDEX_FILE
        if index.is_file():
            self.index = {k: int(v) for k, v in json.loads(index.read_text()).items()}

    def put(self, client_id: int, name: str, state: AdapterState) -> None:
        super().put(client_id, name, state)
        tmp = self.root / f".{INDEX_FILE}.tmp"
        tmp.write_text(json.dumps(self.index))
        os.replace(tmp, self.root / INDEX_FILE)
        keep = self._path(client_id, name, self.round)
        for path in (self.root / str(client_id)).iterdir():
            match = _VERSION.match(path.name)
            if match and match.group("name") == name and path != keep:
                path.unlink(missing_ok=True)

    def collect_garbage(self, keep=()) -> None:  # the index file is not a versioned entry
        pass
