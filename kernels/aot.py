"""Ahead-of-time compilation of every kernel specialization for a GPU target, no GPU needed.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs the whole NVIDIA
pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin through the ptxas shipped with triton), so a
CPU-only CI proves each specialization builds for sm_90 and sm_80, reads its shared memory and
registers, and checks which matrix instructions the PTX uses.

Run as ``python -m flashmemory_triton.kernels.aot`` (prints JSON). It must run WITHOUT
``TRITON_INTERPRET=1``: under the interpreter ``@triton.jit`` returns objects the compiler
cannot take, which is why the tests call this module in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flashmemory_triton import constants as C

from . import PRECISIONS
from .query_prep import QUERY_BLOCK_H, query_prep_kernel
from .score import fused_score_kernel, launch_config

TARGETS = {"sm_90": GPUTarget("cuda", 90, 32), "sm_80": GPUTarget("cuda", 80, 32),
           "sm_89": GPUTarget("cuda", 89, 32)}
# The DeepGEMM drop-in's kernel (``mqa_logits``) is built for every arch its API promises:
# sm_89 is the first with e4m3 tensor cores below Hopper (the other kernels: sm_90, sm_80).
MQA_ARCHS = ("sm_90", "sm_89", "sm_80")
SCORER_ARCHS = ("sm_90", "sm_80")
DEFAULT_ARCHS = ("sm_90", "sm_80", "sm_89")
PTX_MARKERS = {
    "wgmma": r"wgmma\.mma_async",
    "wgmma_bf16": r"wgmma\.mma_async[^\n]*\.bf16",
    "wgmma_e4m3": r"wgmma\.mma_async[^\n]*\.e4m3",
    "wgmma_tf32": r"wgmma\.mma_async[^\n]*\.tf32",
    "mma_sync": r"\bmma\.sync",
    "mma_sync_bf16": r"\bmma\.sync[^\n]*\.bf16",
    "mma_sync_tf32": r"\bmma\.sync[^\n]*\.tf32",
    "mma_sync_e4m3": r"\bmma\.sync[^\n]*\.e4m3",
    "cvt_e4m3": r"cvt[^\n]*e4m3",
    "ld_global_b32": r"ld\.global[^\n]*\.b32",
    "ld_global_u8": r"ld\.global[^\n]*\.u8",
    "ld_global_v4": r"ld\.global[^\n]*\.v4\.b32",
}


def score_specializations(arch: str):
    """The specializations the launcher produces for ``arch`` (GPU launch parameters of
    ``score.launch_config`` at H = 128).

    sm_90: every precision x key layout, plus every precision with the mean ensemble and
    per-layer logits on (those two switches only change the epilogue, so crossing them with
    both layouts would add compile time and no coverage).
    sm_80: the integer e4m3 decode fallback, i.e. the modes whose tensor-core operand comes
    from it (bf16, fp8), shared and per-layer keys. ptxas needs 1-2 minutes for each sm_80
    build of this kernel on a CI core, so the tf32/fp32 builds (same decode, different dot)
    are left out.
    """
    if arch == "sm_80":
        for precision in ("bf16", "fp8"):
            for shared in (True, False):
                yield dict(PRECISION=precision, SHARED_KEYS=shared, ENSEMBLE_MEAN=False,
                           WRITE_LOGITS=False, HW_FP8=False)
        return
    for precision in PRECISIONS:
        for shared, mean, logits in ((True, False, False), (False, False, False),
                                     (True, True, True)):
            yield dict(PRECISION=precision, SHARED_KEYS=shared, ENSEMBLE_MEAN=mean,
                       WRITE_LOGITS=logits, HW_FP8=True)


def compile_score(arch: str, *, PRECISION: str, SHARED_KEYS: bool, ENSEMBLE_MEAN: bool,
                  WRITE_LOGITS: bool, HW_FP8: bool, L: int = 3, H_PAD: int = 128,
                  ROW_WORDS: int = C.CHUNK_BYTES // 4, **config):
    """Compile one specialization with the launcher's own GPU launch parameters
    (``score.launch_config``), or with ``config`` overrides (BLOCK_N, BLOCK_H, num_warps,
    num_stages) when exploring."""
    target = TARGETS[arch]
    capability = divmod(target.arch, 10)
    cfg = {**launch_config(1 << 20, H_PAD, PRECISION, capability, SHARED_KEYS), **config}
    q_type = "*bf16" if PRECISION in ("bf16", "fp8") else "*fp32"
    signature = {
        "kw_ptr": "*u8", "kf_ptr": "*fp32", "q_ptr": q_type, "w_ptr": "*fp32",
        "scores_ptr": "*fp32", "logits_ptr": "*fp32", "B": "i32", "N": "i32", "H": "i32",
        "stride_kl": "i64", "stride_kb": "i64", "stride_kn": "i64", "logit_offset": "fp32",
    }
    constexprs = dict(L=L, D=C.HEAD_DIM, H_PAD=H_PAD, BLOCK_N=cfg["BLOCK_N"], BLOCK_H=cfg["BLOCK_H"],
                      ROW_WORDS=ROW_WORDS, PRECISION=PRECISION, HW_FP8=HW_FP8,
                      SHARED_KEYS=SHARED_KEYS, ENSEMBLE_MEAN=ENSEMBLE_MEAN,
                      WRITE_LOGITS=WRITE_LOGITS, BF16_DOT_VIA_F32=False)
    for name in constexprs:
        signature[name] = "constexpr"
    return _compile(fused_score_kernel, signature, constexprs, arch, cfg["num_warps"],
                    cfg["num_stages"])


def batched_specializations(arch: str):
    """The batched (paged / varlen) scorer's specializations (``kernels.paged``), at the GPU
    launch parameters of ``score.launch_config``. sm_90: paged with every precision and both
    key layouts (shared pool, per-layer pools), paged with the mean ensemble and per-layer
    logits, the int64 page-table variant, and varlen rows in both layouts. sm_80: the decode
    fallback (bf16) paged, both layouts (each sm_80 build takes ptxas a minute or more)."""
    if arch == "sm_80":
        for shared in (True, False):
            yield dict(PAGED=True, PRECISION="bf16", SHARED_KEYS=shared, ENSEMBLE_MEAN=False,
                       WRITE_LOGITS=False, HW_FP8=False, INDEX="i32")
        return
    for precision in PRECISIONS:
        for shared in (True, False):
            yield dict(PAGED=True, PRECISION=precision, SHARED_KEYS=shared, ENSEMBLE_MEAN=False,
                       WRITE_LOGITS=False, HW_FP8=True, INDEX="i32")
    yield dict(PAGED=True, PRECISION="bf16", SHARED_KEYS=True, ENSEMBLE_MEAN=True,
               WRITE_LOGITS=True, HW_FP8=True, INDEX="i64")
    for shared in (True, False):
        yield dict(PAGED=False, PRECISION="bf16", SHARED_KEYS=shared, ENSEMBLE_MEAN=False,
                   WRITE_LOGITS=False, HW_FP8=True, INDEX="i64")


def compile_batched(arch: str, *, PAGED: bool, PRECISION: str, SHARED_KEYS: bool,
                    ENSEMBLE_MEAN: bool, WRITE_LOGITS: bool, HW_FP8: bool, INDEX: str = "i32",
                    L: int = 3, H_PAD: int = 128, BLOCK_B: int | None = None, **config):
    """Compile one specialization of ``paged.batched_score_kernel`` (the launcher's GPU
    parameters, or ``config`` overrides). ``INDEX``: dtype of the page table and lengths.
    ``BLOCK_B`` defaults to the largest the launcher uses (``MAX_ROWS`` requests)."""
    from .paged import (FILL_N, MAX_ROWS, PAGED_LAYER_UNIT, VARLEN_LAYER_UNIT,
                        batched_launch_config, batched_score_kernel)
    BLOCK_B = BLOCK_B or MAX_ROWS
    target = TARGETS[arch]
    cfg = {**batched_launch_config(1 << 20, H_PAD, PRECISION, divmod(target.arch, 10), PAGED,
                                   SHARED_KEYS),
           **config}
    q_type = "*bf16" if PRECISION in ("bf16", "fp8") else "*fp32"
    signature = {
        "kb_ptr": "*u8", "kf_ptr": "*fp32", "layer_off_ptr": "*i64", "table_ptr": f"*{INDEX}",
        "len_ptr": f"*{INDEX}", "q_ptr": q_type, "w_ptr": "*fp32", "scores_ptr": "*fp32",
        "logits_ptr": "*fp32", "B": "i32", "B_q": "i32", "row0": "i32", "H": "i32",
        "max_chunks": "i32", "limit": "i32", "max_pages": "i32", "page_units": "i32",
        "stride_tb": "i32",
        "stride_tp": "i32", "stride_sb": "i32", "stride_ll": "i32", "stride_lb": "i32",
        "logit_offset": "fp32",
    }
    constexprs = dict(L=L, D=C.HEAD_DIM, H_PAD=H_PAD, BLOCK_N=cfg["BLOCK_N"],
                      BLOCK_H=cfg["BLOCK_H"], BLOCK_B=BLOCK_B, FILL_N=FILL_N,
                      LAYER_UNIT=PAGED_LAYER_UNIT if PAGED else VARLEN_LAYER_UNIT, PAGED=PAGED,
                      PRECISION=PRECISION, HW_FP8=HW_FP8, SHARED_KEYS=SHARED_KEYS,
                      ENSEMBLE_MEAN=ENSEMBLE_MEAN, WRITE_LOGITS=WRITE_LOGITS,
                      BF16_DOT_VIA_F32=False, WHILE_LOOP=False)
    for name in constexprs:
        signature[name] = "constexpr"
    # Every tensor comes from a torch allocation (16-byte aligned: the launcher's pointer
    # specialization); the pool's 16-byte alignment is checked by ``paged.page_pools``.
    aligned = [name for name, ty in signature.items() if ty.startswith("*")]
    return _compile(batched_score_kernel, signature, constexprs, arch, cfg["num_warps"],
                    cfg["num_stages"], aligned=aligned)


def mqa_specializations(arch: str):
    """The DeepGEMM drop-in's raw-logits kernel (``kernels.mqa_logits``) at H = 128 (V4's
    heads, one call): paged (the schedule walk) with 16-byte page units (page stride a
    multiple of 16) and 4-byte ones, with and without the clean fill, and the non-paged key
    ranges (absolute columns, cleaned; compressed). The e4m3 q is read as bytes: bitcast on
    sm_89+, decoded on sm_80."""
    for unit, fill in ((16, False), (16, True), (4, False)):
        yield dict(PAGED=True, ABSOLUTE=False, FILL=fill, PAGE_UNIT=unit)
    yield dict(PAGED=False, ABSOLUTE=True, FILL=True, PAGE_UNIT=16)
    yield dict(PAGED=False, ABSOLUTE=False, FILL=False, PAGE_UNIT=16)


def compile_mqa(arch: str, *, PAGED: bool, ABSOLUTE: bool, FILL: bool, PAGE_UNIT: int,
                H_PAD: int = 128, BLOCK_B: int | None = None, **config):
    """Compile one specialization of ``mqa_logits.mqa_logits_kernel`` with the launcher's GPU
    parameters (``mqa_launch_config``) or ``config`` overrides."""
    from .mqa_logits import FILL_N, MAX_ROWS, mqa_launch_config, mqa_logits_kernel
    target = TARGETS[arch]
    capability = divmod(target.arch, 10)
    cfg = {**mqa_launch_config(1 << 20, H_PAD, capability, PAGED), **config}
    signature = {
        "kb_ptr": "*u8", "kf_ptr": "*fp32", "table_ptr": "*i32", "lo_ptr": "*i32",
        "hi_ptr": "*i32", "meta_ptr": "*i32", "q_ptr": "*u8", "w_ptr": "*fp32",
        "out_ptr": "*fp32",
        "R": "i32", "row0": "i32", "H": "i32", "width": "i32", "limit": "i32",
        "max_pages": "i32", "next_n": "i32", "page_units": "i32", "stride_tb": "i32",
        "stride_tp": "i32", "stride_wr": "i32", "stride_or": "i32",
    }
    constexprs = dict(D=C.HEAD_DIM, H_PAD=H_PAD, BLOCK_N=cfg["BLOCK_N"], BLOCK_H=cfg["BLOCK_H"],
                      BLOCK_B=BLOCK_B or (16 if PAGED else MAX_ROWS), FILL_N=FILL_N,
                      PAGE_UNIT=PAGE_UNIT,
                      PAGED=PAGED, ABSOLUTE=ABSOLUTE, FILL=FILL, HW_FP8=capability >= (8, 9),
                      BF16_DOT_VIA_F32=False, WHILE_LOOP=False)
    for name in constexprs:
        signature[name] = "constexpr"
    # torch allocations are 16-byte aligned; the pool base only when the launcher picks
    # 16-byte page units (``mqa_logits.page_unit``), so kb_ptr is aligned only then.
    aligned = [n for n, ty in signature.items() if ty.startswith("*")
               and (n not in ("kb_ptr", "kf_ptr") or PAGE_UNIT == 16)]
    return _compile(mqa_logits_kernel, signature, constexprs, arch, cfg["num_warps"],
                    cfg["num_stages"], aligned=aligned)


def compile_query_prep(arch: str, *, FP8: bool, OUT_BF16: bool, BLOCK_H: int = QUERY_BLOCK_H):
    signature = {"q_ptr": "*fp32", "w_ptr": "*fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
                 "q_out_ptr": "*bf16" if OUT_BF16 else "*fp32", "w_out_ptr": "*fp32",
                 "B": "i32", "H": "i32"}
    constexprs = dict(D=C.HEAD_DIM, ROPE=C.ROPE_DIM, BLOCK_H=BLOCK_H, FP8=FP8, OUT_BF16=OUT_BF16,
                      FP8_MIN_AMAX=C.FP8_QUANT_MIN_AMAX, FP8_MAX=C.FP8_E4M3_MAX)
    for name in constexprs:
        signature[name] = "constexpr"
    return _compile(query_prep_kernel, signature, constexprs, arch, 4, 1)


def _compile(fn, signature, constexprs, arch, num_warps, num_stages, aligned=()):
    # ``aligned``: arguments the runtime launcher specializes as 16-byte aligned (pointers from
    # torch allocations, ints divisible by 16), which lets the compiler emit vector loads.
    names = list(signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=TARGETS[arch],
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    return {
        "arch": arch,
        "shared_bytes": int(compiled.metadata.shared),
        "num_warps": num_warps,
        **_resource_usage(compiled),
        "ptx": {name: bool(re.search(pat, ptx)) for name, pat in PTX_MARKERS.items()},
        "cubin_bytes": len(compiled.asm.get("cubin", b"")),
    }


def _resource_usage(compiled) -> dict:
    """Registers, stack frame and local memory per thread, read off the cubin with the
    cuobjdump that ships with triton (``n_regs`` is only filled once loaded on a GPU)."""
    cubin = compiled.asm.get("cubin")
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not cubin or not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=False).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", out))
    return {"regs": int(found["REG"]), "stack_bytes": int(found["STACK"]),
            "local_bytes": int(found["LOCAL"])} if "REG" in found else {}


def _jobs(archs):
    for arch in archs:
        if arch in SCORER_ARCHS:
            for spec in score_specializations(arch):
                yield "fused_score", arch, spec
            for fp8, out_bf16 in ((False, False), (False, True), (True, True)):
                yield "query_prep", arch, {"FP8": fp8, "OUT_BF16": out_bf16}
            for spec in batched_specializations(arch):
                yield "batched_score", arch, spec
        if arch in MQA_ARCHS:
            for spec in mqa_specializations(arch):
                yield "mqa_logits", arch, spec


def _run_job(job) -> dict:
    kernel, arch, spec = job
    compile_fn = {"fused_score": compile_score, "query_prep": compile_query_prep,
                  "batched_score": compile_batched, "mqa_logits": compile_mqa}[kernel]
    return {"kernel": kernel, **spec, **compile_fn(arch, **spec)}


def compile_all(archs=DEFAULT_ARCHS, workers: int | None = None) -> list[dict]:
    """Compile every specialization, ``workers`` processes at a time (default: one per core;
    ptxas is single-threaded and an sm_80 build of the scorer takes a minute or two)."""
    jobs = list(_jobs(archs))
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return [_run_job(j) for j in jobs]
    import concurrent.futures
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding compiler state
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return list(pool.map(_run_job, jobs))


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot: unset TRITON_INTERPRET to compile for a GPU target", file=sys.stderr)
        return 2
    archs = tuple(argv or sys.argv[1:]) or DEFAULT_ARCHS
    json.dump(compile_all(archs), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
