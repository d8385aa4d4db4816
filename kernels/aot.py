"""Ahead-of-time compilation of every kernel specialization for a GPU target, no GPU needed,
and the compile report (design §12).

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs the whole NVIDIA
pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin through the ptxas shipped with triton), so a
CPU-only CI proves each specialization builds for sm_90, sm_80 (and sm_89 for the DeepGEMM
drop-in) with the launchers' own launch parameters, and reads off the cubin (``kernels.sass``)
what the design promises: registers, spills, shared memory, occupancy, the steady-state loop's
SASS instructions per warp per tile, its tensor-core instructions and global loads, and the
modeled issue bound.

    python -m flashmemory_triton.kernels.aot --report [--json FILE] [--dump DIR] [--target T]

``--report`` prints one line per specialization, ``--json`` writes the records, ``--dump`` the
cubins (each record's ``cubin`` names its file). Without options: the records as JSON on
stdout. It must run WITHOUT ``TRITON_INTERPRET=1``: under the interpreter ``@triton.jit``
returns objects the compiler cannot take, which is why the tests call this module in a
subprocess. Compiles go through Triton's cache, so the report after the compile tests (or the
reverse) reuses every cubin.
"""

from __future__ import annotations

import json
import os
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flashmemory_triton import constants as C

from . import PRECISIONS, sass
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
    "mul_bf16x2": r"mul\.rn\.bf16x2",  # the dense v2 bf16 decoder (numerics.e4m3_words_to_bf16)
    "ld_global_b32": r"ld\.global[^\n]*\.b32",
    "ld_global_u8": r"ld\.global[^\n]*\.u8",
    "ld_global_v4": r"ld\.global[^\n]*\.v4\.b32",
    # the split scorer's tile counter and its L2 reads of the other units' results
    "atom_acq_rel_gpu": r"atom\.global\.gpu\.acq_rel\.add",
    "ld_global_cg": r"ld\.global\.cg",
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
                  WRITE_LOGITS: bool, HW_FP8: bool, HEADLINE: bool = False, L: int = 3,
                  H_PAD: int = 128, ROW_WORDS: int = C.CHUNK_BYTES // 4, **config):
    """Compile one specialization of the v1 scorer (``score.fused_score_kernel``) with the
    launcher's own GPU launch parameters (``score.launch_config``), or with ``config``
    overrides (BLOCK_N, BLOCK_H, num_warps, num_stages) when exploring. ``HEADLINE``: with the
    argument specialization the JIT gives the headline call (16-byte aligned pointers; N, H and
    the row stride multiples of 16); otherwise none (any N, keys at any 4-byte offset), the
    most register-hungry case, which the spill checks need."""
    target = TARGETS[arch]
    capability = divmod(target.arch, 10)
    cfg = {**launch_config(1 << 20, H_PAD, PRECISION, capability, SHARED_KEYS), **config}
    q_type = "*bf16" if PRECISION in ("bf16", "fp8") else "*fp32"
    signature = {
        "kw_ptr": "*u8", "kf_ptr": "*fp32", "q_ptr": q_type, "w_ptr": "*fp32",
        "scores_ptr": "*fp32", "logits_ptr": "*fp32", "B": "i32", "N": "i32", "H": "i32",
        "stride_kl": "i64", "stride_kb": "i64", "stride_kn": "i64", "logit_offset": "fp32",
    }
    constexprs = dict(L=L, D=C.HEAD_DIM, H_PAD=H_PAD, BLOCK_N=cfg["BLOCK_N"],
                      BLOCK_H=cfg["BLOCK_H"], ROW_WORDS=ROW_WORDS, PRECISION=PRECISION,
                      HW_FP8=HW_FP8, SHARED_KEYS=SHARED_KEYS, ENSEMBLE_MEAN=ENSEMBLE_MEAN,
                      WRITE_LOGITS=WRITE_LOGITS, BF16_DOT_VIA_F32=False)
    for name in constexprs:
        signature[name] = "constexpr"
    aligned = []
    if HEADLINE:
        aligned = [n for n, ty in signature.items() if ty.startswith("*")] + ["N", "H", "stride_kb"]
    out = _compile(fused_score_kernel, signature, constexprs, arch, cfg["num_warps"],
                   cfg["num_stages"], aligned=aligned)
    out["tile"] = _tile(cfg, L, H_PAD, persistent=False, inner_trips=1 if SHARED_KEYS else L)
    return out


