"""Peak memory of this process: RSS from the kernel's high-water mark, and CUDA when present.

CUDA peaks are per window: :func:`reset_peak_cuda` starts one (the engine does so before every client
job), :func:`peak_cuda_mb` reads the highest ``torch.cuda.max_memory_allocated`` since then. Allocated
memory is what tensors hold; the caching allocator may reserve more (``max_memory_reserved``), which
is also reported where the engine logs it.
"""

from __future__ import annotations

import resource
import sys

import torch


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _cuda_index(device) -> int | None:
    if not torch.cuda.is_available():
        return None
    if device is None:
        return torch.cuda.current_device()
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def reset_peak_cuda(device=None) -> None:
    """Start a new peak window on ``device`` (default: the current CUDA device; no-op without CUDA)."""
    index = _cuda_index(device)
    if index is not None:
        torch.cuda.reset_peak_memory_stats(index)


def peak_cuda_mb(device=None) -> float | None:
    """Highest CUDA memory allocated by tensors since the last reset, in MiB; None without CUDA or for a
    CPU ``device``."""
    index = _cuda_index(device)
    if index is None:
        return None
    return torch.cuda.max_memory_allocated(index) / (1024 * 1024)


def peak_cuda_reserved_mb(device=None) -> float | None:
    index = _cuda_index(device)
    if index is None:
        return None
    return torch.cuda.max_memory_reserved(index) / (1024 * 1024)
