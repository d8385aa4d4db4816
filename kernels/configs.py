"""Launch parameters that depend on the installed Triton version: the one table for launchers,
``kernels.aot`` and the compile tests.

The same kernel source and launch parameters allocate registers differently from one Triton
release to the next (e.g. the per-layer-keys scorer at 128-chunk tiles and 8 warps on sm_90 fits
in 255 registers with Triton 3.6.0 but spills 48 bytes a thread with 3.9.0). Every table below
has one explicit entry per supported minor release (``RELEASES``), each compiled spill-free by
``tests/test_compile.py`` (measured with 3.6.0, 3.7.1, 3.8.0 and 3.9.0), so a release outside
``[OLDEST, NEWEST]`` is refused by ``pyproject.toml`` rather than guessed at.

Keyed by the parsed ``triton.__version__`` (major, minor), never by the GPU's name: the GPU
enters only as the compute capability the launcher already uses.
"""

from __future__ import annotations

import re

import triton

# Every supported minor release, oldest first (pyproject.toml: triton>=3.6,<3.10). 3.6.0 is what
# torch 2.11 pins on the H100/H200 machines, 3.7.1 what torch 2.13 pins, 3.8 what torch 2.14
# pins, 3.9.0 the newest (what a fresh CPU install gets).
RELEASES = ((3, 6), (3, 7), (3, 8), (3, 9))
OLDEST, NEWEST = RELEASES[0], RELEASES[-1]


def parse_version(text: str) -> tuple[int, int]:
    """``"3.9.0"``, ``"3.6.0+git1234"`` -> ``(3, 9)``."""
    m = re.match(r"(\d+)\.(\d+)", text)
    if not m:
        raise ValueError(f"unrecognized triton version {text!r}")
    return int(m.group(1)), int(m.group(2))


def installed() -> tuple[int, int]:
    return parse_version(triton.__version__)


# Register use below is what the compile report (``python -m flashmemory_triton.kernels.aot
# --report``) measured for the generic specialization (no pointer alignment), the hungriest.

# v1 scorer (kernels/score.py) on sm_90, chunks per tile by key layout. 3.6 fits 128-chunk
# tiles in both (255 registers). Shared keys: 3.7.1 and 3.8.0 spill 16-160 bytes a thread at
# 128 chunks in bf16/tf32/fp8, 64 fit (bf16 205 / 167 registers); 3.9 fits 128. Per-layer keys
# (the runtime layer loop): from 3.7 128 chunks spill 24-48 bytes, 64 fit (bf16 173 registers
# with 3.7.1, 168 with 3.9.0).
V1_SM90_BLOCK_N = {
    (3, 6): dict(shared=128, per_layer=128),
    (3, 7): dict(shared=64, per_layer=64),
    (3, 8): dict(shared=64, per_layer=64),
    (3, 9): dict(shared=128, per_layer=64),
}

# v1 scorer before Hopper (sm_8x, 64-chunk tiles, 32-head blocks), warps by key layout.
# Per-layer keys take 8 (4 spill 8-144 bytes with 3.6 and 3.9). Shared keys fit 4 warps except
# with 3.8.0, where the sm_80 decode build spills 232 bytes a thread with 4 and fits 8 (255).
V1_SM8X_WARPS = {
    (3, 6): dict(shared=4, per_layer=8),
    (3, 7): dict(shared=4, per_layer=8),
    (3, 8): dict(shared=8, per_layer=8),
    (3, 9): dict(shared=4, per_layer=8),
}

# Batched (paged) scorer, sm_90, paged bf16: heads per block by pool layout (128-chunk tiles,
# 8 warps). One shared pool: 64-head blocks spill 48-72 bytes (3.6 and 3.9), 32 fit. Per-layer
# pools fit 64 except with 3.7.1 (24 bytes a thread), where 32 fit.
PAGED_SM90_BF16_BLOCK_H = {
    (3, 6): dict(shared=32, per_layer=64),
    (3, 7): dict(shared=32, per_layer=32),
    (3, 8): dict(shared=32, per_layer=64),
    (3, 9): dict(shared=32, per_layer=64),
}

# Batched scorer before Hopper (16-head blocks, 8 warps), chunks per tile by pool layout: 64,
# except per-layer pools with 3.8.0 (sm_80 bf16 spills 16 bytes a thread at 64; 32 fit).
PAGED_SM8X_BLOCK_N = {
    (3, 6): dict(shared=64, per_layer=64),
    (3, 7): dict(shared=64, per_layer=64),
    (3, 8): dict(shared=64, per_layer=32),
    (3, 9): dict(shared=64, per_layer=64),
}

