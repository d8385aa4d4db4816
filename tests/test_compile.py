"""Every kernel specialization compiles for sm_90 and sm_80 without a GPU.

``flashmemory_triton.kernels.aot`` runs Triton's full NVIDIA pipeline (down to a cubin via the
bundled ptxas) in a subprocess without ``TRITON_INTERPRET``. The checks read the PTX and the
cubin's resource usage: the dot runs on the tensor-core instruction each mode calls for
(wgmma on Hopper, mma.sync on Ampere; e4m3 wgmma for fp8 on sm_90; no e4m3 conversion at all
on sm_80, whose fp8 path decodes the bits itself), key rows are read with 4-byte loads, and
nothing spills to local memory. The same run writes the compile report (design §12), whose
records are checked here too: every field present, the tile's tensor-core instructions doing
exactly its FLOPs, and what the v2 dense scorer promises (no q/w loads in its steady-state
loop, its modeled issue bound).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flashmemory_triton import constants as C
from flashmemory_triton.kernels import PRECISIONS

pytestmark = pytest.mark.compile

SMEM_LIMIT = {"sm_90": 227 * 1024, "sm_80": 163 * 1024,  # opt-in dynamic shared memory per block
              "sm_89": 99 * 1024}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path_factory.mktemp("aot")
    proc = subprocess.run([sys.executable, "-m", "flashmemory_triton.kernels.aot", "--report",
                           "--json", str(out / "report.json"), "--dump", str(out / "cubins")],
                          env=env, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, f"AOT compilation failed:\n{proc.stderr[-4000:]}"
    print(proc.stdout)  # the report table: shown with -s, or -rA
    with open(out / "report.json") as f:
        records = json.load(f)
    for r in records:
        r["_cubin_path"] = str(out / "cubins" / r["cubin"])
    return records


def _pick(results, **match):
    found = [r for r in results if all(r.get(k) == v for k, v in match.items())]
    assert found, f"no compiled specialization matches {match}"
    return found


EXPECTED_MMA = {
    ("sm_90", "bf16"): "wgmma_bf16", ("sm_90", "fp8"): "wgmma_e4m3",
    ("sm_90", "tf32"): "wgmma_tf32", ("sm_80", "bf16"): "mma_sync_bf16",
    ("sm_80", "fp8"): "mma_sync_bf16",
}
CASES = [pytest.param("sm_90", p, id=f"sm_90-{p}") for p in PRECISIONS] + [
    pytest.param("sm_80", p, id=f"sm_80-{p}") for p in ("bf16", "fp8")]


@pytest.mark.parametrize("arch,precision", CASES)
def test_score_kernel_instructions(compiled, arch, precision):
    for r in _pick(compiled, kernel="dense", target=arch, precision=precision):
        ptx = r["ptx"]
        tag = f"{arch}/{precision}/{r['version']}/{r['keys']}/{r['specialization']}"
        _check_dot_and_resources(r, arch, precision, tag)
        assert ptx["ld_global_b32"] and not ptx["ld_global_u8"], (
            f"{tag}: key rows not read as 4-byte words")


def _check_dot_and_resources(r, arch, precision, tag):
    """The rules every scorer build obeys: tensor-core dot of its precision (none in the exact
    fp32 mode), bit decode on sm_80, no spills, shared memory within the SM's limit."""
    ptx = r["ptx"]
    if precision == "fp32":
        # exact mode: fp32 FMAs, deliberately no tensor cores
        assert not ptx["wgmma"] and not ptx["mma_sync"], tag
    else:
        want = EXPECTED_MMA[(arch, precision)]
        assert ptx[want], f"{tag}: expected {want}"
    if arch == "sm_80":
        assert not ptx["cvt_e4m3"], f"{tag}: sm_80 has no e4m3 type; bits must be decoded"
    if precision != "fp32":
        # The exact fp32 mode is for debugging: its FMA dot is compiled with a large stack
        # frame (~10 KB a thread) and is not a performance path; every other mode must fit
        # in registers with the launcher's own launch parameters.
        assert r["spill_bytes"] == 0, f"{tag}: spills {r['spill_bytes']} bytes ({r['regs']} regs)"
    assert r["smem_bytes"] <= SMEM_LIMIT[arch], f"{tag}: {r['smem_bytes']} B shared memory"
    assert r["ctas_per_sm"] >= 1, f"{tag}: does not fit on an SM"


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_query_prep_compiles(compiled, arch):
    for r in _pick(compiled, kernel="query", target=arch):
        assert r["cubin_bytes"] > 0
        assert r["spill_bytes"] == 0, r
        assert r["smem_bytes"] <= SMEM_LIMIT[arch], r


