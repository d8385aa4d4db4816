"""Version-keyed launch parameters (``kernels.configs``) and the SASS tile counter of the
compile report (``kernels.sass``), without compiling anything: fast, no GPU, no ptxas.

The compiled side (every supported Triton builds these parameters spill-free) is
``tests/test_compile.py``; here: the table is what the launchers and ``kernels.aot`` read, the
declared version range holds exactly the releases the table has entries for, and the report's
loop counting finds and weighs the right instructions.
"""

from __future__ import annotations

import pathlib
import re

import pytest

from flashmemory_triton.kernels import configs, sass
from flashmemory_triton.kernels.mqa_logits import mqa_launch_config
from flashmemory_triton.kernels.paged import batched_launch_config
from flashmemory_triton.kernels.score import launch_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text,want", [("3.6.0", (3, 6)), ("3.9.0", (3, 9)),
                                       ("3.10.1+git8a1b", (3, 10)), ("3.7.0rc1", (3, 7))])
def test_parse_version(text, want):
    assert configs.parse_version(text) == want


def test_parse_version_rejects_garbage():
    with pytest.raises(ValueError, match="triton version"):
        configs.parse_version("main")


def test_installed_triton_is_in_the_declared_range():
    """pyproject's range is exactly [oldest tested, next minor after the newest tested), with
    no release excluded: every minor release in it has its own entries (``RELEASES``)."""
    from packaging.specifiers import SpecifierSet
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'"triton>=(\d+)\.(\d+),<(\d+)\.(\d+)', text)
    assert m, "pyproject.toml declares no triton range"
    lo, hi = (int(m.group(1)), int(m.group(2))), (int(m.group(3)), int(m.group(4)))
    assert lo == configs.OLDEST and hi == (configs.NEWEST[0], configs.NEWEST[1] + 1)
    assert configs.OLDEST <= configs.installed() <= configs.NEWEST
    spec = SpecifierSet(re.search(r'"triton([^;"]*)', text).group(1))
    admitted = {(3, minor) for minor in range(0, 12)
                if f"3.{minor}.0" in spec and f"3.{minor}.1" in spec}
    assert admitted == set(configs.RELEASES)
    assert configs.RELEASES == tuple((3, m) for m in range(lo[1], hi[1]))


def test_every_table_has_one_entry_per_release():
    for table in configs.TABLES:
        assert tuple(table) == configs.RELEASES


def test_pick():
    table = {(3, 6): dict(a=1), (3, 7): dict(a=2), (3, 9): dict(a=3)}
    assert configs.pick(table, (3, 7)) == dict(a=2)
    assert configs.pick(table, (3, 8)) == dict(a=2)   # between entries: the newest not after
    assert configs.pick(table, (3, 12)) == dict(a=3)  # beyond: the newest
    assert configs.pick(table, (3, 2)) == dict(a=1)   # before: the oldest
    configs.pick(table, (3, 6))["a"] = 9              # a copy: the table is not changed
    assert table[(3, 6)] == dict(a=1)
    assert configs.pick(configs.V1_SM90_BLOCK_N) == \
        configs.V1_SM90_BLOCK_N[configs.installed()]


