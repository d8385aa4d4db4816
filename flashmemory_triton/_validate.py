"""Input checks shared by every public entry point.

Each check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, range or
device) naming the argument, what was expected and what came, before any kernel launches.
"""

from __future__ import annotations

import torch

from . import constants as C

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def tensor(name: str, t, *, dtype=None, dtypes=None, ndim=None, ndims=None,
           floating: bool = False, integer: bool = False) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {describe(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have one of dtypes {[str(d) for d in dtypes]}, "
                        f"got {describe(t)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {describe(t)}")
    if integer and t.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got {describe(t)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got {describe(t)}")
    if ndims is not None and t.dim() not in ndims:
        raise ValueError(f"{name} must have one of {sorted(ndims)} dims, got {describe(t)}")
    return t


def same_device(device: torch.device, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the retriever/weights are on "
                             f"{device}; move it with .to({str(device)!r})")


def compressed_keys(name: str, k: torch.Tensor, head_dim: int = C.HEAD_DIM,
                    ndims=(3, 4)) -> torch.Tensor:
    tensor(name, k, dtype=torch.uint8, ndims=ndims)
    if k.shape[-1] != head_dim + C.SCALE_BYTES:
        raise ValueError(f"{name} last dim must be {head_dim + C.SCALE_BYTES} "
                         f"({head_dim} e4m3 bytes + a 4-byte float32 scale), got {describe(k)}")
    return k


def positions(name: str, pos: torch.Tensor, batch: int) -> torch.Tensor:
    tensor(name, pos, integer=True, ndim=1)
    if pos.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},) to match the batch, got {describe(pos)}")
    if pos.numel() and bool((pos < 0).any()):
        raise ValueError(f"{name} must be non-negative token positions, got min {int(pos.min())}")
    return pos


def choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