def test_every_layout_and_epilogue_compiled(compiled):
    for precision in PRECISIONS:
        got = {(r["SHARED_KEYS"], r["ENSEMBLE_MEAN"], r["WRITE_LOGITS"])
               for r in _pick(compiled, kernel="dense", version="v1", target="sm_90",
                              precision=precision, specialization="generic")}
        assert {(True, False, False), (False, False, False), (True, True, True)} <= got
    for precision in ("bf16", "fp8"):  # the sm_80 decode fallback, both key layouts
        got = {r["keys"] for r in _pick(compiled, kernel="dense", version="v1", target="sm_80",
                                        precision=precision)}
        assert got == {"shared", "per_layer"}
        # v2: sm_90, shared keys, every epilogue it serves with this Triton (dense.serves)
        from flashmemory_triton.kernels.dense import serves
        got = {(r["ENSEMBLE_MEAN"], r["WRITE_LOGITS"])
               for r in _pick(compiled, kernel="dense", version="v2", precision=precision)}
        assert got == {e for e in ((False, False), (True, True)) if serves(precision, *e)}
        assert (False, False) in got  # the headline always


# --- batched (paged / varlen) scorer: kernels/paged.py -------------------------------------------
BATCHED_CASES = [pytest.param("sm_90", p, id=f"sm_90-{p}") for p in PRECISIONS] + [
    pytest.param("sm_80", "bf16", id="sm_80-bf16")]


@pytest.mark.parametrize("arch,precision", BATCHED_CASES)
def test_batched_kernel_instructions(compiled, arch, precision):
    """Same instruction and resource rules as the row-format scorer, plus: paged fp8 rows
    (128 bytes at 128-byte offsets in a page) are read with 16-byte vector loads."""
    for r in _pick(compiled, target=arch, precision=precision):
        if r["kernel"] not in ("paged", "varlen"):
            continue
        ptx = r["ptx"]
        tag = f"{arch}/{precision}/{r['kernel']}/{r['keys']}"
        _check_dot_and_resources(r, arch, precision, tag)
        assert not ptx["ld_global_u8"], f"{tag}: key bytes read one at a time"
        if r["PAGED"]:
            assert ptx["ld_global_v4"], f"{tag}: paged fp8 rows not read with 16-byte loads"


def test_every_batched_layout_compiled(compiled):
    for precision in PRECISIONS:
        got = {r["keys"] for r in _pick(compiled, kernel="paged", target="sm_90",
                                        precision=precision)}
        assert got == {"shared", "per_layer"}, precision
    got = {r["keys"] for r in _pick(compiled, kernel="varlen", target="sm_90")}
    assert got == {"shared", "per_layer"}
    assert _pick(compiled, kernel="paged", target="sm_90", WRITE_LOGITS=True,
                 ENSEMBLE_MEAN=True, INDEX="i64")
    got = {r["keys"] for r in _pick(compiled, kernel="paged", target="sm_80")}
    assert got == {"shared", "per_layer"}


# --- the DeepGEMM drop-in's raw-logits kernel: kernels/mqa_logits.py ----------------------------
MQA_MMA = {"sm_90": "wgmma_e4m3", "sm_89": "mma_sync_e4m3", "sm_80": "mma_sync_bf16"}


@pytest.mark.parametrize("arch", ["sm_90", "sm_89", "sm_80"])
def test_mqa_kernel_fp8_q(compiled, arch):
    """The e4m3 q goes into the dot as is: e4m3 tensor cores on sm_89 (mma.sync) and sm_90
    (wgmma), the integer decode to bf16 on sm_80 (no e4m3 conversion instruction there);
    no spills, shared memory within the SM's limit; 16-byte page units give 16-byte loads."""
    found = _pick(compiled, kernel="mqa", target=arch)
    assert {(r["PAGED"], r["ABSOLUTE"], r["FILL"], r["PAGE_UNIT"]) for r in found} == {
        (True, False, False, 16), (True, False, True, 16), (True, False, False, 4),
        (False, True, True, 16), (False, False, False, 16)}
    for r in found:
        ptx = r["ptx"]
        tag = f"{arch}/paged={r['PAGED']}/unit={r['PAGE_UNIT']}/fill={r['FILL']}"
        assert ptx[MQA_MMA[arch]], f"{tag}: expected {MQA_MMA[arch]}"
        if arch == "sm_80":
            assert not ptx["cvt_e4m3"], f"{tag}: sm_80 has no e4m3 type; bits must be decoded"
        assert r["spill_bytes"] == 0, f"{tag}: spills {r['spill_bytes']} bytes ({r['regs']} regs)"
        assert r["smem_bytes"] <= SMEM_LIMIT[arch], f"{tag}: {r['smem_bytes']} B shared"
        assert not ptx["ld_global_u8"], f"{tag}: key or q bytes read one at a time"
        if r["PAGE_UNIT"] == 16:
            assert ptx["ld_global_v4"], f"{tag}: fp8 rows not read with 16-byte loads"


