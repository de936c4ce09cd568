"""Where the model runs and in what precision: the device spec, the autocast context, the quantisation
check and the out-of-memory advice. Pure functions of (spec, what this machine has); no model loads.

``model.device``:

* ``auto`` (default): ``cuda`` (GPU 0) when torch sees a GPU, else ``cpu``;
* ``cpu``; ``cuda`` (GPU 0); ``cuda:N`` (GPU N).

Asking for CUDA on a machine without it, or for a GPU index that does not exist, raises
:class:`DeviceError` naming the field, the value and what this machine has, before anything loads.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch


class DeviceError(ValueError):
    """A device / precision / quantisation request this machine cannot honour."""


def cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(spec: str, cuda_count: int | None = None) -> torch.device:
    """``model.device`` -> a concrete ``torch.device`` (``cuda_count`` overrides what torch sees, for tests)."""
    count = cuda_device_count() if cuda_count is None else cuda_count
    if spec == "auto":
        return torch.device("cuda", 0) if count > 0 else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        index = 0 if spec == "cuda" else int(spec.split(":", 1)[1])
        if count == 0:
            raise DeviceError(f"model.device={spec}: this machine has no CUDA GPU that torch can use "
                              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
                              "use model.device=cpu or model.device=auto")
        if index >= count:
            raise DeviceError(f"model.device={spec}: GPU index {index} does not exist; this machine has {count} "
                              f"GPU(s): cuda:0..cuda:{count - 1}")
        return torch.device("cuda", index)
    raise DeviceError(f"model.device must be auto, cpu, cuda or cuda:N, got {spec!r}")


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def check_quantization(quantization: str, device: torch.device, bnb_available: bool | None = None) -> None:
    """Refuse a quantised base where it cannot run: bitsandbytes' 4/8-bit kernels need CUDA and the package."""
    if quantization == "none":
        return
    if device.type != "cuda":
        raise DeviceError(f"model.quantization={quantization} needs a CUDA GPU (bitsandbytes kernels), but the model "
                          f"device is {device}; use model.quantization=none on CPU, or model.device=cuda on a GPU machine")
    available = bitsandbytes_available() if bnb_available is None else bnb_available
    if not available:
        raise DeviceError(f"model.quantization={quantization} needs bitsandbytes, which is not installed: "
                          "pip install 'fedpeft[gpu]' (or pip install bitsandbytes)")


def check_precision(precision: str, device: torch.device) -> None:
    """bf16 autocast needs a GPU with bfloat16 support (Ampere or newer); CPUs always have it in torch."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"training.precision=bf16: GPU {torch.cuda.get_device_name(device)} has no bfloat16 "
                          "support; use training.precision=fp32")


def autocast(device: torch.device, precision: str):
    """The forward pass's autocast context: bfloat16 on the model's device type for ``bf16``, else none.
    Parameters keep their dtype (the adapter's float32 is the master copy the optimizer updates)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (all of fedpeft's models live on one device)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


OOM_ADVICE = ("lower federation.batch_size (raise federation.grad_accumulation to keep the effective batch), "
              "lower training.max_seq_len, set training.gradient_checkpointing=true, training.precision=bf16, "
              "model.dtype=bfloat16, or model.quantization=4bit (GPU, fedpeft[gpu])")


def is_out_of_memory(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and ("out of memory" in str(exc).lower()
                                                             or isinstance(exc, MemoryError))


class OutOfMemory(RuntimeError):
    """Training ran out of device memory; the message says which settings lower the peak."""


def out_of_memory_error(exc: BaseException, where: str, device: torch.device) -> OutOfMemory:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return OutOfMemory(f"out of memory on {device} during {where} ({first}). To fit: {OOM_ADVICE}")
