"""A warm worker per SuperNode and run: keeps torch imported and the model, data and strategy built.

Flower 1.41/1.42 start a fresh ``flwr-clientapp`` process for every message; importing torch,
transformers and peft and building the model there costs seconds to tens of seconds per round. With the
warm worker (node config ``warm-worker=true``, the default) the ClientApp process stays thin: it forwards
the message content over a Unix socket to a long-lived worker process on the same machine, which runs the
same ``train`` code as the cold path (``node.handle_train``) and sends the reply content back.

The worker is started by the first ClientApp of a (node, run) that finds no socket, in the SuperNode's
process group (so killing the node's group kills it), and exits when the SuperNode's SuperExec (the
ClientApp's parent) is gone or after ``worker-idle`` seconds (node config; default 900) without work.
Wire format, both ways: 8-byte big-endian length + JSON header, 8-byte length + RecordDict protobuf bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from flwr.app import RecordDict

IDLE_SECONDS = 900.0
START_TIMEOUT = 300.0


def _send(sock: socket.socket, header: dict, payload: bytes) -> None:
    head = json.dumps(header).encode()
    sock.sendall(struct.pack(">Q", len(head)) + head + struct.pack(">Q", len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("warm worker connection closed mid-message")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> tuple[dict, bytes]:
    (n,) = struct.unpack(">Q", _recv_exact(sock, 8))
    header = json.loads(_recv_exact(sock, n))
    (m,) = struct.unpack(">Q", _recv_exact(sock, 8))
    return header, _recv_exact(sock, m)


def to_bytes(content: RecordDict) -> bytes:
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).SerializeToString()


def from_bytes(data: bytes) -> RecordDict:
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=no-name-in-module

    return recorddict_from_proto(ProtoRecordDict.FromString(data))


def socket_path(run_config: dict, node_config: dict, run_id: int, node_id: int) -> Path:
    """Short (Unix sockets allow ~100 characters), unique per (run, node, configs)."""
    blob = json.dumps([sorted(map(str, run_config.items())), sorted(map(str, node_config.items())), run_id, node_id])
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"fedpeft-w-{digest}.sock"


# --- the ClientApp side ----------------------------------------------------------------------------


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return sock
    except OSError:
        sock.close()
        return None


def _alive_pid_file(path: Path) -> bool:
    try:
        return _alive(int(path.read_text().strip()))
    except (OSError, ValueError):
        return False


def ensure_started(run_config: dict, node_config: dict, run_id: int, node_id: int, idle: float = IDLE_SECONDS,
                   wait: bool = True) -> socket.socket | None:
    """Connect to this (node, run)'s warm worker, starting it if no worker is running or starting. The
    worker builds config, data and model right after start-up (before it accepts work). ``wait=False``
    returns as soon as a worker is known to be starting (the "query" message at the start of a run uses
    this to build while the server prepares round 1)."""
    import fcntl

    path = socket_path(run_config, node_config, run_id, node_id)
    sock = _connect(path)
    if sock is not None or not wait and _alive_pid_file(path.with_suffix(".pid")):
        return sock
    log_path = path.with_suffix(".log")
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two ClientApps of one node start one worker
        sock = _connect(path)
        if sock is None and not _alive_pid_file(path.with_suffix(".pid")):
            request = path.with_suffix(".json")
            request.write_text(json.dumps({"run_config": run_config, "node_config": node_config, "run_id": run_id,
                                           "node_id": node_id}))
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(  # in the SuperNode's process group: killing the node's group ends it too
                    [sys.executable, "-m", "fedpeft.deploy.flower.worker", "--socket", str(path),
                     "--watch-pid", str(os.getppid()), "--idle", str(idle), "--prebuild", str(request)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, close_fds=True)
            path.with_suffix(".pid").write_text(str(proc.pid))
    if not wait:
        return sock
    deadline = time.monotonic() + START_TIMEOUT
    while sock is None and time.monotonic() < deadline:
        time.sleep(0.1)
        sock = _connect(path)
    if sock is None:
        raise RuntimeError(f"warm worker did not start within {START_TIMEOUT:.0f} s; see {log_path}")
    return sock


def call(kind: str, content: RecordDict, run_config: dict, node_config: dict, run_id: int, node_id: int,
         idle: float = IDLE_SECONDS) -> RecordDict:
    """Run ``kind`` ("train" or "evaluate") on this node's warm worker, starting it first if needed; returns the reply
    content. The worker's exception is raised here, so Flower reports it as the ClientApp's error."""
    sock = ensure_started(run_config, node_config, run_id, node_id, idle)
    with sock:
        header = {"kind": kind, "run_config": run_config, "node_config": node_config, "run_id": run_id,
                  "node_id": node_id}
        _send(sock, header, to_bytes(content))
        reply, payload = _recv(sock)
    if reply.get("error"):
        raise RuntimeError(f"warm worker: {reply['error']}")
    return from_bytes(payload)


# --- the worker process ----------------------------------------------------------------------------


def serve(path: Path, watch_pid: int | None, idle: float, prebuild: Path | None = None) -> None:
    # The worker process needs the model stack; this module is also imported by the thin ClientApp
    # (``call``), which must not pay for torch: a start-up cost, not an import cycle.
    from fedpeft.deploy.flower import node

    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(16)  # connections made while the worker builds wait in the backlog
    server.settimeout(1.0)
    last = [time.monotonic()]
    stop = threading.Event()
    if prebuild is not None and prebuild.is_file():
        request = json.loads(prebuild.read_text())
        try:
            node.get_worker(request["run_config"], request["node_config"], int(request["run_id"]),
                                  int(request["node_id"]))
        except Exception:  # reported again (to the server) by the first train request
            traceback.print_exc()
        last[0] = time.monotonic()

    def watchdog() -> None:
        while not stop.is_set():
            if (watch_pid and not _alive(watch_pid)) or time.monotonic() - last[0] > idle:
                _remove_worker_files(path)
                os._exit(0)
            time.sleep(1.0)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                try:
                    header, payload = _recv(conn)
                except (ConnectionError, ValueError, struct.error):
                    continue  # a caller that only checked the worker is up, or went away
                try:
                    handler = node.HANDLERS.get(header["kind"])
                    if handler is None:
                        raise ValueError(f"unknown request {header['kind']!r}")
                    content = handler(from_bytes(payload), header["run_config"], header["node_config"],
                                      int(header["run_id"]), int(header["node_id"]))
                    _send(conn, {"error": None}, to_bytes(content))
                except Exception as exc:  # the ClientApp raises it: Flower's error reply
                    traceback.print_exc()
                    with contextlib.suppress(OSError):
                        _send(conn, {"error": f"{type(exc).__name__}: {exc}"}, b"")
            last[0] = time.monotonic()
    finally:
        stop.set()
        _remove_worker_files(path, keep_log=True)  # an error ended it: the ClientApp shows the log


def _remove_worker_files(path: Path, keep_log: bool = False) -> None:
    """A worker that ends leaves nothing in the temp directory: socket, pid, start request, start lock and,
    unless an error ended it, its log."""
    for suffix in (".pid", ".json", ".lock") + (() if keep_log else (".log",)):
        with contextlib.suppress(FileNotFoundError):
            path.with_suffix(suffix).unlink()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description="fedpeft warm worker for a Flower SuperNode")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--watch-pid", type=int, default=None)
    parser.add_argument("--idle", type=float, default=IDLE_SECONDS)
    parser.add_argument("--prebuild", default=None, help="JSON file with run_config, node_config, run_id, node_id")
    args = parser.parse_args()
    serve(Path(args.socket), args.watch_pid, args.idle, Path(args.prebuild) if args.prebuild else None)


if __name__ == "__main__":
    main()
