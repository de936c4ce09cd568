"""Durable files: fsynced writes, atomic replacement, and SHA-256 manifests. Standard library only, so
the CLI can use it (run directory, checkpoint verification) before torch is imported.

A power loss after ``os.replace`` may otherwise leave the new name pointing at a file whose data never
reached the disk; so every file is fsynced before it is renamed and the directory after.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


class StorageError(OSError):
    """Writing to disk failed (disk full, read-only, permissions): a property of the machine, not of a
    client or of the data. The message names the path and the cause."""


def storage_error(path: str | Path, exc: OSError, what: str = "writing") -> StorageError:
    cause = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or type(exc).__name__)
    err = StorageError(exc.errno, f"{what} {path} failed: {cause} ({exc})")
    err.filename = str(path)
    return err


def fsync_dir(path: str | Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durable(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (no rename: the caller renames a whole directory)."""
    path = Path(path)
    try:
        with open(path, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except StorageError:
        raise
    except OSError as exc:
        raise storage_error(path, exc) from exc


def replace_durable(path: str | Path, data: bytes) -> None:
    """Atomically replace ``path`` by ``data``: temporary file, fsync, rename, fsync of the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    write_bytes_durable(tmp, data)
    try:
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        raise storage_error(path, exc) from exc


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, names: list[str], extra: dict | None = None) -> None:
    """``folder/manifest.json``: the SHA-256 of each named file (written after them, fsynced)."""
    files = {name: sha256_file(folder / name) for name in sorted(names)}
    write_bytes_durable(folder / MANIFEST, json.dumps({"files": files, **(extra or {})}, indent=1).encode())


def verify_manifest(folder: Path, required: tuple[str, ...] = ()) -> str | None:
    """None when every file the manifest lists is present with its checksum and every ``required`` file
    is listed; else the first problem found, in words."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (incomplete, or written by an older fedpeft)"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        return f"{MANIFEST} is unreadable ({type(exc).__name__})"
    for name in required:
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != expected:
            return f"{name} does not match its SHA-256 in {MANIFEST} (damaged or truncated)"
    return None
