"""Run a generated program in a separate, limited process: the code-evaluation sandbox.

Each program runs in its own Python process, never in the evaluator's: ``subprocess.Popen`` of
``python -I -B bootstrap.py`` with

- a fresh temporary directory as its working directory, ``HOME`` and ``TMPDIR`` (deleted afterwards);
- resource limits set in ``preexec_fn`` (between fork and exec) with ``resource.setrlimit``: CPU seconds
  (``RLIMIT_CPU``), address space (``RLIMIT_AS``), size of any file it writes (``RLIMIT_FSIZE``), open
  files (``RLIMIT_NOFILE``), no core dumps, and no new processes (``RLIMIT_NPROC`` = 0);
- its own session and process group (``start_new_session``), killed whole with ``SIGKILL`` when the
  wall-clock timeout passes and again after it exits, so no child it managed to start survives it;
- a minimal environment (none of the evaluator's variables, so no tokens or credentials; proxies
  pointed at a closed local port; BLAS/OpenMP limited to one thread), stdin from ``/dev/null``, stdout
  and stderr to files in its directory (so their size is bounded by ``RLIMIT_FSIZE``);
- a bootstrap that, before the program runs, installs an audit hook (``sys.addaudithook``: hooks cannot
  be removed) refusing, with ``PermissionError``:
  * opening a file for writing, creating, deleting, renaming, linking or changing the mode/owner of a
    path outside the temporary directory (``/dev/null`` excepted); reading is allowed;
  * starting processes: ``os.fork``/``forkpty``, ``os.system``, ``os.exec*``, ``os.spawn*``,
    ``os.posix_spawn``, ``subprocess.Popen``; sending signals (``os.kill``/``killpg``);
  * network: creating a socket of any family but ``AF_UNIX``, name resolution (``getaddrinfo``...);
  * raising resource limits again (``resource.setrlimit``), and the ways to reach the hook's own objects
    or raw memory (``gc.get_objects``/``get_referrers``/``get_referents``, ctypes foreign calls and
    raw-memory access);
  the socket module's ``socket`` class and ``_posixsubprocess.fork_exec`` (which raises no audit event)
  are also replaced by functions that refuse.

What is guaranteed and what is not. The program cannot run in the evaluator's process, cannot outlive
its timeout, cannot use more CPU time, address space or file size than its limits, and sees none of the
evaluator's environment: these are enforced by the kernel and the parent. ``RLIMIT_NPROC`` stops forks
at the kernel level only for a non-root user (the kernel exempts root); as root, forks are stopped by the
audit hook, and anything that escaped it is killed with the process group. The file-system and network
rules are the audit hook's: they stop ordinary Python code (``open``, ``os``, ``shutil``, ``pathlib``,
``socket``, ``subprocess``, ``urllib``), not a C extension that calls the C library directly; there is no
kernel-level file-system or network isolation without root (namespaces, seccomp, containers). Use a
container or VM for code that may be adversarial; this sandbox is for model-written code that is merely
wrong (infinite loops, runaway memory, stray file writes, a fork in a loop).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

# The child's bootstrap: install the audit hook, then run program.py as __main__.
BOOTSTRAP = r'''
import os, sys

def _install(root):
    import socket as _socket
    _realpath, _fspath, _fsdecode = os.path.realpath, os.fspath, os.fsdecode
    _write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    _root = _realpath(root)
    _af_unix = getattr(_socket, "AF_UNIX", 1)
    _refused = frozenset((
        "os.fork", "os.forkpty", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "subprocess.Popen",
        "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit", "resource.prlimit",
        "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr",
        "socket.getnameinfo", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function", "ctypes.cdata", "ctypes.string_at", "ctypes.wstring_at", "ctypes.PyObj_FromPtr",
    ))
    _path_events = frozenset((
        "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink", "os.link",
        "os.truncate", "os.utime", "os.setxattr", "os.removexattr", "shutil.rmtree", "shutil.copyfile",
        "shutil.copymode", "shutil.copystat", "shutil.move", "os.chflags", "os.lchflags",
    ))
    # Events whose first path is only read (a copy's source, a symlink's target): only the rest is checked.
    _source_first = frozenset(("os.symlink", "shutil.copyfile", "shutil.copymode", "shutil.copystat"))

    def _inside(path):
        if isinstance(path, int):  # an open descriptor: its path was checked when it was opened
            return True
        try:
            text = _fspath(path)
        except TypeError:
            return True  # not a path argument (a mode, a flag)
        if isinstance(text, bytes):
            text = _fsdecode(text)
        real = _realpath(text)
        return real == _root or real.startswith(_root + os.sep) or real == "/dev/null"

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _write_flags)
            if writing and not _inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside its directory is not allowed")
        elif event in _path_events:
            for arg in (args[1:] if event in _source_first else args):
                if isinstance(arg, (str, bytes, os.PathLike)) and not _inside(arg):
                    raise PermissionError(f"sandbox: {event} on {arg!r} outside its directory is not allowed")
        elif event in _refused:
            raise PermissionError(f"sandbox: {event} is not allowed")
        elif event == "socket.__new__" and args[1] != _af_unix:
            raise PermissionError("sandbox: network sockets are not allowed")

    sys.addaudithook(_hook)

    # subprocess forks through _posixsubprocess.fork_exec, which raises no audit event of its own.
    import _posixsubprocess

    def _no_fork_exec(*args, **kwargs):
        raise PermissionError("sandbox: _posixsubprocess.fork_exec is not allowed")

    _posixsubprocess.fork_exec = _no_fork_exec

    class _NoSocket(_socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("sandbox: network sockets are not allowed")

    _socket.socket = _NoSocket


_install(os.getcwd())
del _install
sys.dont_write_bytecode = True
with open("program.py", encoding="utf-8") as _handle:
    _source = _handle.read()
del _handle
_code = compile(_source, "program.py", "exec")
del _source
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
'''

STATUSES = ("passed", "failed", "timeout")


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0
    """Wall-clock seconds before the process group is killed."""
    cpu_s: int = 10
    """CPU seconds (RLIMIT_CPU soft limit; SIGKILL one second later)."""
    memory_bytes: int = 2 * 1024**3
    """Address space (RLIMIT_AS)."""
    file_size_bytes: int = 16 * 1024**2
    """Largest file it may write, its stdout/stderr included (RLIMIT_FSIZE)."""
    open_files: int = 256
    """RLIMIT_NOFILE."""
    output_chars: int = 2000
    """Characters of stdout/stderr kept (the end of each)."""

    def __post_init__(self):
        for name in ("timeout_s", "cpu_s", "memory_bytes", "file_size_bytes", "open_files"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"sandbox limit {name} = {value!r}; expected a number > 0")


@dataclass(frozen=True)
class ExecResult:
    status: str
    """passed (exit code 0) | failed (any other exit) | timeout (killed at the wall-clock limit)."""
    returncode: int | None
    seconds: float
    stdout: str
    stderr: str
    reason: str = ""
    """Why it did not pass, in words (the last line of the error, the signal that killed it)."""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _apply_limits(limits: SandboxLimits) -> None:
    """Runs in the child between fork and exec (``preexec_fn``). It takes no lock and imports nothing
    (``resource`` is imported already), which keeps it safe when the evaluator has other threads."""
    cpu = int(limits.cpu_s)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size_bytes, limits.file_size_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))


def _environment(workdir: str) -> dict[str, str]:
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens, so a proxied request fails at once
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
           "PYTHONIOENCODING": "utf-8", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for key in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[key] = closed
    return env


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, chars: int) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 4 * chars))
            return handle.read().decode("utf-8", errors="replace")[-chars:]
    except OSError:
        return ""


def _reason(returncode: int | None, stderr: str) -> str:
    if returncode is None or returncode == 0:
        return ""
    if returncode < 0:
        sig = -returncode
        if sig == signal.SIGXCPU:
            return "CPU time limit exceeded (SIGXCPU)"
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return f"killed by {name}" + (" (CPU hard limit)" if sig == signal.SIGKILL else "")
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {returncode}"


def run_program(source: str, limits: SandboxLimits | None = None, python: str | None = None) -> ExecResult:
    """Execute ``source`` as a Python program in the sandbox and report how it ended."""
    limits = limits or SandboxLimits()
    with tempfile.TemporaryDirectory(prefix="fedpeft-sandbox-") as workdir:
        work = Path(workdir)
        (work / "program.py").write_text(source, encoding="utf-8")
        (work / "bootstrap.py").write_text(BOOTSTRAP, encoding="utf-8")
        start = time.perf_counter()
        with (work / "stdout.txt").open("wb") as out, (work / "stderr.txt").open("wb") as err:
            proc = subprocess.Popen(
                [python or sys.executable, "-I", "-B", "bootstrap.py"],
                cwd=workdir, env=_environment(workdir), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, close_fds=True, preexec_fn=partial(_apply_limits, limits),
            )
            try:
                returncode = proc.wait(timeout=limits.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)  # whatever it started dies with it
                if proc.poll() is None:
                    proc.wait()
        seconds = time.perf_counter() - start
        stdout = _tail(work / "stdout.txt", limits.output_chars)
        stderr = _tail(work / "stderr.txt", limits.output_chars)
    if timed_out:
        return ExecResult("timeout", None, seconds, stdout, stderr, f"wall-clock timeout after {limits.timeout_s:g} s")
    status = "passed" if returncode == 0 else "failed"
    return ExecResult(status, returncode, seconds, stdout, stderr, _reason(returncode, stderr))


def run_programs(sources: Sequence[str], limits: SandboxLimits | None = None, workers: int = 1) -> list[ExecResult]:
    """``run_program`` for each source, ``workers`` at a time (threads that only wait on processes)."""
    if workers < 1:
        raise ValueError(f"sandbox workers = {workers!r}; expected an integer >= 1")
    if workers == 1:
        return [run_program(s, limits) for s in sources]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(partial(run_program, limits=limits), sources))
