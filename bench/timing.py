"""Repeated timings and peak memory of one call.

CUDA: ``triton.testing.do_bench``, which runs warm-up calls first and clears the L2 cache
(zeroing a 256 MB buffer outside the timed region) before every timed call, so a key buffer
small enough to sit in L2 is still read from HBM. CPU: a plain wall-clock timer (do_bench
needs a GPU); those numbers only show that the bench runs.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

QUANTILES = (0.2, 0.5, 0.8)  # spread = the 20th to 80th percentile, as do_bench reports it


@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int

    @property
    def spread_pct(self) -> float:
        """Half the 20-80 percentile range, in percent of the median."""
        return 50.0 * (self.p80_ms - self.p20_ms) / self.median_ms if self.median_ms > 0 else 0.0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn: Callable[[], object], device: torch.device) -> float:
    """One synchronized call, in milliseconds (used to size the repeats)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def time_call(fn: Callable[[], object], device: torch.device, *, rep_ms: float = 100.0,
              min_samples: int = 5, estimate_ms: float | None = None) -> Timing:
    """Median and 20/80 percentiles of ``fn``'s run time.

    CUDA: ``rep_ms`` of timed calls, stretched to ``min_samples`` calls of ``estimate_ms``
    each so slow providers still get a spread (``samples`` is then do_bench's approximate
    count). CPU: one warm-up call, then ``min_samples`` timed calls.
    """
    if device.type == "cuda":
        if estimate_ms is not None:
            rep_ms = max(rep_ms, min_samples * estimate_ms)
        import triton.testing
        # do_bench sizes its repeats from its own estimate; warm-up is a quarter of the budget.
        p20, med, p80 = triton.testing.do_bench(fn, warmup=max(25, int(rep_ms / 4)),
                                                rep=int(rep_ms), quantiles=list(QUANTILES))
        samples = max(1, int(rep_ms / max(med, 1e-3)))
        return Timing(med, p20, p80, samples)
    fn()  # warm-up: first-call allocations and lazy initialization
    times = [wall_ms(fn, device) for _ in range(max(2, min_samples))]
    deciles = statistics.quantiles(times, n=10, method="inclusive")  # [1] = p20, [7] = p80
    return Timing(statistics.median(times), deciles[1], deciles[7], len(times))


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Device memory ``fn`` allocates at its peak beyond what was allocated before (CUDA);
    ``None`` on the CPU, where torch keeps no such counter."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return int(peak)
