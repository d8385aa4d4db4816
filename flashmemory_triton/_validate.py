"""Input checks shared by every public entry point.

Each check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, range or
device) naming the argument, what was expected and what came, before any kernel launches.

Value checks (negative positions) read tensor data, which is a host sync. They are skipped
where reading is impossible or harmful: on the ``meta`` device (no data) and on a CUDA stream
that is being captured into a graph (a sync would break the capture); shapes, dtypes and
devices are still checked there. See ``docs/validation.md``.
"""

from __future__ import annotations

import math

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


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if it is laid out exactly as a fresh contiguous tensor (row-major strides,
    size-1 dims included, storage offset 0), else such a copy. ``.contiguous()`` is not enough
    for a GEMM operand: it keeps odd strides of size-1 dims and any offset, and BLAS may then
    take another path and round differently; this keeps results independent of the layout."""
    want, acc = [], 1
    for size in reversed(t.shape):
        want.append(acc)
        acc *= size
    if t.storage_offset() == 0 and tuple(t.stride()) == tuple(reversed(want)):
        return t
    return t.clone(memory_format=torch.contiguous_format)


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


def values_readable(device: torch.device) -> bool:
    """May a check read tensor values (a host sync) here? Never on meta, never on a CUDA
    stream that is capturing a graph."""
    if device.type == "meta":
        return False
    if device.type == "cuda":
        return not torch.cuda.is_current_stream_capturing()
    return True


def positions(name: str, pos: torch.Tensor, batch: int) -> torch.Tensor:
    """Integer ``[batch]`` token positions; negative values are refused when readable (see
    :func:`values_readable`: not on meta, not during CUDA graph capture)."""
    tensor(name, pos, integer=True, ndim=1)
    if pos.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},) to match the batch, got "
                         f"{describe(pos)}")
    if pos.numel() and values_readable(pos.device) and bool((pos < 0).any()):
        raise ValueError(f"{name} must be non-negative token positions, got min {int(pos.min())}")
    return pos


def choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def real_number(name: str, value, *, finite: bool = True) -> float:
    """A Python/numpy real scalar (not bool, not a tensor), finite unless ``finite=False``
    (NaN is always refused)."""
    import math
    import numbers
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int past the float range: beyond every float, like +-inf
        value = math.inf if value > 0 else -math.inf
    if math.isnan(value) or (finite and math.isinf(value)):
        raise ValueError(f"{name} must be a {'finite ' if finite else ''}number, got {value!r}")
    return value


ADDRESS_LIMIT = 2 ** 63  # bytes: torch sizes, strides and byte counts are int64


def addressable(what: str, shape, element_size: int, **args) -> None:
    """Refuse, naming ``args`` (the arguments that size it, with their values), an allocation
    of ``shape`` that cannot exist: its bytes (empty dims counted as 1, as torch's stride
    arithmetic does) reach 2**63, where torch fails with an internal overflow naming nothing.
    Sizes below that pass (a real out-of-memory stays torch's)."""
    if math.prod(max(int(d), 1) for d in shape) * element_size >= ADDRESS_LIMIT:
        named = ", ".join(f"{k} = {v!r}" for k, v in args.items())
        raise ValueError(f"{named}: too large, {what} {list(shape)} of {element_size}-byte "
                         f"elements would pass 2**63 bytes")


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def device(name: str, value) -> torch.device:
    """A device a user asked for by name: parseable, cpu or cuda, and available."""
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{name} must be 'cpu' or 'cuda[:N]', got {value!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be 'cpu' or 'cuda[:N]' (only cpu and cuda are "
                         f"supported), got {value!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} is {value!r} but CUDA is not available "
                             f"(torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name} is {value!r} but there are only "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return dev
