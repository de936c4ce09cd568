"""glibc malloc tuning for CPU training: keep large buffers in the heap instead of mmap/munmap per step.

By default glibc serves every allocation above its (dynamic) mmap threshold with a fresh ``mmap`` and
returns it with ``munmap`` when freed; it also trims the heap top back to the OS. A CPU training step
allocates and frees activation and gradient buffers of tens to hundreds of MB, so each step pays for
the page faults of memory it just gave back. Setting

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000

(or the same through ``mallopt`` at run time, which is what :func:`tune_malloc` does) keeps freed
buffers in the heap for reuse. The price: memory freed after the peak is not returned to the OS until
the process ends (the peak RSS itself does not grow in our measurements; see ``bench/engine_overhead.py``).

:func:`tune_malloc` does nothing (and says so) on non-glibc systems, when the user set either variable
in the environment, or when ``FEDPEFT_MALLOC=default``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 100_000_000_000
ENV_VARS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
OPT_OUT_ENV = "FEDPEFT_MALLOC"

_applied: bool | None = None


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # glibc only (musl has no such symbol)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def tune_malloc(mmap_max: int = 0, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Apply the glibc settings above to this process (idempotent); True when they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get(OPT_OUT_ENV, "").lower() == "default":
        _applied = False
        return False
    if any(var in os.environ for var in ENV_VARS):
        log.debug("malloc: leaving the user's %s as set", " / ".join(v for v in ENV_VARS if v in os.environ))
        _applied = all(var in os.environ for var in ENV_VARS)
        return _applied
    libc = _libc()
    if libc is None:
        log.debug("malloc: not glibc, nothing to tune")
        _applied = False
        return False
    trim = min(trim_threshold, 2**31 - 1)  # mallopt takes an int; 2 GiB is as good as 'never' here
    ok = bool(libc.mallopt(M_MMAP_MAX, mmap_max)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim))
    _applied = ok
    log.debug("malloc: mallopt(M_MMAP_MAX=%d, M_TRIM_THRESHOLD=%d) -> %s", mmap_max, trim, ok)
    return ok


def malloc_mode() -> str:
    """A short description of the allocator setting in effect, for logs and benchmark tables."""
    if all(var in os.environ for var in ENV_VARS):
        return "env " + " ".join(f"{v}={os.environ[v]}" for v in ENV_VARS)
    if _applied:
        return "mallopt (fedpeft.metering.allocator.tune_malloc)"
    return "glibc default"
