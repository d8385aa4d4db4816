"""Every kernel specialization compiles for sm_90 and sm_80 without a GPU.

``flashmemory_triton.kernels.aot`` runs Triton's full NVIDIA pipeline (down to a cubin via the
bundled ptxas) in a subprocess without ``TRITON_INTERPRET``. The checks read the PTX and the
cubin's resource usage: the dot runs on the tensor-core instruction each mode calls for
(wgmma on Hopper, mma.sync on Ampere; e4m3 wgmma for fp8 on sm_90; no e4m3 conversion at all
on sm_80, whose fp8 path decodes the bits itself), key rows are read with 4-byte loads, and
nothing spills to local memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flashmemory_triton.kernels import PRECISIONS

pytestmark = pytest.mark.compile

SMEM_LIMIT = {"sm_90": 227 * 1024, "sm_80": 163 * 1024,  # opt-in dynamic shared memory per block
              "sm_89": 99 * 1024}


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "flashmemory_triton.kernels.aot"], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"AOT compilation failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


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
    for r in _pick(compiled, kernel="fused_score", arch=arch, PRECISION=precision):
        ptx = r["ptx"]
        tag = f"{arch}/{precision}/shared={r['SHARED_KEYS']}"
        _check_dot_and_resources(r, arch, precision, tag)
        assert ptx["ld_global_b32"] and not ptx["ld_global_u8"], f"{tag}: key rows not read as 4-byte words"


def _check_dot_and_resources(r, arch, precision, tag):
    """The rules every scorer build obeys: tensor-core dot of its precision (none in the exact
    fp32 mode), bit decode on sm_80, no spills, shared memory within the SM's limit."""
    ptx = r["ptx"]
    if precision == "fp32":
        # exact mode: fp32 FMAs, deliberately no tensor cores
        assert not ptx["wgmma"] and not ptx["mma_sync"], tag
    else:
        assert ptx[EXPECTED_MMA[(arch, precision)]], f"{tag}: expected {EXPECTED_MMA[(arch, precision)]}"
    if arch == "sm_80":
        assert not ptx["cvt_e4m3"], f"{tag}: sm_80 has no e4m3 type; bits must be decoded"
    if precision != "fp32":
        # The exact fp32 mode is for debugging: its FMA dot is compiled with a large stack
        # frame (~10 KB a thread) and is not a performance path; every other mode must fit
        # in registers with the launcher's own launch parameters.
        assert r.get("local_bytes", 0) == 0 and r.get("stack_bytes", 0) == 0, f"{tag}: spills {r}"
    assert r["shared_bytes"] <= SMEM_LIMIT[arch], f"{tag}: {r['shared_bytes']} B shared memory"


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_query_prep_compiles(compiled, arch):
    for r in _pick(compiled, kernel="query_prep", arch=arch):
        assert r["cubin_bytes"] > 0
        assert r.get("local_bytes", 0) == 0 and r.get("stack_bytes", 0) == 0, r
        assert r["shared_bytes"] <= SMEM_LIMIT[arch], r


def test_every_layout_and_epilogue_compiled(compiled):
    for precision in PRECISIONS:
        got = {(r["SHARED_KEYS"], r["ENSEMBLE_MEAN"], r["WRITE_LOGITS"])
               for r in _pick(compiled, kernel="fused_score", arch="sm_90", PRECISION=precision)}
        assert {(True, False, False), (False, False, False), (True, True, True)} <= got
    for precision in ("bf16", "fp8"):  # the sm_80 decode fallback, both key layouts
        got = {r["SHARED_KEYS"] for r in _pick(compiled, kernel="fused_score", arch="sm_80",
                                               PRECISION=precision)}
        assert got == {True, False}


# --- batched (paged / varlen) scorer: kernels/paged.py -------------------------------------------
BATCHED_CASES = [pytest.param("sm_90", p, id=f"sm_90-{p}") for p in PRECISIONS] + [
    pytest.param("sm_80", "bf16", id="sm_80-bf16")]


@pytest.mark.parametrize("arch,precision", BATCHED_CASES)
def test_batched_kernel_instructions(compiled, arch, precision):
    """Same instruction and resource rules as the row-format scorer, plus: paged fp8 rows
    (128 bytes at 128-byte offsets in a page) are read with 16-byte vector loads."""
    for r in _pick(compiled, kernel="batched_score", arch=arch, PRECISION=precision):
        ptx = r["ptx"]
        tag = f"{arch}/{precision}/paged={r['PAGED']}/shared={r['SHARED_KEYS']}"
        _check_dot_and_resources(r, arch, precision, tag)
        assert not ptx["ld_global_u8"], f"{tag}: key bytes read one at a time"
        if r["PAGED"]:
            assert ptx["ld_global_v4"], f"{tag}: paged fp8 rows not read with 16-byte loads"


def test_every_batched_layout_compiled(compiled):
    for precision in PRECISIONS:
        got = {r["SHARED_KEYS"] for r in _pick(compiled, kernel="batched_score", arch="sm_90",
                                               PRECISION=precision, PAGED=True)}
        assert got == {True, False}, precision
    got = {r["SHARED_KEYS"] for r in _pick(compiled, kernel="batched_score", arch="sm_90",
                                           PAGED=False)}
    assert got == {True, False}
    assert _pick(compiled, kernel="batched_score", arch="sm_90", WRITE_LOGITS=True,
                 ENSEMBLE_MEAN=True, INDEX="i64")
    got = {r["SHARED_KEYS"] for r in _pick(compiled, kernel="batched_score", arch="sm_80")}
    assert got == {True, False}


# --- the DeepGEMM drop-in's raw-logits kernel: kernels/mqa_logits.py ----------------------------
MQA_MMA = {"sm_90": "wgmma_e4m3", "sm_89": "mma_sync_e4m3", "sm_80": "mma_sync_bf16"}


@pytest.mark.parametrize("arch", ["sm_90", "sm_89", "sm_80"])
def test_mqa_kernel_fp8_q(compiled, arch):
    """The e4m3 q goes into the dot as is: e4m3 tensor cores on sm_89 (mma.sync) and sm_90
    (wgmma), the integer decode to bf16 on sm_80 (no e4m3 conversion instruction there);
    no spills, shared memory within the SM's limit; 16-byte page units give 16-byte loads."""
    found = _pick(compiled, kernel="mqa_logits", arch=arch)
    assert {(r["PAGED"], r["ABSOLUTE"], r["FILL"], r["PAGE_UNIT"]) for r in found} == {
        (True, False, False, 16), (True, False, True, 16), (True, False, False, 4),
        (False, True, True, 16), (False, False, False, 16)}
    for r in found:
        ptx = r["ptx"]
        tag = f"{arch}/paged={r['PAGED']}/unit={r['PAGE_UNIT']}/fill={r['FILL']}"
        assert ptx[MQA_MMA[arch]], f"{tag}: expected {MQA_MMA[arch]}"
        if arch == "sm_80":
            assert not ptx["cvt_e4m3"], f"{tag}: sm_80 has no e4m3 type; bits must be decoded"
        assert r.get("local_bytes", 0) == 0 and r.get("stack_bytes", 0) == 0, f"{tag}: spills {r}"
        assert r["shared_bytes"] <= SMEM_LIMIT[arch], f"{tag}: {r['shared_bytes']} B shared"
        assert not ptx["ld_global_u8"], f"{tag}: key or q bytes read one at a time"
        if r["PAGE_UNIT"] == 16:
            assert ptx["ld_global_v4"], f"{tag}: fp8 rows not read with 16-byte loads"
