"""Launch parameters that depend on the installed Triton version: the one table for launchers,
``kernels.aot`` and the compile tests.

The same kernel source and launch parameters allocate registers differently from one Triton
release to the next (e.g. the per-layer-keys scorer at 128-chunk tiles and 8 warps on sm_90 fits
in 255 registers with Triton 3.6.0 but spills 48 bytes a thread with 3.9.0). Every supported
version is compiled by ``tests/test_compile.py`` with the parameters this table gives it, so a
version outside ``[OLDEST, NEWEST]`` or in ``SPILLING`` is refused by ``pyproject.toml`` rather
than guessed at.

Keyed by the parsed ``triton.__version__`` (major, minor), never by the GPU's name: the GPU
enters only as the compute capability the launcher already uses.
"""

from __future__ import annotations

import re

import triton

# Oldest and newest tested releases (pyproject.toml: triton>=3.6,<3.10). 3.6.0 is what torch
# 2.11 pins on the H100/H200 machines; 3.9.0 is the newest, what a fresh CPU install gets.
OLDEST, NEWEST = (3, 6), (3, 9)
# Releases between them that spill with this table's parameters (tests/test_compile.py, run
# under 3.7.0 and 3.8.0: 8-592 bytes a thread in the dense, paged and mqa kernels), so
# pyproject.toml excludes them (!=3.7.*, !=3.8.*).
SPILLING = ((3, 7), (3, 8))


def parse_version(text: str) -> tuple[int, int]:
    """``"3.9.0"``, ``"3.6.0+git1234"`` -> ``(3, 9)``."""
    m = re.match(r"(\d+)\.(\d+)", text)
    if not m:
        raise ValueError(f"unrecognized triton version {text!r}")
    return int(m.group(1)), int(m.group(2))


def installed() -> tuple[int, int]:
    return parse_version(triton.__version__)


def register_hungry(version: tuple[int, int] | None = None) -> bool:
    """True from Triton 3.7 on: its register allocation of the scorers needs smaller tiles
    where 3.6 fit (measured with 3.9.0: see ``DENSE_PER_LAYER_SM90``)."""
    return (version or installed()) >= (3, 7)


# Dense scorer, per-layer keys, sm_90 (the runtime layer loop): 3.6 fits 128-chunk tiles (255
# registers); from 3.7 those spill 32-48 bytes a thread in bf16/tf32/fp8, 64-chunk tiles at 8
# warps fit (bf16 168 registers, fp8 157, tf32 192 with 3.9.0).
DENSE_PER_LAYER_SM90 = {"3.6": dict(BLOCK_N=128), "3.7+": dict(BLOCK_N=64)}


# Dense scorer v2 (kernels/dense.py), sm_90: whether the next tile's keys are prefetched into
# registers. With 3.9.0 the bf16 build needs 8 bytes of stack with the prefetch (255 registers)
# and 251 registers without; fp8 fits either way (243).
DENSE_V2_PREFETCH = {"3.6": {"bf16": True, "fp8": True}, "3.7+": {"bf16": False, "fp8": True}}
# ... and which epilogues it serves in bf16: from 3.7 the mean ensemble with per-layer logits
# needs 8 bytes of stack even without the prefetch (255 registers with 3.9.0), so that
# combination stays on v1 there ("max": max ensemble, no logits).
DENSE_V2_BF16_EPILOGUES = {"3.6": ("max", "other"), "3.7+": ("max",)}


def pick(table: dict, version: tuple[int, int] | None = None):
    """The entry of ``table`` for ``version`` (default: the installed Triton), copied."""
    value = table["3.7+" if register_hungry(version) else "3.6"]
    return dict(value) if isinstance(value, dict) else value


# DeepGEMM drop-in kernel (kernels/mqa_logits.py) without an e4m3 type (sm_80): whether its head
# loop is a runtime loop, and the warps of the non-paged (key ranges) walk. Measured with
# kernels.aot at H = 128, all five specializations: 3.6.0 unrolled spills 8-56 bytes (paged)
# and 376 (ranges); rolled, paged fits at 8 warps (128-191 registers) and ranges at 4 warps
# (128). 3.9.0 unrolled fits everything at 8 warps (183-255); rolled, paged 4-byte units spill
# 32 bytes.
MQA_SM80 = {"3.6": dict(roll_heads=True, ranges_warps=4),
            "3.7+": dict(roll_heads=False, ranges_warps=8)}