@pytest.mark.parametrize("version", configs.RELEASES)
def test_launch_parameters_follow_the_version_table(version):
    sm90, sm80 = (9, 0), (8, 0)
    for shared, layout in ((True, "shared"), (False, "per_layer")):
        cfg = launch_config(1 << 20, 128, "bf16", sm90, shared, version)
        assert cfg["BLOCK_N"] == configs.V1_SM90_BLOCK_N[version][layout]
        assert cfg["BLOCK_H"] == 64 and cfg["num_warps"] == 8
        assert launch_config(1 << 20, 128, "tf32", sm90, shared, version)["BLOCK_H"] == 32
        cfg = launch_config(1 << 20, 128, "fp8", sm80, shared, version)
        assert cfg["num_warps"] == configs.V1_SM8X_WARPS[version][layout]
        assert (cfg["BLOCK_N"], cfg["BLOCK_H"]) == (64, 32)
        # the batched scorer
        cfg = batched_launch_config(1 << 20, 128, "bf16", sm90, True, shared, version)
        assert cfg["BLOCK_H"] == configs.PAGED_SM90_BF16_BLOCK_H[version][layout]
        assert cfg["BLOCK_N"] == 128 and cfg["num_stages"] == 1
        cfg = batched_launch_config(1 << 20, 128, "fp8", sm90, True, shared, version)
        assert (cfg["BLOCK_N"], cfg["BLOCK_H"]) == (128, 64)
        cfg = batched_launch_config(1 << 20, 128, "bf16", sm80, True, shared, version)
        assert cfg["BLOCK_N"] == configs.PAGED_SM8X_BLOCK_N[version][layout]
        assert (cfg["BLOCK_H"], cfg["num_warps"]) == (16, 8)
        # the DeepGEMM drop-in on sm_80 (no e4m3 type): head loop and ranges warps
        paged = layout == "shared"
        cfg = mqa_launch_config(1 << 20, 128, sm80, paged, version)
        entry = configs.MQA_SM80[version]
        assert cfg["ROLL_HEADS"] == entry["roll_paged" if paged else "roll_ranges"]
        assert cfg["num_warps"] == (8 if paged else entry["ranges_warps"])
        assert not mqa_launch_config(1 << 20, 128, sm90, paged, version)["ROLL_HEADS"]
    # the ends of the range, as measured (3.6 fits 128-chunk per-layer tiles, 3.9 does not)
    assert launch_config(1 << 20, 128, "bf16", sm90, False, configs.OLDEST)["BLOCK_N"] == 128
    assert launch_config(1 << 20, 128, "bf16", sm90, False, configs.NEWEST)["BLOCK_N"] == 64


def test_launchers_default_to_the_installed_release():
    sm90, sm80 = (9, 0), (8, 0)
    here = configs.installed()
    for shared in (True, False):
        for cap in (sm90, sm80):
            assert launch_config(1 << 20, 128, "bf16", cap, shared) == \
                launch_config(1 << 20, 128, "bf16", cap, shared, here)
            assert batched_launch_config(1 << 20, 128, "bf16", cap, True, shared) == \
                batched_launch_config(1 << 20, 128, "bf16", cap, True, shared, here)
            assert mqa_launch_config(1 << 20, 128, cap, shared) == \
                mqa_launch_config(1 << 20, 128, cap, shared, here)


def test_dense_v2_table():
    from flashmemory_triton.kernels.dense import dense_launch_config, serves
    old = configs.OLDEST
    for release in configs.RELEASES:  # every release fits the prefetch and every epilogue
        for precision in ("bf16", "fp8"):
            assert dense_launch_config((9, 0), 1 << 20, precision, release)["PREFETCH"]
            for mean, logits in ((False, False), (True, True), (False, True)):
                assert serves(precision, mean, logits, release), (release, precision)
    assert not serves("tf32", False, False, old)


def test_paged_v2_table():
    from flashmemory_triton.kernels.paged_v2 import paged_v2_launch_config, serves
    old, new = configs.OLDEST, configs.NEWEST
    for version in (old, new):
        assert serves("bf16", False, False, version) and serves("fp8", False, False, version)
        # the bf16 mean ensemble with logits spills: v1 serves it
        assert not serves("bf16", True, True, version) and not serves("bf16", False, True, version)
        assert serves("fp8", True, True, version) and serves("fp8", True, False, version)
        assert not serves("tf32", False, False, version)
    assert paged_v2_launch_config((9, 0)) == dict(num_warps=8, num_stages=1, PREFETCH=True)
    # varlen rows: served where spill-free, with or without the prefetch; not at all on 3.9
    assert serves("bf16", False, False, old, paged=False)
    assert not paged_v2_launch_config((9, 0), False, "bf16", "max", old)["PREFETCH"]
    assert paged_v2_launch_config((9, 0), False, "fp8", "max", old)["PREFETCH"]
    assert not serves("bf16", False, False, new, paged=False)
    assert not serves("fp8", False, False, new, paged=False)


# --- SASS tile counting --------------------------------------------------------------------------
def _ins(lines):
    return [(i * 16, body) for i, body in enumerate(lines)]