# --- the compile report (design §12) ------------------------------------------------------------
REPORT_KEYS = ("kernel", "target", "precision", "keys", "triton", "regs", "spill_bytes",
               "smem_bytes", "ctas_per_sm", "warps", "loop_instructions_per_tile",
               "mma_per_tile", "loop_global_loads_per_tile", "issue_bound", "cubin")


def test_report_records(compiled):
    """Every record carries the report's fields, for the installed Triton, with its cubin
    dumped; every sm_90 tensor-core build's tile runs tensor-core instructions that do exactly
    the tile's FLOPs (proof that the tile was found and weighted right), and has an issue bound
    in (0, 1]."""
    import triton
    for r in compiled:
        assert set(REPORT_KEYS) <= set(r), sorted(set(REPORT_KEYS) - set(r))
        assert r["kernel"] in ("dense", "paged", "varlen", "query", "mqa"), r["kernel"]
        assert r["target"] in ("sm_90", "sm_80", "sm_89") and r["triton"] == triton.__version__
        assert os.path.getsize(r["_cubin_path"]) == r["cubin_bytes"] > 0
        assert r["loop_instructions_per_tile"] > 0
        if r["kernel"] == "query" or r["precision"] == "fp32":
            assert r["issue_bound"] is None
            continue
        tag = f"{r['kernel']}/{r['version']}/{r['target']}/{r['precision']}/{r['keys']}"
        # sm_90 exactly; with mma.sync a warp tile smaller than the instruction (8 warps on a
        # 64-row tile: 8-row warps, 16-row HMMA) repeats work: at least the tile, at most 2x,
        # or 16 / (rows a warp) where the tile is shorter still (32-chunk tiles at 8 warps:
        # 4x, configs.PAGED_SM8X_BLOCK_N with Triton 3.8).
        ratio = r["mma_flops_per_tile"] / r["flops_per_tile"]
        most = max(2, 16 * r["warps"] // r["block_n"])
        assert ratio == 1 if r["target"] == "sm_90" else 1 <= ratio <= most, (tag, ratio)
        assert 0 < r["issue_bound"] <= 1, tag


# What the v2 dense scorer promises at the headline (sm_90, shared keys, L = 3, H = 128, max
# ensemble), per design §12: the modeled issue bound, and the steady-state loop's global loads
# are the key tile's only (its 4-byte words and one scale per row and thread): q and w are
# loaded once, before the loop (one layer's q alone would add 8 16-byte loads per thread).
# Issue 12's bound targets, 0.90 (bf16) and 0.75 (fp8), hold under every supported Triton
# (fp8: 0.78 with 3.6.0, 0.76 with 3.9.0; before the explicit head-sum chain and the leaner
# epilogue 3.9.0 gave 0.68).
V2_MIN_ISSUE_BOUND = {"bf16": 0.90, "fp8": 0.75}
# Instructions per unit of work (per warp per tile x warps / chunks a tile) against v1's
# headline build. Issue 12's target is 0.5; fp8 meets it (0.43 with 3.6.0, 0.44 with 3.9.0),
# bf16 does not yet (0.57 under both: the per-row work of the word-load layout and the
# operand's shared-memory trip, design §12). The ceilings are what the design holds today, so a
# regression fails (the first v2: bf16 0.62 / 0.67, fp8 0.44 / 0.49 with 3.6.0 / 3.9.0).
V2_MAX_INSTRUCTION_RATIO = {"bf16": 0.58, "fp8": 0.45}
# The default bf16 build (the interpretable decoder compiled for sm_90; the PTX decoder is
# opt-in until a GPU run has checked it, numerics.BF16_ASM_ENV): 0.636 with 3.6.0 (647
# instructions a tile), 0.633 with 3.9.0 (676); the ceiling is that level.
V2_MAX_INSTRUCTION_RATIO_DEFAULT_BF16 = 0.64

V2_BUILDS = [pytest.param("bf16", True, id="bf16-asm"), pytest.param("bf16", False, id="bf16"),
             pytest.param("fp8", False, id="fp8")]


@pytest.mark.parametrize("precision, asm", V2_BUILDS)
def test_v2_dense_promises(compiled, precision, asm):
    (r,) = _pick(compiled, kernel="dense", version="v2", target="sm_90", precision=precision,
                 ENSEMBLE_MEAN=False, BF16_ASM=asm)
    assert r["persistent"] and r["spill_bytes"] == 0
    if asm:  # keys decoded by the packed integer decoder, no e4m3 conversion
        assert r["ptx"]["mul_bf16x2"] and not r["ptx"]["cvt_e4m3"], r["ptx"]
    key_loads = (r["block_n"] * C.HEAD_DIM // 4) / (32 * r["warps"]) + r["block_n"] / r["warps"]
    assert r["loop_global_loads_per_tile"] <= key_loads, (
        f"{r['loop_global_loads_per_tile']} global loads a tile: more than the key tile's "
        f"{key_loads} (q or w reloaded in the loop?)")
    assert r["issue_bound"] >= V2_MIN_ISSUE_BOUND[precision], r["issue_bound"]
    # issue cycles per tensor-core FLOP against v1 at its headline specialization
    (v1,) = _pick(compiled, kernel="dense", version="v1", target="sm_90", precision=precision,
                  specialization="headline")
    per_flop = {x["version"]: x["issue_cycles"] / x["flops_per_tile"] for x in (r, v1)}
    ratio = per_flop["v2"] / per_flop["v1"]
    most = (V2_MAX_INSTRUCTION_RATIO_DEFAULT_BF16 if precision == "bf16" and not asm
            else V2_MAX_INSTRUCTION_RATIO[precision])
    assert ratio <= most, (
        f"{r['loop_instructions_per_tile']} instructions a {r['block_n']}-chunk tile: {ratio:.3f}"
        f" of v1's {v1['loop_instructions_per_tile']} a {v1['block_n']}-chunk tile")


# --- the split launch of the v2 dense scorer (kernels/dense_split.py) ---------------------------
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_dense_split_compiles(compiled, precision):
    """Both split modes, both epilogues, on sm_90: spill-free, on the mode's tensor cores, one
    unit's FLOPs a program, and the (tile, layer) unit within the register budget that puts
    ``dense_split.LAYER_CTAS_PER_SM`` programs on an SM (the launch rule assumes it)."""
    from flashmemory_triton.kernels.dense_split import LAYER_CTAS_PER_SM
    found = [r for r in _pick(compiled, kernel="dense", target="sm_90", precision=precision)
             if str(r["version"]).startswith("v2_split")]
    assert {(r["SPLIT"], r["ENSEMBLE_MEAN"], r["WRITE_LOGITS"]) for r in found} == {
        (s, m, m) for s in ("layers", "heads") for m in (False, True)}
    for r in found:
        tag = f"split/{r['SPLIT']}/{precision}/mean={r['ENSEMBLE_MEAN']}/asm={r['BF16_ASM']}"
        _check_dot_and_resources(r, "sm_90", precision, tag)
        assert not r["persistent"] and r["mma_flops_per_tile"] == r["flops_per_tile"], tag
        heads = C.HEAD_DIM // 2 if r["SPLIT"] == "heads" else C.HEAD_DIM  # H_PAD = 128
        assert r["flops_per_tile"] == 2 * r["block_n"] * heads * C.HEAD_DIM, tag
        if r["SPLIT"] == "layers":
            assert r["ctas_per_sm"] >= LAYER_CTAS_PER_SM, (tag, r["regs"], r["ctas_per_sm"])
        # the exact combine's memory ordering: the count is an acquire-release atomic at GPU
        # scope, and the completing unit reads the other units' results from L2
        assert r["ptx"]["atom_acq_rel_gpu"] and r["ptx"]["ld_global_cg"], tag


# What the v2 paged scorer promises at the headline (sm_90, one shared pool, L = 3, H = 128, max
# ensemble, int32 table), issue 12: modeled issue bound >= 0.80 (bf16) / 0.65 (fp8), at most
# half of v1's steady-state instructions per chunk (3.7.1 bf16: 0.514, below), no q/w loads in
# the steady state (the per-request page walk), no spills. Where v2 does not compile spill-free
# it does not serve (configs.PAGED_V2_EPILOGUES), v1 runs, and the check is skipped (none at the
# headline today).
PAGED_V2_MIN_ISSUE_BOUND = {"bf16": 0.80, "fp8": 0.65}
# v2 instructions per chunk over v1's: at most half (issue 12, for 3.6.0 and the newest).
# 3.7.1's v1 bf16 build is 36 instructions a tile leaner than 3.6.0's while v2's is 18 fatter
# (591 a 64-chunk page against 2301 a 128-chunk tile): 0.514 there, recorded as such.
PAGED_V2_MAX_INSTRUCTION_RATIO = {
    (3, 6): {"bf16": 0.50, "fp8": 0.50}, (3, 7): {"bf16": 0.52, "fp8": 0.50},
    (3, 8): {"bf16": 0.50, "fp8": 0.50}, (3, 9): {"bf16": 0.50, "fp8": 0.50}}


# The default bf16 build's (without the opt-in PTX decoder): 0.518 with 3.6.0 (605 instructions
# a page), 0.497 with 3.9.0 (647); 3.7 and 3.8 not measured for this build (their ceiling is
# left loose; CI compiles 3.6 and 3.9).
PAGED_V2_MAX_INSTRUCTION_RATIO_DEFAULT_BF16 = {(3, 6): 0.52, (3, 7): 0.55, (3, 8): 0.55,
                                               (3, 9): 0.50}


@pytest.mark.parametrize("precision, asm", V2_BUILDS)
def test_v2_paged_promises(compiled, precision, asm):
    from flashmemory_triton.kernels.paged_v2 import serves
    if not serves(precision, False, False):
        pytest.skip(f"paged v2 does not serve {precision} with this Triton: v1 runs")
    (r,) = _pick(compiled, kernel="paged", version="v2", target="sm_90", precision=precision,
                 ENSEMBLE_MEAN=False, WRITE_LOGITS=False, INDEX="i32", BF16_ASM=asm)
    assert r["persistent"] and r["keys"] == "shared" and r["spill_bytes"] == 0
    threads = 32 * r["warps"]
    # a page's key words in 16-byte loads, its 64 scales, the page id after the next one
    page_loads = -(-r["block_n"] * C.HEAD_DIM // 16 // threads) + -(-r["block_n"] // threads) + 1
    assert r["loop_global_loads_per_tile"] <= page_loads, (
        f"{r['loop_global_loads_per_tile']} global loads a page: more than the page's "
        f"{page_loads} (q or w reloaded in the loop?)")
    assert r["issue_bound"] >= PAGED_V2_MIN_ISSUE_BOUND[precision], r["issue_bound"]
    (v1,) = _pick(compiled, kernel="paged", version="v1", target="sm_90", precision=precision,
                  keys="shared", ENSEMBLE_MEAN=False, WRITE_LOGITS=False, INDEX="i32")
    per_chunk = {x["version"]: x["loop_instructions_per_tile"] * x["warps"] / x["block_n"]
                 for x in (r, v1)}
    from flashmemory_triton.kernels import configs
    most = (configs.pick(PAGED_V2_MAX_INSTRUCTION_RATIO_DEFAULT_BF16)
            if precision == "bf16" and not asm
            else configs.pick(PAGED_V2_MAX_INSTRUCTION_RATIO)[precision])
    assert per_chunk["v2"] <= most * per_chunk["v1"], (per_chunk, most)


def test_every_v2_paged_epilogue_compiled(compiled):
    """v2 paged records for exactly the epilogues it serves with this Triton, plus the int64
    table; every one spill-free on wgmma of its precision (test_batched_kernel_instructions)."""
    from flashmemory_triton.kernels.paged_v2 import serves
    for precision in ("bf16", "fp8"):
        got = {(r["ENSEMBLE_MEAN"], r["WRITE_LOGITS"])
               for r in compiled if r["kernel"] == "paged" and r["version"] == "v2"
               and r["precision"] == precision and r["INDEX"] == "i32"}
        assert got == {e for e in ((False, False), (True, True)) if serves(precision, *e)}
    assert _pick(compiled, kernel="paged", version="v2", INDEX="i64")
