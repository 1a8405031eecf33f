"""Devices and numeric precision: `device: auto|cpu|cuda|cuda:N|mps` and `precision: fp32|bf16|fp16`.

`auto` picks CUDA, then MPS, then the CPU. bf16 and fp16 run the forward pass under autocast; fp16
also scales the loss (GradScaler) so that small gradients do not underflow.
"""

from __future__ import annotations

import contextlib

import torch

from distil.errors import ConfigError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """The torch device for `spec`, with an error that says what is available when it is not."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"device '{spec}' is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device '{spec}': no CUDA GPU is available to this torch (build "
                              f"{torch.__version__}). Use device: auto or cpu, or install a CUDA build of torch.")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device '{spec}': there are {count} CUDA GPU(s), numbered 0..{count - 1}")
    elif device.type == "mps" and not _mps_available():
        raise ConfigError(f"device '{spec}': Apple's MPS backend is not available here. Use device: auto or cpu.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device '{spec}': use auto, cpu, cuda, cuda:N or mps")
    return device


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision '{precision}': use one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision bf16: this GPU does not support bfloat16; use fp16 or fp32")


def autocast(device: torch.device, precision: str):
    """A context running the forward pass in `precision` (a no-op for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler, enabled for fp16 only (bf16 has fp32's range)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
