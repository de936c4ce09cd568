"""Processes of a federation on one machine (rehearsal) and the ``flwr`` CLI calls to run on one.

``LocalFederation`` starts ``flower-superlink`` and N ``flower-supernode`` processes on 127.0.0.1 with
``--insecure`` on free ports, each in its own process group (so a kill takes its ClientApp child with it),
logs under ``<workdir>/logs``. ``submit`` / ``wait`` run an app folder with ``flwr run`` and read the run's
status from the SuperLink (``flwr ls --format json``): ``flwr run`` itself exits 0 even when the run fails.

Offline-safe environment for every Flower process: telemetry and update check off, no run-time dependency
installation, a private ``FLWR_HOME``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.deploy.flower.settings import node_config_string

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}
CONNECTION = "fedpeft-local"


class DeployError(RuntimeError):
    pass


def scripts_dir() -> Path:
    """The directory of this interpreter's console scripts (the virtual environment's bin/)."""
    return Path(sys.executable).parent


def flower_env(flwr_home: str | Path | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of every Flower process. The interpreter's scripts directory goes first on PATH:
    the SuperLink starts ``flower-superexec`` by name, which fails (exit 3) when the virtual environment
    is not activated."""
    env = {**os.environ, **OFFLINE_ENV, **(extra or {})}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p]
    env["PATH"] = os.pathsep.join([str(scripts_dir()), *[p for p in path if p != str(scripts_dir())]])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def tool(name: str) -> str:
    """A Flower console script, preferably beside this Python (the active virtual environment)."""
    local = scripts_dir() / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"'{name}' not found: install Flower with `pip install 'fedpeft[flower]'`")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise DeployError(f"{what} exited with code {proc.returncode} before listening on port {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise DeployError(f"{what} did not listen on port {port} within {timeout:.0f} s")


def write_connection(flwr_home: str | Path, address: str, name: str = CONNECTION, insecure: bool = True,
                     root_certificates: str | None = None, make_default: bool = True) -> None:
    """Add (or replace) a SuperLink connection in ``$FLWR_HOME/config.toml``."""
    import tomli
    import tomli_w

    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = tomli.loads(path.read_text()) if path.is_file() else {}
    links = doc.setdefault("superlink", {})
    conn: dict[str, Any] = {"address": address, "insecure": insecure}
    if root_certificates:
        conn["root-certificates"] = str(root_certificates)
    links[name] = conn
    if make_default:
        links["default"] = name
    path.write_text(tomli_w.dumps(doc))


def _flwr(args: list[str], env: dict[str, str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([tool("flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _json_out(proc: subprocess.CompletedProcess, what: str) -> dict:
    text = proc.stdout.strip()
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        raise DeployError(f"{what}: unreadable output (exit {proc.returncode}): {text[-2000:]} {proc.stderr[-2000:]}")


def submit(app_dir: str | Path, env: dict[str, str], connection: str = CONNECTION,
           run_config: str | Path | None = None) -> int:
    """``flwr run`` the app folder on a federation; returns the Flower run id."""
    args = ["run", str(app_dir), connection, "--format", "json"]
    if run_config:
        args += ["--run-config", str(run_config)]
    proc = _flwr(args, env)
    out = _json_out(proc, "flwr run")
    if not out.get("success", False) or "run-id" not in out:
        raise DeployError(f"flwr run failed (exit {proc.returncode}): {proc.stdout[-3000:]} {proc.stderr[-3000:]}")
    return int(out["run-id"])


def run_status(run_id: int, env: dict[str, str], connection: str = CONNECTION) -> str:
    """The run's status as the SuperLink reports it, e.g. ``running``, ``finished:completed``."""
    proc = _flwr(["ls", connection, "--run-id", str(run_id), "--format", "json"], env)
    out = _json_out(proc, "flwr ls")
    runs = out.get("runs") or []
    if not out.get("success", False) or not runs:
        raise DeployError(f"flwr ls --run-id {run_id} failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    return str(runs[0].get("status", ""))


def wait_for_run(run_id: int, env: dict[str, str], connection: str = CONNECTION, timeout: float = 3600.0,
                 poll: float = 2.0, alive=None) -> str:
    """Poll until the run is ``finished:*``; returns that status. ``alive()`` may raise to stop early."""
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = run_status(run_id, env, connection)
        if status.startswith("finished"):
            return status
        if alive is not None:
            alive()
        time.sleep(poll)
    raise DeployError(f"run {run_id} still '{status}' after {timeout:.0f} s")


def pull_logs(run_id: int, env: dict[str, str], connection: str = CONNECTION) -> str:
    proc = _flwr(["log", str(run_id), connection, "--show"], env, timeout=60)
    return proc.stdout + proc.stderr


@dataclass
class LocalFederation:
    """A SuperLink and SuperNodes on 127.0.0.1 (use as a context manager: processes stop on exit)."""

    workdir: Path
    node_configs: list[dict[str, Any]]
    env_extra: dict[str, str] = field(default_factory=dict)
    node_env: dict[int, dict[str, str]] = field(default_factory=dict)
    """Extra environment for SuperNode i (e.g. a testing hook)."""
    isolation: str = "subprocess"
    port: int = 0
    superlink: subprocess.Popen | None = None
    supernodes: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        # SuperExec looks for new tasks every 1 s by default; on one machine polling is cheap
        self.env = flower_env(self.flwr_home, {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2", **self.env_extra})

    def process_groups(self) -> set[int]:
        """Process groups of the federation: everything its processes started (ServerApp, ClientApps,
        warm workers) lives in one of them."""
        procs = [*self.supernodes, *([self.superlink] if self.superlink else [])]
        return {p.pid for p in procs if p.poll() is None}

    def _spawn(self, args: list[str], log_name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / log_name, "w") as handle:  # the child keeps its own descriptor
            return subprocess.Popen(args, env={**self.env, **(env or {})}, stdout=handle, stderr=subprocess.STDOUT,
                                    cwd=self.workdir, start_new_session=True)

    def start(self, timeout: float = 60.0) -> LocalFederation:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.superlink = self._spawn([tool("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                                      str(self.port), "--disable-runtime-dependency-installation"], "superlink.log")
        wait_port(self.port, timeout, self.superlink, "flower-superlink")
        write_connection(self.flwr_home, f"127.0.0.1:{self.port}")
        for node_config in self.node_configs:
            self.add_node(node_config, timeout)
        return self

    def add_node(self, node_config: dict[str, Any], timeout: float = 60.0) -> subprocess.Popen:
        port = free_port()
        i = len(self.supernodes)
        proc = self._spawn([tool("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                            "--node-config", node_config_string(node_config), "--host", "127.0.0.1",
                            "--port", str(port), "--isolation", self.isolation], f"supernode-{i}.log",
                           self.node_env.get(i))
        wait_port(port, timeout, proc, f"flower-supernode {i}")
        self.supernodes.append(proc)
        return proc

    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Kill SuperNode ``i`` and its ClientApp children (its process group)."""
        proc = self.supernodes[i]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def check_alive(self) -> None:
        if self.superlink is not None and self.superlink.poll() is not None:
            raise DeployError(f"flower-superlink exited with code {self.superlink.returncode}; "
                              f"see {self.logs / 'superlink.log'}")

    def run(self, app_dir: str | Path, timeout: float = 3600.0) -> tuple[int, str]:
        run_id = submit(app_dir, self.env)
        return run_id, wait_for_run(run_id, self.env, timeout=timeout, alive=self.check_alive)

    def stop(self) -> None:
        procs = [*self.supernodes, *([self.superlink] if self.superlink else [])]
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        # ServerApp / ClientApp processes the SuperLink and SuperNodes started live in their groups too
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def __enter__(self) -> LocalFederation:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def rehearsal_node_configs(num_nodes: int, num_clients: int, store_root: Path | None = None,
                           warm_worker: bool = True) -> list[dict[str, Any]]:
    """Clients spread round-robin over ``num_nodes`` nodes: node i serves clients i, i+N, i+2N, ..."""
    if num_nodes < 1:
        raise ValueError("a rehearsal needs at least one SuperNode")
    if num_nodes > num_clients:
        raise ValueError(f"{num_nodes} SuperNodes but federation.num_clients={num_clients}: every node "
                         "must serve at least one client")
    configs = []
    for i in range(num_nodes):
        ids = list(range(i, num_clients, num_nodes))
        config: dict[str, Any] = {"partition-ids": ",".join(map(str, ids)), "num-partitions": num_clients,
                                  "warm-worker": warm_worker}
        if store_root is not None:
            config["client-store"] = str(Path(store_root) / f"node-{i}")
        configs.append(config)
    return configs