def _asm_choices(precision: str) -> tuple[bool, ...]:
    """bf16 builds with the interpretable decoder (the default launch) and with the opt-in
    PTX decoder (``numerics.BF16_ASM_ENV``); fp8 has one decoder."""
    return (False, True) if precision == "bf16" else (False,)


def dense_specializations(arch: str):
    """The v2 dense scorer (``kernels.dense``, sm_90 only: before Hopper the launcher keeps v1):
    shared keys, bf16 and fp8, the max ensemble (the headline) and the mean ensemble with
    logits where v2 serves it (``dense.serves``)."""
    from .dense import serves
    if arch != "sm_90":
        return
    for precision in ("bf16", "fp8"):
        for mean, logits in ((False, False), (True, True)):
            if serves(precision, mean, logits):  # what the launcher runs on v2
                for asm in _asm_choices(precision):
                    yield dict(PRECISION=precision, ENSEMBLE_MEAN=mean, WRITE_LOGITS=logits,
                               HW_FP8=True, BF16_ASM=asm)


def compile_dense(arch: str, *, PRECISION: str, ENSEMBLE_MEAN: bool, WRITE_LOGITS: bool,
                  HW_FP8: bool, BF16_ASM: bool = False, L: int = 3, H_PAD: int = 128,
                  ROW_WORDS: int = C.CHUNK_BYTES // 4, **config):
    """Compile one specialization of ``dense.dense_score_kernel`` with its launcher's GPU
    parameters (``dense_launch_config``) or ``config`` overrides. Pointers 16-byte aligned
    (torch allocations); N unspecialized (the tail tile is a runtime branch)."""
    from .dense import dense_launch_config, dense_score_kernel
    cfg = {**dense_launch_config(divmod(TARGETS[arch].arch, 10), 1 << 20, PRECISION), **config}
    signature = {
        "kw_ptr": "*i32", "kf_ptr": "*fp32", "q_ptr": "*bf16", "w_ptr": "*fp32",
        "scores_ptr": "*fp32", "logits_ptr": "*fp32", "B": "i32", "N": "i32", "H": "i32",
        "stride_kb": "i64", "stride_kn": "i64", "logit_offset": "fp32",
    }
    constexprs = dict(L=L, D=C.HEAD_DIM, H_PAD=H_PAD, BLOCK_N=cfg["BLOCK_N"], ROW_WORDS=ROW_WORDS,
                      PRECISION=PRECISION, HW_FP8=HW_FP8, ENSEMBLE_MEAN=ENSEMBLE_MEAN,
                      WRITE_LOGITS=WRITE_LOGITS, BF16_DOT_VIA_F32=False,
                      PREFETCH=cfg["PREFETCH"], BF16_ASM=BF16_ASM)
    for name in constexprs:
        signature[name] = "constexpr"
    aligned = [name for name, ty in signature.items() if ty.startswith("*")]
    out = _compile(dense_score_kernel, signature, constexprs, arch, cfg["num_warps"],
                   cfg["num_stages"], aligned=aligned)
    out["tile"] = _tile(dict(cfg, BLOCK_H=H_PAD), L, H_PAD, persistent=True, inner_trips=1)
    return out


def dense_split_specializations(arch: str):
    """The split launch of the v2 dense scorer (``kernels.dense_split``, sm_90 only, as v2):
    (tile, layer) and (tile, layer, head half) units, bf16 and fp8, the max ensemble without
    logits and the mean ensemble with them (its combining program's two epilogues)."""
    from .dense_split import MODES
    if arch != "sm_90":
        return
    for mode in MODES[1:]:
        for precision in ("bf16", "fp8"):
            for mean, logits in ((False, False), (True, True)):
                for asm in _asm_choices(precision):
                    yield dict(SPLIT=mode, PRECISION=precision, ENSEMBLE_MEAN=mean,
                               WRITE_LOGITS=logits, HW_FP8=True, BF16_ASM=asm)


def compile_dense_split(arch: str, *, SPLIT: str, PRECISION: str, ENSEMBLE_MEAN: bool,
                        WRITE_LOGITS: bool, HW_FP8: bool, BF16_ASM: bool = False, L: int = 3,
                        H_PAD: int = 128,
                        ROW_WORDS: int = C.CHUNK_BYTES // 4, **config):
    """Compile one specialization of ``dense_split.dense_split_kernel`` with its launcher's
    GPU parameters (the fused kernel's tile, ``dense_split.WARPS``) or ``config`` overrides.
    One program is one unit: one layer of one tile (``SPLIT="layers"``) or half its heads
    (``"heads"``), so the tile's FLOPs are one layer's (or half of them)."""
    from .dense import dense_launch_config
    from .dense_split import WARPS, dense_split_kernel
    cfg = {**dense_launch_config(divmod(TARGETS[arch].arch, 10), 1 << 20, PRECISION),
           "num_warps": WARPS[SPLIT], **config}
    signature = {
        "kw_ptr": "*i32", "kf_ptr": "*fp32", "q_ptr": "*bf16", "w_ptr": "*fp32",
        "scores_ptr": "*fp32", "logits_ptr": "*fp32", "part_ptr": "*fp32", "count_ptr": "*i32",
        "B": "i32", "N": "i32", "H": "i32", "stride_kb": "i64", "stride_kn": "i64",
        "logit_offset": "fp32",
    }
    constexprs = dict(L=L, D=C.HEAD_DIM, H_PAD=H_PAD, BLOCK_N=cfg["BLOCK_N"], ROW_WORDS=ROW_WORDS,
                      PRECISION=PRECISION, HW_FP8=HW_FP8, ENSEMBLE_MEAN=ENSEMBLE_MEAN,
                      WRITE_LOGITS=WRITE_LOGITS, BF16_DOT_VIA_F32=False, BF16_ASM=BF16_ASM,
                      SPLIT_HEADS=SPLIT == "heads")
    for name in constexprs:
        signature[name] = "constexpr"
    aligned = [name for name, ty in signature.items() if ty.startswith("*")]
    out = _compile(dense_split_kernel, signature, constexprs, arch, cfg["num_warps"],
                   cfg["num_stages"], aligned=aligned)
    heads = H_PAD // 2 if SPLIT == "heads" else H_PAD
    out["tile"] = _tile(dict(cfg, BLOCK_H=heads), 1, heads, persistent=False, inner_trips=1)
    return out


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
    from .paged import (
        FILL_N,
        MAX_ROWS,
        PAGED_LAYER_UNIT,
        VARLEN_LAYER_UNIT,
        batched_launch_config,
        batched_score_kernel,
    )
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
    out = _compile(batched_score_kernel, signature, constexprs, arch, cfg["num_warps"],
                   cfg["num_stages"], aligned=aligned)
    out["tile"] = _tile(cfg, L, H_PAD, persistent=True, inner_trips=1 if SHARED_KEYS else L)
    return out


def paged_v2_specializations(arch: str):
    """The v2 paged scorer (``kernels.paged_v2``, sm_90 only: before Hopper the launcher keeps
    v1): one shared pool, bf16 and fp8, the max ensemble (the headline) and the mean ensemble
    with logits where v2 serves it (``paged_v2.serves``), int32 tables; plus the int64-table
    headline in fp8."""
    from .paged_v2 import serves
    if arch != "sm_90":
        return
    for precision in ("bf16", "fp8"):
        for mean, logits in ((False, False), (True, True)):
            if serves(precision, mean, logits):  # what the launcher runs on v2
                for asm in _asm_choices(precision):
                    yield dict(PAGED=True, PRECISION=precision, SHARED_KEYS=True,
                               ENSEMBLE_MEAN=mean, WRITE_LOGITS=logits, HW_FP8=True,
                               INDEX="i32", BF16_ASM=asm)
    yield dict(PAGED=True, PRECISION="fp8", SHARED_KEYS=True, ENSEMBLE_MEAN=False,
               WRITE_LOGITS=False, HW_FP8=True, INDEX="i64")


def varlen_v2_specializations(arch: str):
    """The v2 scorer on varlen rows (one shared buffer; sm_90), as ``paged_v2_specializations``
    with int64 ``cu_chunks``."""
    from .paged_v2 import serves
    if arch != "sm_90":
        return
    for precision in ("bf16", "fp8"):
        for mean, logits in ((False, False), (True, True)):
            if serves(precision, mean, logits, paged=False):
                for asm in _asm_choices(precision):
                    yield dict(PAGED=False, PRECISION=precision, SHARED_KEYS=True,
                               ENSEMBLE_MEAN=mean, WRITE_LOGITS=logits, HW_FP8=True,
                               INDEX="i64", BF16_ASM=asm)


def compile_paged_v2(arch: str, *, PAGED: bool, PRECISION: str, SHARED_KEYS: bool,
                     ENSEMBLE_MEAN: bool, WRITE_LOGITS: bool, HW_FP8: bool, INDEX: str = "i32",
                     BF16_ASM: bool = False,
                     L: int = 3, H_PAD: int = 128, BLOCK_B: int | None = None, **config):
    """Compile one specialization of ``paged_v2.paged_v2_kernel`` with its launcher's GPU
    parameters (``paged_v2_launch_config``) or ``config`` overrides. Pointers 16-byte aligned
    (torch allocations; the pool's alignment is checked by ``paged.page_pools``); no integer
    argument specialized (the page stride may be an engine's padded one; the heads come
    padded to ``H_PAD``, so none of the kernel's integers affects its alignment). The tile is
    one page (64 chunks); its steady state is the innermost loop holding the tensor-core work
    (the walk of one request's full pages), counted once per page."""
    from .paged_v2 import FILL_N, MAX_ROWS, paged_v2_kernel, paged_v2_launch_config
    if not SHARED_KEYS:
        raise ValueError("paged v2 takes one shared pool or varlen buffer")
    epilogue = "max" if not (ENSEMBLE_MEAN or WRITE_LOGITS) else "other"
    cfg = {**paged_v2_launch_config(divmod(TARGETS[arch].arch, 10), PAGED, PRECISION, epilogue),
           **config}
    signature = {
        "kw_ptr": "*i32", "kf_ptr": "*fp32", "table_ptr": f"*{INDEX}", "len_ptr": f"*{INDEX}",
        "q_ptr": "*bf16", "w_ptr": "*fp32", "scores_ptr": "*fp32", "logits_ptr": "*fp32",
        "B": "i32", "B_q": "i32", "row0": "i32", "max_chunks": "i32",
        "limit": "i32", "max_pages": "i32", "page_units": "i32", "stride_tb": "i32",
        "logit_offset": "fp32",
    }
    constexprs = dict(L=L, D=C.HEAD_DIM, H_PAD=H_PAD, BLOCK_B=BLOCK_B or MAX_ROWS,
                      FILL_N=FILL_N, PRECISION=PRECISION, HW_FP8=HW_FP8,
                      ENSEMBLE_MEAN=ENSEMBLE_MEAN, WRITE_LOGITS=WRITE_LOGITS,
                      BF16_DOT_VIA_F32=False, PREFETCH=cfg["PREFETCH"], BF16_ASM=BF16_ASM,
                      PAGED=PAGED)
    for name in constexprs:
        signature[name] = "constexpr"
    aligned = [name for name, ty in signature.items() if ty.startswith("*")]
    out = _compile(paged_v2_kernel, signature, constexprs, arch, cfg["num_warps"],
                   cfg["num_stages"], aligned=aligned)
    out["tile"] = _tile(dict(cfg, BLOCK_N=C.PAGE_CHUNKS, BLOCK_H=H_PAD), L, H_PAD,
                        persistent=True, inner_trips=1, innermost=True)
    return out


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
    from .mqa_logits import FILL_N, MAX_ROWS, mqa_head_trips, mqa_launch_config, mqa_logits_kernel
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
                      BF16_DOT_VIA_F32=False, WHILE_LOOP=False, ROLL_HEADS=cfg["ROLL_HEADS"])
    for name in constexprs:
        signature[name] = "constexpr"
    # torch allocations are 16-byte aligned; the pool base only when the launcher picks
    # 16-byte page units (``mqa_logits.page_unit``), so kb_ptr is aligned only then.
    aligned = [n for n, ty in signature.items() if ty.startswith("*")
               and (n not in ("kb_ptr", "kf_ptr") or PAGE_UNIT == 16)]
    out = _compile(mqa_logits_kernel, signature, constexprs, arch, cfg["num_warps"],
                   cfg["num_stages"], aligned=aligned)
    trips = mqa_head_trips(H_PAD, cfg["BLOCK_H"], cfg["ROLL_HEADS"], constexprs["HW_FP8"])
    out["tile"] = _tile(cfg, 1, H_PAD, persistent=True, inner_trips=trips)  # raw logits, 1 layer
    return out


def compile_query_prep(arch: str, *, FP8: bool, OUT_BF16: bool, BLOCK_H: int = QUERY_BLOCK_H):
    signature = {"q_ptr": "*fp32", "w_ptr": "*fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
                 "q_out_ptr": "*bf16" if OUT_BF16 else "*fp32", "w_out_ptr": "*fp32",
                 "B": "i32", "H": "i32"}
    constexprs = dict(D=C.HEAD_DIM, ROPE=C.ROPE_DIM, BLOCK_H=BLOCK_H, FP8=FP8, OUT_BF16=OUT_BF16,
                      FP8_MIN_AMAX=C.FP8_QUANT_MIN_AMAX, FP8_MAX=C.FP8_E4M3_MAX)
    for name in constexprs:
        signature[name] = "constexpr"
    out = _compile(query_prep_kernel, signature, constexprs, arch, 4, 1)
    # One program = one (layer, row) and BLOCK_H heads; its Hadamard dots are exact fp32 (no
    # tensor-core rate applies): only the instruction count is reported.
    out["tile"] = dict(persistent=False, inner_trips=1, flops=None, block_n=None,
                       block_h=BLOCK_H, stages=1)
    return out


def _tile(cfg: dict, L: int, H: int, persistent: bool, inner_trips: int,
          innermost: bool = False) -> dict:
    """What one tile of a scorer is: ``BLOCK_N`` chunks x ``L`` layers x ``H`` heads x D.
    ``innermost``: the steady state is the innermost loop holding the tensor-core work (a
    persistent kernel whose tile loop is nested in a walk, e.g. paged v2's per request)."""
    return dict(persistent=persistent, inner_trips=inner_trips, innermost=innermost,
                block_n=cfg["BLOCK_N"],
                block_h=cfg["BLOCK_H"], stages=cfg["num_stages"],
                flops=2 * cfg["BLOCK_N"] * H * C.HEAD_DIM * L)


def _compile(fn, signature, constexprs, arch, num_warps, num_stages, aligned=()):
    # ``aligned``: arguments the runtime launcher specializes as 16-byte aligned (pointers from
    # torch allocations, ints divisible by 16), which lets the compiler emit vector loads.
    names = list(signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=TARGETS[arch],
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    cubin = compiled.asm["cubin"]
    return {
        "shared_bytes": int(compiled.metadata.shared),
        "num_warps": num_warps,
        **sass.resource_usage(cubin),
        "ptx": {name: bool(re.search(pat, ptx)) for name, pat in PTX_MARKERS.items()},
        "cubin_bytes": len(cubin),
        "_cubin": cubin,
    }


# --- the report --------------------------------------------------------------------------------
HEADLINE_PRECISIONS = ("bf16", "fp8")


def _jobs(archs):
    for arch in archs:
        if arch in SCORER_ARCHS:
            for spec in score_specializations(arch):
                yield "dense", arch, dict(VERSION="v1", **spec)
            for precision in HEADLINE_PRECISIONS:  # v1 as the JIT builds the headline call
                yield "dense", arch, dict(VERSION="v1", PRECISION=precision, SHARED_KEYS=True,
                                          ENSEMBLE_MEAN=False, WRITE_LOGITS=False,
                                          HW_FP8=arch != "sm_80", HEADLINE=True)
            for spec in dense_specializations(arch):
                yield "dense", arch, dict(VERSION="v2", **spec)
            for spec in dense_split_specializations(arch):  # version: the split mode
                yield "dense", arch, dict(VERSION=f"v2_split_{spec['SPLIT']}", **spec)
            for fp8, out_bf16 in ((False, False), (False, True), (True, True)):
                yield "query", arch, {"FP8": fp8, "OUT_BF16": out_bf16}
            for spec in batched_specializations(arch):
                yield ("paged" if spec["PAGED"] else "varlen"), arch, dict(VERSION="v1", **spec)
            for spec in paged_v2_specializations(arch):
                yield "paged", arch, dict(VERSION="v2", **spec)
            for spec in varlen_v2_specializations(arch):
                yield "varlen", arch, dict(VERSION="v2", **spec)
        if arch in MQA_ARCHS:
            for spec in mqa_specializations(arch):
                yield "mqa", arch, spec


def _compiler(kernel: str, spec: dict):
    if kernel == "dense":
        if spec["VERSION"].startswith("v2_split"):
            return compile_dense_split
        return compile_dense if spec["VERSION"] == "v2" else compile_score
    if kernel in ("paged", "varlen") and spec.get("VERSION") == "v2":
        return compile_paged_v2
    return {"query": compile_query_prep, "paged": compile_batched, "varlen": compile_batched,
            "mqa": compile_mqa}[kernel]


def _name(kernel: str, arch: str, spec: dict) -> str:
    parts = [kernel, arch] + [f"{k}={v}" for k, v in spec.items()]
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", "-".join(parts)) + ".cubin"


def _run_job(job, dump_dir: str | None = None) -> dict:
    """Compile one specialization and build its report record (design §12)."""
    kernel, arch, spec = job
    args = {k: v for k, v in spec.items() if k != "VERSION"}
    out = _compiler(kernel, spec)(arch, **args)
    cubin = out.pop("_cubin")
    tile = out.pop("tile")
    if "PRECISION" in spec:
        precision = spec["PRECISION"]
    elif kernel == "mqa":
        precision = "fp8"
    else:
        precision = "fp8" if spec["FP8"] else ("bf16" if spec["OUT_BF16"] else "fp32")
    counts = sass.tile_counts(sass.disassemble(cubin), tile["persistent"], tile["inner_trips"],
                              innermost=tile.get("innermost", False))
    bound, tensor_cycles, issue_cycles = None, None, None
    if tile["flops"] is not None and precision != "fp32":
        bound, tensor_cycles, issue_cycles = sass.issue_bound(
            arch, precision, tile["flops"], counts.instructions, out["num_warps"])
    name = _name(kernel, arch, spec)
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        with open(os.path.join(dump_dir, name), "wb") as f:
            f.write(cubin)
    keys = None
    if "SHARED_KEYS" in spec:
        keys = "shared" if spec["SHARED_KEYS"] else "per_layer"
    elif kernel == "dense":
        keys = "shared"  # v2 takes shared keys only
    return {
        "kernel": kernel, "target": arch, "precision": precision, "keys": keys,
        "triton": triton.__version__,
        "regs": out["regs"],
        "spill_bytes": out["stack_bytes"] + out["local_bytes"],
        "smem_bytes": out["shared_bytes"],
        "ctas_per_sm": sass.ctas_per_sm(arch, out["regs"], out["shared_bytes"], out["num_warps"]),
        "warps": out["num_warps"],
        "loop_instructions_per_tile": counts.instructions,
        "mma_per_tile": counts.mma,
        "loop_global_loads_per_tile": counts.global_loads,
        "issue_bound": bound,
        "cubin": name,
        "version": spec.get("VERSION"),
        "specialization": "headline" if spec.get("HEADLINE") else "generic",
        "persistent": tile["persistent"], "stages": tile["stages"],
        "block_n": tile["block_n"], "block_h": tile["block_h"],
        "flops_per_tile": tile["flops"],
        # what the tile's tensor-core instructions compute over the whole CTA: equal to
        # flops_per_tile unless the tile (or the kernel) is counted wrong
        "mma_flops_per_tile": counts.mma_flops_per_warp * out["num_warps"],
        "tensor_cycles": tensor_cycles, "issue_cycles": issue_cycles,
        "opcodes": dict(sorted(counts.opcodes.items(), key=lambda kv: -kv[1])),
        **spec, **out,
    }


def compile_all(archs=DEFAULT_ARCHS, workers: int | None = None,
                dump_dir: str | None = None) -> list[dict]:
    """Compile every specialization, ``workers`` processes at a time (default: one per core;
    ptxas is single-threaded and an sm_80 build of the scorer takes a minute or two)."""
    jobs = list(_jobs(archs))
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return [_run_job(j, dump_dir) for j in jobs]
    import concurrent.futures
    import functools
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding compiler state
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return list(pool.map(functools.partial(_run_job, dump_dir=dump_dir), jobs))


def _fmt(v, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def format_report(records: list[dict]) -> str:
    """One line per record: the report's fields, readable."""
    head = ("kernel", "ver", "target", "precision", "keys", "ens", "spec", "tile", "warps",
            "regs", "spill", "smem", "ctas/SM", "instr/tile", "mma/tile", "ldg/tile",
            "issue_bound")
    rows = [head]
    for r in records:
        ens = "mean+logits" if r.get("WRITE_LOGITS") else ("mean" if r.get("ENSEMBLE_MEAN")
                                                           else "max")
        tile = f"{r['block_n']}x{r['block_h']}" if r["block_n"] else f"q x{r['block_h']}"
        rows.append((r["kernel"], _fmt(r["version"]), r["target"], r["precision"],
                     _fmt(r["keys"]), ens if r["keys"] else "-",
                     r["specialization"] + ("+asm" if r.get("BF16_ASM") else ""), tile,
                     _fmt(r["warps"]), _fmt(r["regs"]), _fmt(r["spill_bytes"]),
                     _fmt(r["smem_bytes"]), _fmt(r["ctas_per_sm"]),
                     _fmt(r["loop_instructions_per_tile"]), _fmt(r["mma_per_tile"]),
                     _fmt(r["loop_global_loads_per_tile"]), _fmt(r["issue_bound"], 2)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return (f"triton {triton.__version__}. instr/tile: SASS instructions per warp per tile "
            "(one trip of a persistent kernel's steady-state loop, else the whole program); "
            "issue_bound = tensor cycles / max(tensor, issue) cycles (design §12)\n"
            + "\n".join(lines))


def main(argv=None) -> int:
    import argparse
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot: unset TRITON_INTERPRET to compile for a GPU target", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="python -m flashmemory_triton.kernels.aot",
                                     description="Compile every kernel specialization for GPU "
                                     "targets without a GPU; the compile report.")
    parser.add_argument("targets", nargs="*", default=[], metavar="TARGET",
                        help=f"targets to build, of {sorted(TARGETS)} (default: all)")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), default=[],
                        help="a target to build (repeatable)")
    parser.add_argument("--report", action="store_true", help="print the report table")
    parser.add_argument("--json", metavar="FILE", help="write the records as JSON")
    parser.add_argument("--dump", metavar="DIR", help="write the cubins")
    parser.add_argument("--workers", type=int, default=None, help="parallel compiles")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown target(s) {unknown}; choose from {sorted(TARGETS)}")
    archs = tuple(args.targets + args.target) or DEFAULT_ARCHS
    records = compile_all(archs, args.workers, args.dump)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    if args.report:
        print(format_report(records))
    if not (args.json or args.report):
        json.dump(records, sys.stdout, indent=1)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
