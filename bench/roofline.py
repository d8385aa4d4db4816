"""Counted work, the card's own ceilings, and where each kernel sits under them.

FLOPs and bytes are COUNTED from the algorithm (design §5), never read from a profiler, so every
provider of a shape gets the same numbers and a faster provider is one that does the same
work in less time. The ceilings are measured in the same run: a large matmul per precision and
a large device copy (bytes read + bytes written, the convention the counted bytes use).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import time
from collections.abc import Callable

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


# CPU ceilings: the best of several calls (load on a shared machine only slows a call down, so
# the fastest one is the closest to the peak), on shapes large enough to leave the caches.
CPU_CEILING_CALLS = 3
CPU_MATMUL_SHAPES = ((1536, 1536, 1536), (8192, 128, 384))  # square; the scorer's K = 128 GEMM
CPU_STREAM_BYTES = 384 << 20  # past the last-level cache of current server CPUs


def _best_seconds(fn: Callable[[], object], calls: int = CPU_CEILING_CALLS) -> float:
    fn()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=1)
def measure_cpu_ceilings() -> Ceilings:
    """The CPU's measured peaks: fp32 and bf16 matmul rates (best shape, best call) and memory
    bandwidth as the larger of a copy (read + write) and a pure read, both over buffers past
    the caches. The torch providers' scorers are matmuls plus streaming, so a row cannot beat
    these except by noise in the ceilings' favor, which best-of timing removes. Measured once
    per process (the CPU does not change; callers must not mutate the result)."""
    gen = torch.Generator().manual_seed(0)
    peaks: dict[str, float] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for m, k, n in CPU_MATMUL_SHAPES:
            a = torch.randn(m, k, generator=gen).to(dtype)
            b = torch.randn(k, n, generator=gen).to(dtype)
            best = max(best, 2 * m * k * n / _best_seconds(lambda a=a, b=b: a @ b) / 1e12)
        peaks[name] = best
    src = torch.ones(CPU_STREAM_BYTES // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy = 2 * CPU_STREAM_BYTES / _best_seconds(lambda: dst.copy_(src)) / 1e9
    read = CPU_STREAM_BYTES / _best_seconds(lambda: src.sum()) / 1e9
    notes = [f"CPU ceilings: best of {CPU_CEILING_CALLS} calls; matmul over shapes "
             f"{', '.join('x'.join(map(str, s)) for s in CPU_MATMUL_SHAPES)} (M x K x N); "
             f"memory = max(copy {copy:.1f} GB/s read+write, read {read:.1f} GB/s) over "
             f"{CPU_STREAM_BYTES >> 20} MiB"]
    return Ceilings(matmul_tflops=peaks, copy_gbps=max(copy, read), notes=notes)


def measure_ceilings(device: torch.device, time_ms: Callable[[Callable], float]) -> Ceilings:
    """Peak matmul TFLOP/s per precision and copy GB/s, timed with ``time_ms(fn)`` (CUDA) or
    best-of-calls (CPU: :func:`measure_cpu_ceilings`)."""
    on_gpu = device.type == "cuda"
    if not on_gpu:
        return copy.deepcopy(measure_cpu_ceilings())
    # Large enough to saturate an H100/H200 (8192^3: ~1 ms in bf16).
    size = 8192
    notes: list[str] = []
    peaks: dict[str, float] = {}
    peaks["fp32"] = _matmul_tflops(device, torch.float32, size // 2, time_ms)
    peaks["bf16"] = _matmul_tflops(device, torch.bfloat16, size, time_ms)
    peaks["tf32"] = _matmul_tflops(device, torch.float32, size, time_ms, tf32=True)
    if _device.has_hw_fp8(device):
        try:
            peaks["fp8"] = _fp8_matmul_tflops(device, size, time_ms)
        except (RuntimeError, AttributeError, TypeError) as exc:
            notes.append(f"fp8 matmul ceiling not measured (torch._scaled_mm: "
                         f"{str(exc).splitlines()[0]}); fp8 rows use the bf16 ceiling")
    else:
        notes.append("no fp8 tensor cores (needs sm_89+): fp8 rows use the bf16 ceiling")
    return Ceilings(matmul_tflops=peaks, copy_gbps=_copy_gbps(device, 1 << 30, time_ms),
                    notes=notes)
