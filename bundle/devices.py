"""Where and in which precision torch runs: one device choice and one autocast rule for
training and inference."""

from __future__ import annotations

import contextlib

import torch

from .errors import InputRefused

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device="auto") -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; anything else is refused."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputRefused(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InputRefused(f"device {device} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputRefused("--device cuda requested but CUDA is not available here; use --device cpu or auto")
    return device


def precision_context(device, precision="auto"):
    """Autocast for ``precision`` (one of :data:`PRECISIONS`). ``auto``: bf16 on CUDA where
    supported, else fp16; float32 on the CPU (where bf16 is slower and less exact), unless
    ``bf16`` is asked for. ``fp32``: no autocast anywhere."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise InputRefused(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device.type == "cuda" and precision != "fp32":
        dtype = torch.bfloat16 if precision != "fp16" and torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if device.type == "cpu" and precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def needs_grad_scaler(device, precision="auto") -> bool:
    """fp16 autocast needs a gradient scaler; bf16 and float32 do not."""
    device = torch.device(device)
    if device.type != "cuda" or precision in ("fp32", "bf16"):
        return False
    return precision == "fp16" or not torch.cuda.is_bf16_supported()


def unwrap(module):
    """The bare network inside DistributedDataParallel (or itself)."""
    return getattr(module, "module", module)


def as_device_tensor(x, device):
    """Plain float tensor on ``device`` (MONAI transforms hand out MetaTensors)."""
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return x.to(device).float()
