"""What a benchmark run covers: the sweep presets and the shapes they expand to.

A *shape* is everything that changes the inputs or the work (chunks N, batch B, key layout,
ensemble); the precision is a property of the provider row, because the fp32 reference has one
arithmetic whatever the precision under test.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import NamedTuple

from flashmemory_triton.kernels import PRECISIONS
from flashmemory_triton.ops import ENSEMBLES

# one key buffer for every layer (release) / one per layer (serving)
LAYOUTS = ("shared", "per_layer")

K = 1024
HEADLINE_N = 256 * K  # 262144 chunks = 1M tokens of context (4 tokens per chunk)
HEADLINE_BATCH = 1
HEADLINE_LAYOUT = "shared"


class Shape(NamedTuple):
    n: int  # chunks
    batch: int
    layout: str  # "shared" or "per_layer"
    ensemble: str  # "max" or "mean"

    @property
    def per_layer(self) -> bool:
        return self.layout == "per_layer"

    def label(self) -> str:
        return f"N={self.n} B={self.batch} {self.layout} {self.ensemble}"


@dataclasses.dataclass(frozen=True)
class Sweep:
    n: tuple[int, ...]
    batch: tuple[int, ...]
    layout: tuple[str, ...]
    precision: tuple[str, ...]
    ensemble: tuple[str, ...]

    def shapes(self) -> list[Shape]:
        """Input-major order: shapes sharing inputs (same N, B, layout) are adjacent."""
        return [Shape(n, b, lay, ens) for n, b, lay, ens in
                itertools.product(self.n, self.batch, self.layout, self.ensemble)]

    def validate(self) -> Sweep:
        for name, values, allowed in (("layout", self.layout, LAYOUTS),
                                      ("precision", self.precision, PRECISIONS),
                                      ("ensemble", self.ensemble, ENSEMBLES)):
            if not values:
                raise ValueError(f"--{name} needs at least one value")
            bad = [v for v in values if v not in allowed]
            if bad:
                raise ValueError(f"--{name} values must be among {list(allowed)}, got {bad}")
        for name, values in (("n", self.n), ("batch", self.batch)):
            if not values:
                raise ValueError(f"--{name} needs at least one value")
            if any(v < 1 for v in values):
                raise ValueError(f"--{name} values must be positive, got {list(values)}")
        return self


# The grid. The quick subset keeps the headline case (N = 256K, B = 1, shared), the
# short context the split launch serves (N = 4K: 64 tiles for 132 SMs, issue 12) and the two
# precisions that matter in deployment (bf16 default, fp8 as the serving stack runs).
FULL_GPU = Sweep(n=(4 * K, 16 * K, 64 * K, 256 * K, 1024 * K), batch=(1, 8, 32), layout=LAYOUTS,
                 precision=PRECISIONS, ensemble=ENSEMBLES)
QUICK_GPU = Sweep(n=(4 * K, 16 * K, 256 * K), batch=(1, 8), layout=LAYOUTS,
                  precision=("bf16", "fp8"), ensemble=("max",))
# CPU runs only show that the bench works: small N and batch keep --quick around a minute on
# two cores; the numbers say nothing about a GPU.
FULL_CPU = Sweep(n=(1 * K, 4 * K, 16 * K), batch=(1, 8), layout=LAYOUTS, precision=PRECISIONS,
                 ensemble=ENSEMBLES)
QUICK_CPU = Sweep(n=(1 * K, 4 * K), batch=(1,), layout=LAYOUTS, precision=("bf16", "fp8"),
                  ensemble=("max",))


def preset(full: bool, on_gpu: bool) -> Sweep:
    if on_gpu:
        return FULL_GPU if full else QUICK_GPU
    return FULL_CPU if full else QUICK_CPU


def closeness_to_headline(shape: Shape) -> tuple:
    """Sort key: the headline case first, then the shapes most like it.

    Used to spend a limited budget (torch.compile recompiles per shape) where it matters.
    """
    return (shape.layout != HEADLINE_LAYOUT, shape.batch != HEADLINE_BATCH,
            abs(math.log2(shape.n / HEADLINE_N)), shape.ensemble != ENSEMBLES[0], shape.batch)


def is_headline(shape: Shape) -> bool:
    return (shape.n, shape.batch, shape.layout) == (HEADLINE_N, HEADLINE_BATCH, HEADLINE_LAYOUT)
