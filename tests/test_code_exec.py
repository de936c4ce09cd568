"""The code sandbox stops an infinite loop, a fork bomb, writes outside its directory, network use."""

from __future__ import annotations

import os
import time

import pytest

from fedpeft.evaluation.code_exec import SandboxLimits, run_program, run_programs

FAST = SandboxLimits(timeout_s=5.0, cpu_s=5)


def test_a_passing_program_and_a_failing_assertion():
    ok = run_program("def f(x):\n    return x + 1\nassert f(1) == 2\nprint('done')\n", FAST)
    assert ok.status == "passed" and ok.returncode == 0 and ok.stdout.strip() == "done"
    bad = run_program("assert 1 + 1 == 3, 'wrong sum'\n", FAST)
    assert bad.status == "failed" and bad.returncode == 1
    assert bad.reason == "AssertionError: wrong sum"


def test_runs_in_another_process_with_a_fresh_directory_and_no_inherited_environment(monkeypatch):
    monkeypatch.setenv("FEDPEFT_SECRET_TOKEN", "do-not-leak")
    result = run_program("import os\nprint(os.getpid())\nprint(os.getcwd())\nprint(os.environ.get('FEDPEFT_SECRET_TOKEN'))\n",
                         FAST)
    pid, cwd, secret = result.stdout.split()
    assert int(pid) != os.getpid()
    assert os.path.basename(cwd).startswith("fedpeft-sandbox-")
    assert not os.path.exists(cwd)  # the directory is removed afterwards
    assert secret == "None"


def test_wall_clock_timeout_kills_an_infinite_loop():
    limits = SandboxLimits(timeout_s=1.5, cpu_s=30)  # the wall clock, not the CPU limit, must stop it
    start = time.perf_counter()
    result = run_program("while True:\n    pass\n", limits)
    assert result.status == "timeout" and result.returncode is None
    assert time.perf_counter() - start < 10


def test_cpu_limit_kills_a_busy_loop_before_the_wall_clock():
    result = run_program("x = 0\nwhile True:\n    x += 1\n", SandboxLimits(timeout_s=30, cpu_s=1))
    assert result.status == "failed"
    assert "CPU" in result.reason


def test_fork_bomb_is_refused_and_leaves_no_process():
    bomb = "import os\nwhile True:\n    os.fork()\n"
    result = run_program(bomb, FAST)
    assert result.status == "failed"
    assert "os.fork is not allowed" in result.reason
    # The other ways to start a process are refused too.
    for source in ("import subprocess\nsubprocess.run(['true'])\n", "import os\nos.system('true')\n",
                   "import multiprocessing as m\np = m.Process(target=print)\np.start()\np.join()\n",
                   "import os\nos.execv('/bin/true', ['true'])\n",
                   "import _posixsubprocess\n_posixsubprocess.fork_exec()\n"):
        assert "is not allowed" in run_program(source, FAST).reason, source


def test_no_new_processes_limit_is_set_in_the_child():
    source = "import resource\nprint(*resource.getrlimit(resource.RLIMIT_NPROC))\nprint(*resource.getrlimit(resource.RLIMIT_AS))\n"
    result = run_program(source, SandboxLimits(memory_bytes=1024**3))
    nproc, address_space = result.stdout.strip().splitlines()
    assert nproc == "0 0"
    assert address_space == f"{1024**3} {1024**3}"
    # ...and the program cannot raise them again (root could, without the audit hook).
    raised = run_program("import resource\nresource.setrlimit(resource.RLIMIT_NPROC, (100, 100))\n", FAST)
    assert "resource.setrlimit is not allowed" in raised.reason


def test_a_write_outside_its_directory_is_refused(tmp_path):
    outside = tmp_path / "outside.txt"
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    attempts = [
        f"open({str(outside)!r}, 'w').write('x')\n",
        f"import os\nos.close(os.open({str(outside)!r}, os.O_CREAT | os.O_WRONLY))\n",
        f"import pathlib\npathlib.Path({str(outside)!r}).write_text('x')\n",
        f"import os\nos.chdir({str(tmp_path)!r})\nopen('outside.txt', 'a').write('x')\n",
        # a symlink inside the directory pointing outside does not help: the real path is checked
        f"import os\nos.symlink({str(outside)!r}, 'link')\nopen('link', 'w').write('x')\n",
        f"import os\nos.remove({str(keep)!r})\n",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
        f"import os\nos.rename({str(keep)!r}, 'stolen.txt')\n",
    ]
    for source in attempts:
        result = run_program(source, FAST)
        assert result.status == "failed" and "outside its directory is not allowed" in result.reason, source
    assert not outside.exists()
    assert keep.read_text() == "precious"
    # Inside its own directory, writing works; reading elsewhere is allowed.
    inside = run_program(f"open('note.txt', 'w').write('hello')\nprint(open('note.txt').read())\n"
                         f"print(open({str(keep)!r}).read())\n", FAST)
    assert inside.status == "passed" and inside.stdout.split() == ["hello", "precious"]


def test_file_size_and_memory_limits():
    big = run_program("open('big.bin', 'wb').write(b'x' * 4_000_000)\n", SandboxLimits(file_size_bytes=1_000_000))
    assert big.status == "failed" and "File too large" in big.reason
    memory = run_program("x = bytearray(3 * 1024**3)\n", SandboxLimits(memory_bytes=1024**3))
    assert memory.status == "failed" and "MemoryError" in memory.reason


def test_network_is_refused():
    for source in ("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n",
                   "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)\n",
                   "import socket\nsocket.getaddrinfo('example.com', 80)\n",
                   "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)\n"):
        result = run_program(source, FAST)
        assert result.status == "failed", source
        assert "not allowed" in result.stderr or "Connection refused" in result.stderr, source


def test_run_programs_keeps_order_and_checks_workers():
    results = run_programs(["print(1)", "raise SystemExit(3)", "print(3)"], FAST, workers=2)
    assert [r.status for r in results] == ["passed", "failed", "passed"]
    assert results[1].returncode == 3
    with pytest.raises(ValueError, match="workers = 0"):
        run_programs(["print(1)"], FAST, workers=0)
    with pytest.raises(ValueError, match="sandbox limit timeout_s = 0"):
        SandboxLimits(timeout_s=0)
