"""Raw indexer logits for the DeepGEMM drop-in (``flashmemory_triton.deepgemm``), one launch.

The scorer's math without its epilogue: for query row ``r`` and key ``j``

    logit[r, j] = sum_h w[r, h] * relu(q[r, h] . (fp8_j * s_j))
                = |s_j| * sum_h w[r, h] * relu(sign(s_j) * (q[r, h] . fp8_j))

with ``q`` e4m3 bytes read directly (no conversion pass: bitcast to the e4m3 tensor-core
type on sm_89+, the exact integer decode to bf16 on sm_80 and in the interpreter), ``w`` the
caller's float32 weights taken as given (no sigmoid, no ensemble, no offset), any head count
(heads in ``BLOCK_H`` blocks). Keys come in one of two layouts:

``PAGED``
    DeepGEMM's fused cache ``[P, 64, 1, 132]``: page ``p`` at ``p * page_stride`` bytes holds
    ``[64 x 128 e4m3][64 x float32 scales]`` (the split format, design §4). Query row ``r``
    reads table row ``r // next_n`` and keys ``0 .. len[r] - 1``; its output column is the key.
``RANGES``
    Separate ``fp8 [N, 128]`` rows and ``float32 [N]`` scales; query row ``r`` reads keys
    ``ks[r] .. ke[r] - 1`` (clamped into ``[0, N]``). Output column ``j`` (``ABSOLUTE``) or
    ``j - ks[r]`` (compressed: DeepGEMM's ``max_seqlen_k`` convention).

Work list and balance. ``PAGED``: all rows in one launch, one program per share of the
schedule (``deepgemm.get_paged_mqa_logits_metadata``: program ``i`` walks the 64-key blocks
from ``(row, block)`` at ``meta[i]`` to ``meta[i + 1]``, skipping to the next row past a
row's length; computed on the device from the lengths). ``RANGES``: the batched scorer's
scheme (:mod:`.paged`): up to ``MAX_ROWS`` query rows a launch, tiles counted and prefix-summed
in registers, a persistent grid walking them. Nothing is read on the host (capturable in a
CUDA graph). ``FILL`` (``clean_logits``) also writes ``-inf`` at every output column outside
a row's keys; without it those columns are left as allocated, as DeepGEMM leaves them.
Addressing is int64; page ids outside ``[0, P)`` are never dereferenced (those keys give NaN).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashmemory_triton import constants as C
from flashmemory_triton.utils import _device

from . import configs
from ._alloc import alloc_output
from .numerics import e4m3_bits_to_f32
from .paged import FILL_N, MAX_ROWS, _num_programs, batched_launch_config
from .score import _load_key_tile_at

_PAGE_CHUNKS = tl.constexpr(C.PAGE_CHUNKS)


@triton.jit
def _mqa_rows(lo_ptr, hi_ptr, row0, R, limit, width,
              BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, ABSOLUTE: tl.constexpr):
    """RANGES: per-row vectors ``[BLOCK_B]`` of rows ``row0 ..``: keys (clamped), first key,
    output column of the first key, tiles' exclusive and inclusive prefix sums, total tiles."""
    rows = tl.arange(0, BLOCK_B)
    rmask = rows < R
    zero = tl.zeros([BLOCK_B], dtype=tl.int64)
    lo = tl.load(lo_ptr + row0 + rows, mask=rmask, other=0).to(tl.int64)
    hi = tl.load(hi_ptr + row0 + rows, mask=rmask, other=0).to(tl.int64)
    lo = tl.minimum(tl.maximum(lo, 0), zero + limit)
    hi = tl.minimum(tl.maximum(hi, lo), zero + limit)
    n_all = hi - lo
    start_all = lo
    if ABSOLUTE:
        col0_all = start_all
    else:
        col0_all = zero
        n_all = tl.minimum(n_all, zero + width)
    tiles = ((n_all + BLOCK_N - 1) // BLOCK_N).to(tl.int32)
    cum = tl.cumsum(tiles, axis=0)
    return n_all, start_all, col0_all, cum - tiles, cum, tl.sum(tiles, axis=0)


@triton.jit
def _mqa_tile(t, kb_ptr, kf_ptr, table_ptr, q_ptr, w_ptr, out_ptr, n_all, start_all, col0_all,
              first_all, cum, row0, H, limit, stride_wr, stride_or,
              D: tl.constexpr, H_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_H: tl.constexpr, BLOCK_B: tl.constexpr, HW_FP8: tl.constexpr,
              BF16_DOT_VIA_F32: tl.constexpr,
              ROLL_HEADS: tl.constexpr):
    """RANGES: global tile ``t`` of this launch's rows -> its row, then :func:`_mqa_tile_at`."""
    rows = tl.arange(0, BLOCK_B)
    b = tl.sum((cum <= t).to(tl.int32), axis=0)
    sel = rows == b
    first = tl.sum(tl.where(sel, first_all, 0), axis=0)
    n_b = tl.sum(tl.where(sel, n_all, 0), axis=0)
    col0 = tl.sum(tl.where(sel, col0_all, 0), axis=0)
    start = tl.sum(tl.where(sel, start_all, 0), axis=0)
    _mqa_tile_at((row0 + b).to(tl.int64), (t - first).to(tl.int64) * BLOCK_N, n_b, col0, start,
                 kb_ptr, kf_ptr, table_ptr, q_ptr, w_ptr, out_ptr, H, limit, 1, 0, 0, 0,
                 stride_wr, stride_or, D, H_PAD, BLOCK_N, BLOCK_H, 16, False, HW_FP8,
                 BF16_DOT_VIA_F32, ROLL_HEADS)


@triton.jit
def _mqa_heads(k, sign, h0, r, q_ptr, w_ptr, H, stride_wr, D: tl.constexpr,
               BLOCK_H: tl.constexpr, HW_FP8: tl.constexpr, BF16_DOT_VIA_F32: tl.constexpr):
    """``sum_h relu(sign * (fp8 . q_h)) * w_h`` over heads ``h0 .. h0 + BLOCK_H - 1`` of query
    row ``r`` (e4m3 q bytes: bitcast for the tensor cores, or decoded exactly to bf16)."""
    cols = tl.arange(0, D)
    heads = h0 + tl.arange(0, BLOCK_H)
    hmask = heads < H
    qb = tl.load(q_ptr + (r * H + heads.to(tl.int64))[:, None] * D + cols[None, :],
                 mask=hmask[:, None], other=0)
    w = tl.load(w_ptr + r * stride_wr + heads, mask=hmask, other=0.0)
    if HW_FP8:
        s = tl.dot(k, tl.trans(qb.to(tl.float8e4nv, bitcast=True)))
    elif BF16_DOT_VIA_F32:
        s = tl.dot(k, tl.trans(e4m3_bits_to_f32(qb)), input_precision="ieee")
    else:
        s = tl.dot(k, tl.trans(e4m3_bits_to_f32(qb).to(tl.bfloat16)))
    s = tl.maximum(s * sign[:, None], 0.0, propagate_nan=tl.PropagateNan.ALL)
    return tl.sum(s * w[None, :], axis=1)


@triton.jit
def _mqa_tile_at(r, n0, n_b, col0, start, kb_ptr, kf_ptr, table_ptr, q_ptr, w_ptr, out_ptr, H,
                 limit, next_n, page_units, stride_tb, stride_tp, stride_wr, stride_or,
                 D: tl.constexpr, H_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_H: tl.constexpr, PAGE_UNIT: tl.constexpr, PAGED: tl.constexpr,
                 HW_FP8: tl.constexpr, BF16_DOT_VIA_F32: tl.constexpr,
                 ROLL_HEADS: tl.constexpr):
    """Keys ``n0 .. n0 + BLOCK_N - 1`` (those below ``n_b``) of query row ``r``: logits stored
    at output columns ``col0 + n``. Keys are ``start + n`` (RANGES) or the row's pages."""
    n = n0 + tl.arange(0, BLOCK_N)
    nmask = n < n_b
    if PAGED:
        slot = n // _PAGE_CHUNKS
        page = tl.load(table_ptr + (r // next_n) * stride_tb + slot * stride_tp,
                       mask=nmask, other=0).to(tl.int64)
        valid = (page >= 0) & (page < limit)
        page = tl.where(valid, page, 0)
        within = n - slot * _PAGE_CHUNKS
        # Page starts in PAGE_UNIT-byte units (16 when the stride allows: 16-byte loads).
        key_bytes = (page * page_units + within * (D // PAGE_UNIT)) * PAGE_UNIT
        scale_words = page * (page_units * (PAGE_UNIT // 4)) + within + (_PAGE_CHUNKS * D) // 4
    else:
        key = start + n
        valid = key < limit  # always (ranges are clamped); keeps the mask shape uniform
        key_bytes = (key * (D // 16)) * 16
        scale_words = key
    lmask = nmask & valid
    k, abs_scale, sign, bad = _load_key_tile_at(kb_ptr, kf_ptr, key_bytes, scale_words, lmask,
                                                D, "fp8", HW_FP8)
    bad = bad | (~valid)
    if BF16_DOT_VIA_F32:
        k = k.to(tl.float32)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HW_FP8 or not ROLL_HEADS:
        for h0 in tl.static_range(0, H_PAD, BLOCK_H):
            acc += _mqa_heads(k, sign, h0, r, q_ptr, w_ptr, H, stride_wr, D, BLOCK_H, HW_FP8,
                              BF16_DOT_VIA_F32)
    else:
        # Without an e4m3 type (sm_80) the q bytes are decoded with integer ops per head
        # block. Unrolled, Triton 3.6 lets ptxas start every block's loads and decode at once
        # (255 registers and 8-376 bytes of stack); a runtime loop keeps one block live. Which
        # versions roll is ``configs.MQA_SM80`` (the launcher's choice, compile-tested);
        # ``kernels.aot`` counts the loop's trips (``mqa_head_trips``) in the tile report.
        for h0 in range(0, H_PAD, BLOCK_H):
            acc += _mqa_heads(k, sign, h0, r, q_ptr, w_ptr, H, stride_wr, D, BLOCK_H, HW_FP8,
                              BF16_DOT_VIA_F32)
    logit = tl.where(bad, float("nan"), acc * abs_scale)
    tl.store(out_ptr + r * stride_or + col0 + n, logit, mask=nmask)


@triton.jit
def _mqa_fill(f, n_fill, n_all, col0_all, row0, width, out_ptr, stride_or,
              BLOCK_B: tl.constexpr, FILL_N: tl.constexpr):
    """RANGES: ``-inf`` at the columns of fill block ``f`` outside its row's keys."""
    b = f // n_fill
    c = (f % n_fill).to(tl.int64) * FILL_N + tl.arange(0, FILL_N)
    sel = tl.arange(0, BLOCK_B) == b
    n_b = tl.sum(tl.where(sel, n_all, 0), axis=0)
    col0 = tl.sum(tl.where(sel, col0_all, 0), axis=0)
    fmask = ((c < col0) | (c >= col0 + n_b)) & (c < width)
    r = (row0 + b).to(tl.int64)
    tl.store(out_ptr + r * stride_or + c, tl.full([FILL_N], float("-inf"), dtype=tl.float32),
             mask=fmask)


@triton.jit
def _row_len(len_ptr, r, R, cap):
    """Keys row ``r`` sees, clamped to ``[0, cap]`` (0 past the last row)."""
    n = tl.load(len_ptr + tl.maximum(tl.minimum(r, R - 1), 0)).to(tl.int64)
    return tl.where(r < R, tl.minimum(tl.maximum(n, 0), cap), 0)


@triton.jit
def _paged_fill(f, n_fill, len_ptr, R, cap, width, out_ptr, stride_or, FILL_N: tl.constexpr):
    """PAGED: ``-inf`` at the columns of fill block ``f`` past its row's length."""
    r = (f // n_fill).to(tl.int64)
    c = (f % n_fill).to(tl.int64) * FILL_N + tl.arange(0, FILL_N)
    n_r = _row_len(len_ptr, r, R, cap)
    tl.store(out_ptr + r * stride_or + c, tl.full([FILL_N], float("-inf"), dtype=tl.float32),
             mask=(c >= n_r) & (c < width))


@triton.jit
def _paged_walk(pid, nprog, meta_ptr, len_ptr, kb_ptr, kf_ptr, table_ptr, q_ptr, w_ptr, out_ptr,
                R, H, cap, limit, next_n, page_units, stride_tb, stride_tp, stride_wr, stride_or,
                D: tl.constexpr, H_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_H: tl.constexpr, PAGE_UNIT: tl.constexpr, HW_FP8: tl.constexpr,
                BF16_DOT_VIA_F32: tl.constexpr,
                ROLL_HEADS: tl.constexpr):
    """PAGED: walk this program's share of the schedule, from ``(row, block)`` at
    ``meta[pid]`` up to (not including) ``meta[pid + 1]``, in order: a block past its row's
    length moves on to the next row. The first share starts at ``(0, 0)`` and the last ends
    at ``(R, 0)`` whatever the metadata says, so any non-decreasing schedule covers every
    block exactly once (a schedule for other lengths only costs balance)."""
    r = tl.load(meta_ptr + 2 * pid).to(tl.int64)
    j = tl.load(meta_ptr + 2 * pid + 1).to(tl.int64)
    r_end = tl.load(meta_ptr + 2 * pid + 2).to(tl.int64)
    j_end = tl.load(meta_ptr + 2 * pid + 3).to(tl.int64)
    r = tl.where(pid == 0, 0, tl.minimum(tl.maximum(r, 0), R))
    j = tl.where(pid == 0, 0, tl.maximum(j, 0))
    last = pid == nprog - 1
    r_end = tl.where(last, R, tl.minimum(tl.maximum(r_end, 0), R))
    j_end = tl.where(last, 0, j_end)
    while (r < r_end) | ((r == r_end) & (j < j_end)):
        n_r = _row_len(len_ptr, r, R, cap)
        here = j * BLOCK_N < n_r
        if here:
            _mqa_tile_at(r, j * BLOCK_N, n_r, 0, 0, kb_ptr, kf_ptr, table_ptr, q_ptr, w_ptr,
                         out_ptr, H, limit, next_n, page_units, stride_tb, stride_tp, stride_wr,
                         stride_or, D, H_PAD, BLOCK_N, BLOCK_H, PAGE_UNIT, True, HW_FP8,
                         BF16_DOT_VIA_F32, ROLL_HEADS)
        j = tl.where(here, j + 1, 0)
        r = tl.where(here, r, r + 1)


@triton.jit
def mqa_logits_kernel(
    kb_ptr, kf_ptr,  # uint8 / float32 views: the pool (PAGED) or fp8 rows / scales (RANGES)
    table_ptr,  # PAGED: block_table [B, max_pages]; RANGES: unused
    lo_ptr, hi_ptr,  # PAGED: lengths [R] (hi unused); RANGES: ks [R], ke [R]
    meta_ptr,  # PAGED: the schedule, int32 [num_programs + 1, 2]; RANGES: unused
    q_ptr,  # uint8 e4m3 bytes [R, H, D]
    w_ptr, out_ptr,  # float32 weights [R, H] (row stride stride_wr), logits [R, width]
    R, row0, H, width, limit, max_pages, next_n, page_units,
    stride_tb, stride_tp, stride_wr, stride_or,
    D: tl.constexpr, H_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_B: tl.constexpr, FILL_N: tl.constexpr, PAGE_UNIT: tl.constexpr,
    PAGED: tl.constexpr, ABSOLUTE: tl.constexpr, FILL: tl.constexpr, HW_FP8: tl.constexpr,
    BF16_DOT_VIA_F32: tl.constexpr, WHILE_LOOP: tl.constexpr,
    ROLL_HEADS: tl.constexpr,  # a runtime head loop (see _mqa_tile_at)
):
    """PAGED: all ``R`` rows in one launch, one program per schedule share. RANGES: rows
    ``row0 .. row0 + R - 1`` (at most ``MAX_ROWS``). ``limit``: pages in the pool (PAGED) or
    keys N (RANGES)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    stride_tb = tl.cast(stride_tb, tl.int64)
    stride_tp = tl.cast(stride_tp, tl.int64)
    stride_wr = tl.cast(stride_wr, tl.int64)
    stride_or = tl.cast(stride_or, tl.int64)
    page_units = tl.cast(page_units, tl.int64)
    limit = tl.cast(limit, tl.int64)
    n_fill = tl.cdiv(width, FILL_N)
    if PAGED:
        R64 = tl.cast(R, tl.int64)
        cap = tl.minimum(tl.cast(width, tl.int64), tl.cast(max_pages, tl.int64) * _PAGE_CHUNKS)
        _paged_walk(pid, nprog, meta_ptr, lo_ptr, kb_ptr, kf_ptr, table_ptr, q_ptr, w_ptr,
                    out_ptr, R64, H, cap, limit, next_n, page_units, stride_tb, stride_tp,
                    stride_wr, stride_or, D, H_PAD, BLOCK_N, BLOCK_H, PAGE_UNIT, HW_FP8,
                    BF16_DOT_VIA_F32, ROLL_HEADS)
        if FILL:
            if WHILE_LOOP:
                f = pid
                while f < R * n_fill:
                    _paged_fill(f, n_fill, lo_ptr, R64, cap, width, out_ptr, stride_or, FILL_N)
                    f += nprog
            else:
                for f in range(pid, R * n_fill, nprog):
                    _paged_fill(f, n_fill, lo_ptr, R64, cap, width, out_ptr, stride_or, FILL_N)
    else:
        n_all, start_all, col0_all, first_all, cum, total = _mqa_rows(
            lo_ptr, hi_ptr, row0, R, limit, width, BLOCK_B, BLOCK_N, ABSOLUTE)
        if WHILE_LOOP:
            t = pid
            while t < total:
                _mqa_tile(t, kb_ptr, kf_ptr, table_ptr, q_ptr, w_ptr, out_ptr, n_all, start_all,
                          col0_all, first_all, cum, row0, H, limit, stride_wr, stride_or, D,
                          H_PAD, BLOCK_N, BLOCK_H, BLOCK_B, HW_FP8, BF16_DOT_VIA_F32, ROLL_HEADS)
                t += nprog
            if FILL:
                f = pid
                while f < R * n_fill:
                    _mqa_fill(f, n_fill, n_all, col0_all, row0, width, out_ptr, stride_or,
                              BLOCK_B, FILL_N)
                    f += nprog
        else:
            for t in range(pid, total, nprog):
                _mqa_tile(t, kb_ptr, kf_ptr, table_ptr, q_ptr, w_ptr, out_ptr, n_all, start_all,
                          col0_all, first_all, cum, row0, H, limit, stride_wr, stride_or, D,
                          H_PAD, BLOCK_N, BLOCK_H, BLOCK_B, HW_FP8, BF16_DOT_VIA_F32, ROLL_HEADS)
            if FILL:
                for f in range(pid, R * n_fill, nprog):
                    _mqa_fill(f, n_fill, n_all, col0_all, row0, width, out_ptr, stride_or,
                              BLOCK_B, FILL_N)


# --- host side ---------------------------------------------------------------------------------
def mqa_launch_config(width: int, H_pad: int, capability: tuple[int, int] | None,
                      paged: bool = True,
                      triton_version: tuple[int, int] | None = None) -> dict:
    """The batched scorer's fp8 paged configuration (the same tile: one key tile, an e4m3 dot
    per head block, a register reduction); paged walks the schedule in 64-key blocks (one
    page: the schedule's unit)."""
    cfg = batched_launch_config(width, H_pad, "fp8", capability, paged=True,
                                triton_version=triton_version)
    if paged:
        cfg["BLOCK_N"] = C.PAGE_CHUNKS
    # The interpreter rolls (the less trivial control flow is the one the CPU tests run).
    cfg["ROLL_HEADS"] = capability is None
    if capability is not None and capability < _device.HW_FP8_CAPABILITY:
        sm80 = configs.pick(configs.MQA_SM80, triton_version)
        cfg["ROLL_HEADS"] = sm80["roll_paged" if paged else "roll_ranges"]
        if not paged:
            cfg["num_warps"] = sm80["ranges_warps"]
    return cfg


def mqa_head_trips(H_pad: int, block_h: int, roll_heads: bool, hw_fp8: bool) -> int:
    """Trips of the runtime head loop inside one key tile (1: the head loop is unrolled)."""
    return H_pad // block_h if roll_heads and not hw_fp8 else 1


def page_unit(stride_bytes: int, base_ptr: int) -> int:
    """16 when every page starts 16-byte aligned (16-byte vector loads), else 4 (words)."""
    return 16 if stride_bytes % 16 == 0 and base_ptr % 16 == 0 else 4


def mqa_logits_launch(q8: torch.Tensor, w: torch.Tensor, kb: torch.Tensor, kf: torch.Tensor, *,
                      width: int, limit: int, paged: bool, absolute: bool, fill: bool,
                      lo: torch.Tensor, hi: torch.Tensor | None = None,
                      table: torch.Tensor | None = None, meta: torch.Tensor | None = None,
                      next_n: int = 1, page_stride: int = C.PAGE_BYTES) -> torch.Tensor:
    """Launch the raw-logits kernel over ``R = q8.shape[0]`` query rows; returns float32
    ``[R, width]``. ``q8`` uint8 ``[R, H, 128]`` (e4m3 bytes, contiguous), ``w`` float32
    ``[R, H]`` (unit column stride), ``kb``/``kf`` uint8/float32 views of the keys (the pool
    from its first byte, or fp8 rows and scales), ``lo``/``hi`` int32 per-row lengths (paged)
    or ``ks``/``ke``. Paged: ``table [B, max_pages]``, ``next_n`` rows per table row, the page
    stride in bytes (a multiple of 4) and the schedule ``meta [programs + 1, 2]``: one launch
    of ``programs`` programs. Ranges: one launch per ``MAX_ROWS`` rows. Inputs are validated
    by the caller."""
    R, H, D = q8.shape
    device = q8.device
    out = alloc_output((R, width), torch.float32, device)
    if R == 0 or width == 0:
        return out
    H_pad = max(16, triton.next_power_of_2(H))
    cfg = mqa_launch_config(width, H_pad, _device.capability(device), paged)
    common = dict(D=D, H_PAD=H_pad, FILL_N=FILL_N, PAGED=paged, ABSOLUTE=absolute, FILL=fill,
                  HW_FP8=_device.has_hw_fp8(device), BF16_DOT_VIA_F32=device.type != "cuda",
                  WHILE_LOOP=device.type != "cuda", **cfg)
    if paged:
        unit = page_unit(page_stride, kb.data_ptr())
        mqa_logits_kernel[(meta.shape[0] - 1,)](
            kb, kf, table, lo, lo, meta, q8, w, out,
            R, 0, H, width, limit, table.shape[1], next_n, page_stride // unit,
            table.stride(0), table.stride(1), w.stride(0), out.stride(0),
            BLOCK_B=16, PAGE_UNIT=unit, **common)
        return out
    for row0 in range(0, R, MAX_ROWS):
        nb = min(MAX_ROWS, R - row0)
        items = nb * triton.cdiv(width, cfg["BLOCK_N"])
        mqa_logits_kernel[(_num_programs(device, items),)](
            kb, kf, lo, lo, hi, lo, q8, w, out,
            nb, row0, H, width, limit, 0, 1, 0, 0, 0, w.stride(0), out.stride(0),
            BLOCK_B=max(16, triton.next_power_of_2(nb)), PAGE_UNIT=16, **common)
    return out