PERSISTENT = _ins([
    "S2R R0, SR_CTAID.X",            # 0x00 prologue
    "LDG.E R2, desc[UR4][R4.64]",    # 0x10 q load, before the loop
    "IADD3 R1, R0, 0x1, RZ",          # 0x20 loop head
    "LDG.E R3, desc[UR4][R6.64]",    # 0x30
    "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT, gsb0",  # 0x40
    "FMNMX R5, R24, RZ, !PT",         # 0x50 inner loop (layers)
    "@P0 BRA 0x50",                   # 0x60 inner backward branch
    "@P1 BRA 0x20",                   # 0x70 tile loop back edge
    "EXIT",                           # 0x80
    "BRA 0x90",                       # 0x90 self-branch padding: dropped by disassemble()
])


def test_tile_counts_persistent_loop():
    ins = PERSISTENT[:-1]
    c = sass.tile_counts(ins, persistent=True, inner_trips=3)
    assert c.loop == (0x20, 0x70)
    # 0x20..0x70: 6 instructions, of which 0x50 and 0x60 run 3 times
    assert c.instructions == 4 + 2 * 3
    assert c.mma == 1 and c.global_loads == 1  # the q load before the loop is not counted
    assert c.mma_flops_per_warp == 2 * 64 * 128 * 16 / 4


# A tile loop nested in a walk (paged v2: pages inside the walk over requests), a second
# tensor-core block (the partial last page) after it: the steady state is the innermost loop.
NESTED = _ins([
    "S2R R0, SR_CTAID.X",            # 0x00
    "LDG.E R2, desc[UR4][R4.64]",    # 0x10 walk: q load per request
    "LDG.E R3, desc[UR4][R6.64]",    # 0x20 tile loop head: key load
    "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT, gsb0",  # 0x30
    "@P0 BRA 0x20",                   # 0x40 tile loop back edge
    "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT, gsb0",  # 0x50 partial last tile
    "@P1 BRA 0x10",                   # 0x60 walk back edge
    "EXIT",                           # 0x70
])


def test_tile_counts_innermost_loop():
    c = sass.tile_counts(NESTED, persistent=True, innermost=True)
    assert c.loop == (0x20, 0x40) and c.instructions == 3 and c.global_loads == 1
    assert c.mma == 1
    outer = sass.tile_counts(NESTED, persistent=True)  # the default: the outermost such loop
    assert outer.loop == (0x10, 0x60) and outer.global_loads == 2


def test_tile_counts_whole_program_and_self_branch():
    assert sass._self_branch(PERSISTENT[-1]) and not sass._self_branch(PERSISTENT[6])
    c = sass.tile_counts(PERSISTENT[:-1], persistent=False, inner_trips=1)
    assert c.loop is None and c.instructions == 9 and c.global_loads == 2


def test_tile_counts_requires_a_loop_for_persistent_kernels():
    with pytest.raises(RuntimeError, match="persistent"):
        sass.tile_counts(_ins(["HGMMA.64x64x16.F32.BF16 R0, gdesc[UR4], RZ", "EXIT"]), True)
    # no tensor cores (the fp32 mode): the largest loop is the tile
    no_mma = [(a, b.replace("HGMMA.64x128x16.F32.BF16", "FFMA")) for a, b in PERSISTENT[:-1]]
    c = sass.tile_counts(no_mma, persistent=True, inner_trips=3)
    assert c.loop == (0x20, 0x70) and c.mma == 0


def test_issue_bound_and_occupancy():
    # 12.58 MFLOP of bf16 on sm_90: 3072 tensor cycles; 2000 instructions x 8 warps / 4 = 4000
    bound, tensor, issue = sass.issue_bound("sm_90", "bf16", 2 * 128 * 128 * 128 * 3, 2000, 8)
    assert (tensor, issue) == (3072, 4000) and bound == pytest.approx(3072 / 4000)
    assert sass.issue_bound("sm_90", "fp32", 1.0, 10, 4)[0] is None
    assert sass.ctas_per_sm("sm_90", 255, 16384, 8) == 1  # 8 warps x 256 regs x 32 = 64K
    assert sass.ctas_per_sm("sm_90", 128, 16384, 8) == 2
    assert sass.ctas_per_sm("sm_90", 64, 120 * 1024, 4) == 1  # shared memory bound
    assert sass.mma_flops("QGMMA.64x128x32.F32.E4M3.E4M3") == (2 * 64 * 128 * 32, 4)
    assert sass.mma_flops("HMMA.16816.F32.BF16") == (2 * 16 * 8 * 16, 1)
    assert sass.mma_flops("QMMA.16832.F32.E4M3.E4M3") == (2 * 16 * 8 * 32, 1)
