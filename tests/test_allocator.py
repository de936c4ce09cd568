"""glibc malloc tuning: its effect measured through glibc itself; opt-out and user settings are respected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fedpeft.metering.allocator as allocator


def test_opt_out(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setenv("FEDPEFT_MALLOC", "default")
    assert allocator.tune_malloc() is False
    assert allocator.malloc_mode() == "glibc default"


def test_user_env_is_left_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.delenv("FEDPEFT_MALLOC", raising=False)
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "100000000000")
    assert allocator.tune_malloc() is True
    assert allocator.malloc_mode().startswith("env ")


# A child process tunes (or not), then mallocs 64 MiB and reports how many bytes glibc serves from mmap
# (mallinfo2().hblkhd, read through ctypes independently of the module under test).
_PROBE = """
import ctypes, json, sys
import fedpeft.metering.allocator as allocator
applied = allocator.tune_malloc()

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
before = libc.mallinfo2().hblkhd
buf = libc.malloc(64 << 20)
after = libc.mallinfo2().hblkhd
print(json.dumps({"applied": applied, "mmapped": after - before}))
"""


def _probe(env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("FEDPEFT_MALLOC", *allocator.ENV_VARS)}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(allocator.__file__).parents[2]), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not (sys.platform.startswith("linux") and "glibc" in (os.confstr("CS_GNU_LIBC_VERSION") or "")),
                    reason="glibc only")
def test_on_glibc_large_buffers_stay_in_the_heap():
    """The module's stated effect: with the tuning, a 64 MiB malloc is not served by mmap; without it
    (glibc's default mmap threshold is at most 32 MiB) it is."""
    default = _probe({"FEDPEFT_MALLOC": "default"})
    tuned = _probe({})
    assert default == {"applied": False, "mmapped": default["mmapped"]} and default["mmapped"] >= 64 << 20
    assert tuned == {"applied": True, "mmapped": 0}


def test_idempotent(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    for var in ("FEDPEFT_MALLOC", *allocator.ENV_VARS):
        monkeypatch.delenv(var, raising=False)
    applied = allocator.tune_malloc()
    assert allocator.tune_malloc() is applied
