"""Counted work, the card's own ceilings, and where each kernel sits under them.

FLOPs and bytes are COUNTED from the algorithm (design §5), never read from a profiler, so every
provider of a shape gets the same numbers and a faster provider is one that does the same
work in less time. The ceilings are measured in the same run: a large matmul per precision and
a large device copy (bytes read + bytes written, the convention the counted bytes use).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch

from flashmemory_triton import constants as C
from flashmemory_triton.utils import _device

from .inputs import ModelDims
from .sweeps import Shape

# A precision without its own measured ceiling is held to the next one: fp8 dots run on the
# bf16 peak where fp8 tensor cores are missing; tf32 on the CPU is plain fp32.
_CEILING_FALLBACK = {"fp8": "bf16", "tf32": "fp32", "bf16": "fp32", "fp32": None}


@dataclasses.dataclass
class Work:
    flops: int
    bytes: int

    @property
    def intensity(self) -> float:
        """FLOP per byte moved."""
        return self.flops / self.bytes if self.bytes else float("inf")


def _key_bytes(shape: Shape, dims: ModelDims) -> int:
    """Every key buffer read once: one shared buffer, or one per layer."""
    buffers = dims.n_layers if shape.per_layer else 1
    return buffers * shape.batch * shape.n * C.CHUNK_BYTES


def scoring_work(shape: Shape, dims: ModelDims, with_logits: bool = False) -> Work:
    """The scorer: every layer scores every chunk; keys read once, fp32 projected queries and
    head weights read, fp32 ensemble scores (and optionally per-layer logits) written."""
    L, B, N, H = dims.n_layers, shape.batch, shape.n, dims.heads
    flops = L * B * N * C.flops_per_chunk_per_layer(H)
    nbytes = _key_bytes(shape, dims) + L * B * H * (C.HEAD_DIM + 1) * 4 + B * N * 4
    if with_logits:
        nbytes += L * B * N * 4
    return Work(flops, nbytes)


def cycle_work(shape: Shape, dims: ModelDims) -> Work:
    """The full retrieval cycle: projections (fp32 hidden states and every layer's fp32
    weights read once), scoring, then page selection (scores read, bool keep-mask written)."""
    L, B, N, H = dims.n_layers, shape.batch, shape.n, dims.heads
    per_layer_proj = dims.hidden * dims.rank + dims.rank * H * C.HEAD_DIM + dims.hidden * H
    flops = L * B * (2 * per_layer_proj + N * C.flops_per_chunk_per_layer(H))
    hidden_rows = L * B if shape.per_layer else B
    nbytes = (L * dims.params_per_layer() * 4 + hidden_rows * dims.hidden * 4
              + _key_bytes(shape, dims) + B * N * 4  # scoring: keys in, scores out
              + B * N * (4 + 1))  # selection: scores in, mask out
    return Work(flops, nbytes)


@dataclasses.dataclass
class Ceilings:
    """Measured peaks of this device: matmul TFLOP/s by precision, copy GB/s (read + write)."""
    matmul_tflops: dict[str, float]
    copy_gbps: float
    notes: list[str]

    def compute_peak(self, precision: str) -> tuple[float | None, str | None]:
        """``(TFLOP/s, ceiling used)`` for a dot product in ``precision``."""
        p: str | None = precision
        while p is not None and p not in self.matmul_tflops:
            p = _CEILING_FALLBACK.get(p)
        return (self.matmul_tflops[p], p) if p is not None else (None, None)

    def attainable_tflops(self, precision: str, intensity: float) -> tuple[float | None, str]:
        """Roofline: ``min(compute peak, intensity * bandwidth)`` and which side binds."""
        peak, _ = self.compute_peak(precision)
        memory_roof = intensity * self.copy_gbps / 1e3 if self.copy_gbps else None
        if peak is None and memory_roof is None:
            return None, ""
        if peak is None or (memory_roof is not None and memory_roof < peak):
            return memory_roof, "memory"
        return peak, "compute"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@contextlib.contextmanager
def fp32_matmul_mode(tf32: bool):
    """fp32 matmuls on tensor cores (tf32) or in full fp32, restored on exit.

    Through ``set_float32_matmul_precision``, which keeps torch's legacy and per-backend
    flags consistent; setting ``torch.backends.cuda.matmul.fp32_precision`` alone leaves them
    mixed, and torch >= 2.9 then raises when anything reads ``allow_tf32``.
    """
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _matmul_tflops(device, dtype, size, time_ms, tf32=False) -> float:
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=gen).to(dtype)
    b = torch.randn(size, size, device=device, generator=gen).to(dtype)
    with fp32_matmul_mode(tf32):
        ms = time_ms(lambda: a @ b)
    return 2 * size ** 3 / (ms * 1e-3) / 1e12


def _fp8_matmul_tflops(device, size, time_ms) -> float:
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=gen).to(torch.float8_e4m3fn)
    b = torch.randn(size, size, device=device, generator=gen).to(torch.float8_e4m3fn)
    one = torch.ones((), device=device)
    # _scaled_mm wants the second operand column-major: b.t() of a row-major b is.
    ms = time_ms(lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one,
                                          out_dtype=torch.bfloat16))
    return 2 * size ** 3 / (ms * 1e-3) / 1e12


def _copy_gbps(device, nbytes, time_ms) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure_ceilings(device: torch.device, time_ms: Callable[[Callable], float]) -> Ceilings:
    """Peak matmul TFLOP/s per precision and copy GB/s, timed with ``time_ms(fn)``."""
    on_gpu = device.type == "cuda"
    # Large enough to saturate an H100/H200 (8192^3: ~1 ms in bf16); small on the CPU, where
    # the numbers only make the roofline plot drawable.
    size = 8192 if on_gpu else 1024
    notes: list[str] = []
    peaks: dict[str, float] = {}
    peaks["fp32"] = _matmul_tflops(device, torch.float32, size // 2 if on_gpu else size, time_ms)
    peaks["bf16"] = _matmul_tflops(device, torch.bfloat16, size, time_ms)
    if on_gpu:
        peaks["tf32"] = _matmul_tflops(device, torch.float32, size, time_ms, tf32=True)
        if _device.has_hw_fp8(device):
            try:
                peaks["fp8"] = _fp8_matmul_tflops(device, size, time_ms)
            except (RuntimeError, AttributeError, TypeError) as exc:
                notes.append(f"fp8 matmul ceiling not measured (torch._scaled_mm: "
                             f"{str(exc).splitlines()[0]}); fp8 rows use the bf16 ceiling")
        else:
            notes.append("no fp8 tensor cores (needs sm_89+): fp8 rows use the bf16 ceiling")
    else:
        notes.append("CPU ceilings: a 1024^3 matmul and a 64 MiB copy, only to draw the plot")
    copy = _copy_gbps(device, (1 << 30) if on_gpu else (64 << 20), time_ms)
    return Ceilings(matmul_tflops=peaks, copy_gbps=copy, notes=notes)
