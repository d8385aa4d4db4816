"""What the current machine can do: the one place tests and dispatch ask.

Nothing here touches CUDA at import time; every query is a function call.
"""

from __future__ import annotations

import functools
import os

import torch


def interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def cuda_available() -> bool:
    return torch.cuda.is_available()


def capability(device: torch.device | str | None = None) -> tuple[int, int] | None:
    """``(major, minor)`` of a CUDA device, ``None`` for anything else."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda":
        return None
    if not cuda_available():
        return None
    return torch.cuda.get_device_capability(device)


HW_FP8_CAPABILITY = (8, 9)  # the first compute capability with e4m3 conversions


def has_hw_fp8(device: torch.device | str | None = None) -> bool:
    """Native e4m3 conversions and fp8 tensor-core dots (sm_89 and newer).

    Under the interpreter the answer is ``False``: its e4m3 emulation does not produce NaN
    for the two NaN encodings, so the bit-decoding path (the sm_80 path) is used there.
    """
    cap = capability(device)
    return cap is not None and cap >= HW_FP8_CAPABILITY


def triton_runs_on(device: torch.device | str) -> bool:
    """Can a Triton kernel take tensors on ``device``?"""
    device = torch.device(device)
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()