# Dense scorer v2 (kernels/dense.py), sm_90: whether the next tile's keys are prefetched into
# registers. Since the bf16 keys are decoded with the packed integer decoder
# (numerics.e4m3_words_to_bf16: no byte permutes, no per-element conversions) every release
# fits the prefetch in both modes and both epilogues (bf16 max / mean+logits: 253 / 255
# registers with 3.6.0, 254 / 255 with 3.7.1 and 3.8.0, 254 / 242 with 3.9.0; fp8 at most
# 244). Before it, 3.7+ needed 8 bytes of stack for the bf16 prefetch and ran bf16 without it.
DENSE_V2_PREFETCH = {
    (3, 6): {"bf16": True, "fp8": True},
    (3, 7): {"bf16": True, "fp8": True},
    (3, 8): {"bf16": True, "fp8": True},
    (3, 9): {"bf16": True, "fp8": True},
}
# ... and whether each thread's head sum is written as one explicit FMA chain (split out of
# the accumulator layout): 3.9 reduces ``tl.sum`` within a thread as a tree, a multiply and an
# add per head (fp8 565 -> 520 instructions a tile with the chain); 3.6 already reduces it as a
# chain, and there the explicit form makes ptxas branch around the predicated stores of the
# cross-warp exchange (fp8 505 -> 513). 3.7.1 and 3.8.0 compiled spill-free with the chain.
DENSE_V2_HEAD_SUM_CHAIN = {(3, 6): False, (3, 7): True, (3, 8): True, (3, 9): True}
# ... and which epilogues it serves in bf16 ("max": max ensemble, no logits; "other": the mean
# ensemble and/or per-layer logits): all of them under every release since the packed decoder
# (before it, 3.7+ kept bf16 mean+logits on v1: 8 bytes of stack).
DENSE_V2_BF16_EPILOGUES = {
    (3, 6): ("max", "other"),
    (3, 7): ("max", "other"),
    (3, 8): ("max", "other"),
    (3, 9): ("max", "other"),
}

# DeepGEMM drop-in kernel (kernels/mqa_logits.py) without an e4m3 type (sm_80): whether its head
# loop is a runtime loop, for the paged walk and for the non-paged (key ranges) walk, and the
# warps of the ranges walk. Measured with kernels.aot at H = 128, all five specializations:
# 3.6.0 unrolled spills 8-56 bytes (paged) and 376 (ranges); rolled, paged fits at 8 warps
# (128-191 registers) and ranges at 4 warps (128). 3.7.1 unrolled spills 8-120 bytes; rolled,
# all fit at 8 warps (120-202). 3.8.0 unrolled, paged fits at 8 warps (250-255) and ranges spill
# 568-592 bytes; rolled, ranges fit at 8 warps (98-117) and paged 4-byte units spill 24 bytes.
# 3.9.0 unrolled fits everything at 8 warps (183-255); rolled, paged 4-byte units spill 32 bytes.
MQA_SM80 = {
    (3, 6): dict(roll_paged=True, roll_ranges=True, ranges_warps=4),
    (3, 7): dict(roll_paged=True, roll_ranges=True, ranges_warps=8),
    (3, 8): dict(roll_paged=False, roll_ranges=True, ranges_warps=8),
    (3, 9): dict(roll_paged=False, roll_ranges=False, ranges_warps=8),
}

# Paged scorer v2 (kernels/paged_v2.py), sm_90, one shared pool, the next page's keys and the
# page id after it prefetched: the epilogues it serves spill-free, by precision ("max": the max
# ensemble without logits, the headline; "other": the mean ensemble and/or per-layer logits);
# the rest stays on v1. Measured with kernels.aot (registers / spill bytes a thread, max then
# mean+logits): 3.6.0 bf16 253/0 and 255/16, fp8 238/0 and 246/0; 3.7.1 bf16 255/0 and
# 255/16, fp8 248/0 and 254/0; 3.8.0 bf16 254/0 and 255/16, fp8 248/0 and 254/0; 3.9.0 bf16
# 254/0 and 255/32, fp8 252/0 and 254/0.
PAGED_V2_EPILOGUES = {
    (3, 6): {"bf16": ("max",), "fp8": ("max", "other")},
    (3, 7): {"bf16": ("max",), "fp8": ("max", "other")},
    (3, 8): {"bf16": ("max",), "fp8": ("max", "other")},
    (3, 9): {"bf16": ("max",), "fp8": ("max", "other")},
}

# ... and on varlen rows (132-byte rows: 4-byte loads of 33-word rows, as dense v2): the
# epilogues it serves spill-free by precision, each with whether the next tile is prefetched.
# Measured with kernels.aot and the packed bf16 decoder (spill bytes with / without the
# prefetch; max, then mean+logits): 3.6.0 bf16 32/0 and 56/32, fp8 0/0 and 16/16; 3.7.1 bf16
# 32/8 and 80/40, fp8 0/0 and 24/16; 3.8.0 bf16 0/0 and 8/0, fp8 0/0 and 0/0; 3.9.0 bf16 72/40
# and 32/32, fp8 48/48 and 56/48 (none served: varlen stays on v1 there).
VARLEN_V2_EPILOGUES = {
    (3, 6): {"bf16": {"max": False}, "fp8": {"max": True}},
    (3, 7): {"bf16": {}, "fp8": {"max": True}},
    (3, 8): {"bf16": {"max": True, "other": False}, "fp8": {"max": True, "other": True}},
    (3, 9): {"bf16": {}, "fp8": {}},
}

TABLES = (V1_SM90_BLOCK_N, V1_SM8X_WARPS, PAGED_SM90_BF16_BLOCK_H, PAGED_SM8X_BLOCK_N,
          DENSE_V2_PREFETCH, DENSE_V2_HEAD_SUM_CHAIN, DENSE_V2_BF16_EPILOGUES, MQA_SM80,
          PAGED_V2_EPILOGUES, VARLEN_V2_EPILOGUES)


def pick(table: dict, version: tuple[int, int] | None = None):
    """The entry of ``table`` for ``version`` (default: the installed Triton), copied. A
    release between or beyond the table's (a dev build, or run outside the declared range) gets
    the newest entry not after it; one before the oldest, the oldest."""
    version = version or installed()
    older = [v for v in table if v <= version]
    value = table[max(older) if older else min(table)]
    return dict(value) if isinstance(value, dict) else value

