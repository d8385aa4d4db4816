"""One launch for a whole serving batch: paged split-format pools and variable-length rows.

The row-format scorer (:mod:`.score`) takes a dense ``[B, N, 132]`` batch, so a batch of
requests with different history lengths either pads every row to the longest or launches once
per request. This kernel scores every layer of every request in ONE launch, reading keys
where a serving engine keeps them:

``PAGED``
    The paged split format (design §4): pages of 64 chunks, each ``[64 x 128 e4m3 bytes]
    [64 x 4-byte float32 scales]`` (8448 bytes, one page every ``page_stride`` bytes: a
    multiple of 16, 8448 when contiguous, an engine's padded stride otherwise); request
    ``b``'s chunk ``n`` lives in page ``page_table[b, n // 64]`` at slot ``n % 64`` and the
    request has ``n_chunks[b]`` chunks.
``VARLEN``
    Row-format chunks (132 bytes each) packed back to back; request ``b`` owns rows
    ``cu_chunks[b] .. cu_chunks[b + 1] - 1``.

Keys are one buffer for every layer (the release's layout: each tile is read once for all
layers) or one buffer per layer (serving). Per-layer buffers need not be one tensor: the
kernel reads layer ``l`` at ``base + layer_offsets[l] * LAYER_UNIT`` bytes (see
``flashmemory_triton.paged.KeyBuffers``), where
``layer_offsets`` (int64, on the device) holds each buffer's address relative to the first
one, so an engine's separately allocated per-layer pools are read in place.

Work list and balance: a program owns a TILE, ``BLOCK_N`` consecutive chunks of one request
(all tiles cost the same). Every program loads the ``B`` lengths (``B <= MAX_ROWS = 128``
per launch; the launcher splits bigger batches), derives the tiles per request and their
inclusive prefix sum in registers, and walks the global tile list ``t = pid, pid + P, ...``
(a persistent grid of ``P`` programs, about two per SM), mapping each ``t`` to its request by
counting prefix sums ``<= t``. A 1M-token request among short ones is therefore spread over
every SM instead of serializing the launch, no program is launched for padding, and nothing
is computed on the host (no sync: the launch can be captured in a CUDA graph; the
host-side value checks of ``flashmemory_triton.paged`` are skipped under capture).

Output: padded ``scores [B, max_chunks]`` and optionally ``logits [L, B, max_chunks]``. Past a
request's length the kernel writes the fill: score ``0`` and logit ``-inf``
(``sigmoid(-inf) = 0``). After the tile loop, each program also walks ``FILL_N``-chunk fill
blocks, storing the fill where ``n >= n_chunks[b]``; the two loops partition every output
element, so nothing is left unwritten (the NaN-poisoned test outputs prove it).

Addressing is int64 throughout: page ids, rows and layer offsets are widened before any
multiplication (a pool of 16 M chunks is over 2**31 bytes). Out-of-range page ids or rows
(only possible when the caller skipped host validation, e.g. under CUDA-graph capture) are
never dereferenced: those chunks score NaN. Lengths are clamped to ``[0, max_chunks]`` (and,
paged, to the table's ``64 * max_pages``) so no store or table read leaves its tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashmemory_triton import constants as C
from flashmemory_triton.paged import PAGED_LAYER_UNIT, VARLEN_LAYER_UNIT, KeyBuffers  # noqa: F401
from flashmemory_triton.utils import _device

from . import configs
from ._alloc import alloc_output
from .score import _ensemble_init, _layer_into_ensemble, _load_key_tile_at, launch_config

_PAGE_CHUNKS = tl.constexpr(C.PAGE_CHUNKS)
_ROW_WORDS = tl.constexpr(C.CHUNK_BYTES // 4)

# Requests per launch: the per-request vectors live in registers; up to 128 every GPU default
# compiles spill-free (1024 spills with per-layer pools). Bigger batches take several launches.
MAX_ROWS = 128
FILL_N = 1024  # chunks per fill block
PROGRAMS_PER_SM = 2
INTERPRETER_PROGRAMS = 3  # several, so the round-robin tile walk is exercised off the GPU


@triton.jit
def _row_table(len_ptr, B, max_chunks, max_pages,
               BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr):
    """Per-request vectors ``[BLOCK_B]``: chunks (clamped), first row (varlen), tiles, the
    exclusive tile prefix sum, the inclusive one, and the total number of tiles."""
    rows = tl.arange(0, BLOCK_B)
    rmask = rows < B
    if PAGED:
        n_all = tl.load(len_ptr + rows, mask=rmask, other=0).to(tl.int64)
        # (zeros + int: a runtime int may arrive as a compile-time constant, e.g. 1)
        n_all = tl.minimum(n_all, (tl.zeros([BLOCK_B], dtype=tl.int64) + max_pages) * _PAGE_CHUNKS)
        start_all = tl.zeros([BLOCK_B], dtype=tl.int64)
    else:
        lo = tl.load(len_ptr + rows, mask=rmask, other=0).to(tl.int64)
        hi = tl.load(len_ptr + rows + 1, mask=rmask, other=0).to(tl.int64)
        n_all = hi - lo
        start_all = lo
    n_all = tl.minimum(tl.maximum(n_all, 0), tl.zeros([BLOCK_B], dtype=tl.int64) + max_chunks)
    tiles = ((n_all + BLOCK_N - 1) // BLOCK_N).to(tl.int32)
    cum = tl.cumsum(tiles, axis=0)
    return n_all, start_all, cum - tiles, cum, tl.sum(tiles, axis=0)


@triton.jit
def _score_tile(t, kb_ptr, kf_ptr, layer_off_ptr, table_ptr, q_ptr, w_ptr, scores_ptr,
                logits_ptr, n_all, start_all, first_all, cum,
                B_q, row0, H, limit, page_units, stride_tb, stride_tp, stride_sb, stride_ll,
                stride_lb, logit_offset,
                L: tl.constexpr, D: tl.constexpr, H_PAD: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_B: tl.constexpr,
                LAYER_UNIT: tl.constexpr, PAGED: tl.constexpr, PRECISION: tl.constexpr,
                HW_FP8: tl.constexpr, SHARED_KEYS: tl.constexpr, ENSEMBLE_MEAN: tl.constexpr,
                WRITE_LOGITS: tl.constexpr, BF16_DOT_VIA_F32: tl.constexpr):
    rows = tl.arange(0, BLOCK_B)
    b = tl.sum((cum <= t).to(tl.int32), axis=0)  # requests whose tiles all come before t
    sel = rows == b
    first = tl.sum(tl.where(sel, first_all, 0), axis=0)
    n_b = tl.sum(tl.where(sel, n_all, 0), axis=0)
    n = (t - first).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < n_b
    if PAGED:
        slot = n // _PAGE_CHUNKS
        page = tl.load(table_ptr + b.to(tl.int64) * stride_tb + slot * stride_tp,
                       mask=nmask, other=0).to(tl.int64)
        valid = (page >= 0) & (page < limit)
        page = tl.where(valid, page, 0)
        within = n - slot * _PAGE_CHUNKS
        # fp8 block at page * page_stride + within * 128 bytes (page_units: the page stride in
        # 16-byte units, 528 for contiguous pages): written in 16-byte units so the compiler
        # can prove 16-byte alignment; scales after the 64 * 128 fp8 bytes.
        key_bytes = (page * page_units + within * (D // 16)) * 16
        scale_words = page * (page_units * 4) + within + (_PAGE_CHUNKS * D) // 4
    else:
        start = tl.sum(tl.where(sel, start_all, 0), axis=0)
        r = start + n
        valid = (r >= 0) & (r < limit)
        r = tl.where(valid, r, 0)
        key_bytes = (r * _ROW_WORDS) * 4
        scale_words = r * _ROW_WORDS + D // 4
    lmask = nmask & valid
    gb = (row0 + b).to(tl.int64)  # the request's row in q, w and the outputs

    ens = _ensemble_init(BLOCK_N, ENSEMBLE_MEAN)
    if SHARED_KEYS:
        # One tile, every layer (unrolled: the tile stays in registers across layers).
        k, abs_scale, sign, bad = _load_key_tile_at(kb_ptr, kf_ptr, key_bytes, scale_words,
                                                    lmask, D, PRECISION, HW_FP8)
        bad = bad | (~valid)
        for l in tl.static_range(L):
            ens = _layer_into_ensemble(ens, k, abs_scale, sign, bad, q_ptr, w_ptr, l * B_q + gb,
                                       H, logit_offset,
                                       logits_ptr + l * stride_ll + gb * stride_lb + n, nmask,
                                       D, H_PAD, BLOCK_N, BLOCK_H, PRECISION, HW_FP8,
                                       BF16_DOT_VIA_F32, ENSEMBLE_MEAN, WRITE_LOGITS)
    else:
        # One tile per layer, a runtime loop (as the row-format scorer: unrolled, the
        # compiler issues every layer's tile up front and spills).
        for l in range(L):
            off = tl.load(layer_off_ptr + l).to(tl.int64)
            k, abs_scale, sign, bad = _load_key_tile_at(
                kb_ptr, kf_ptr, key_bytes + off * LAYER_UNIT,
                scale_words + off * (LAYER_UNIT // 4), lmask, D, PRECISION, HW_FP8)
            bad = bad | (~valid)
            ens = _layer_into_ensemble(ens, k, abs_scale, sign, bad, q_ptr, w_ptr, l * B_q + gb,
                                       H, logit_offset,
                                       logits_ptr + l * stride_ll + gb * stride_lb + n, nmask,
                                       D, H_PAD, BLOCK_N, BLOCK_H, PRECISION, HW_FP8,
                                       BF16_DOT_VIA_F32, ENSEMBLE_MEAN, WRITE_LOGITS)
    if ENSEMBLE_MEAN:
        ens = ens / L
    tl.store(scores_ptr + gb * stride_sb + n, ens, mask=nmask)


@triton.jit
def _fill_block(f, n_fill, n_all, row0, max_chunks, scores_ptr, logits_ptr,
                stride_sb, stride_ll, stride_lb,
                L: tl.constexpr, BLOCK_B: tl.constexpr, FILL_N: tl.constexpr,
                WRITE_LOGITS: tl.constexpr):
    """Write the padding of fill block ``f``: score 0, logit -inf where ``n >= n_chunks[b]``."""
    b = f // n_fill
    c = (f % n_fill).to(tl.int64) * FILL_N + tl.arange(0, FILL_N)
    n_b = tl.sum(tl.where(tl.arange(0, BLOCK_B) == b, n_all, 0), axis=0)
    fmask = (c >= n_b) & (c < max_chunks)
    gb = (row0 + b).to(tl.int64)
    tl.store(scores_ptr + gb * stride_sb + c, tl.zeros([FILL_N], dtype=tl.float32), mask=fmask)
    if WRITE_LOGITS:
        for l in tl.static_range(L):
            tl.store(logits_ptr + l * stride_ll + gb * stride_lb + c,
                     tl.full([FILL_N], float("-inf"), dtype=tl.float32), mask=fmask)


@triton.jit
def batched_score_kernel(
    kb_ptr, kf_ptr,  # uint8 / float32 views of the base key buffer (layer 0's, or the shared one)
    layer_off_ptr,  # int64 [L]: layer l's buffer start - kb_ptr, in LAYER_UNIT bytes (per layer)
    table_ptr,  # PAGED: page_table [B, max_pages] (int32/int64); VARLEN: unused
    len_ptr,  # PAGED: n_chunks [B]; VARLEN: cu_chunks [B + 1]
    q_ptr, w_ptr, scores_ptr, logits_ptr,
    B, B_q, row0, H, max_chunks, limit, max_pages,
    page_units,  # PAGED: page stride in 16-byte units (528: contiguous 8448-byte pages)
    stride_tb, stride_tp,  # page table strides (elements)
    stride_sb, stride_ll, stride_lb,  # output strides (elements)
    logit_offset,
    L: tl.constexpr, D: tl.constexpr, H_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_B: tl.constexpr, FILL_N: tl.constexpr,
    LAYER_UNIT: tl.constexpr, PAGED: tl.constexpr, PRECISION: tl.constexpr,
    HW_FP8: tl.constexpr, SHARED_KEYS: tl.constexpr, ENSEMBLE_MEAN: tl.constexpr,
    WRITE_LOGITS: tl.constexpr, BF16_DOT_VIA_F32: tl.constexpr,
    WHILE_LOOP: tl.constexpr,  # interpreter only: its range() cannot take tensor bounds
):
    """``B`` requests starting at row ``row0`` of a ``B_q``-row batch (q/w rows, output rows);
    ``limit`` is the pool's page count (PAGED) or the key buffer's row count (VARLEN)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    # Output strides in int64 (an int argument may arrive as int32, or as a constant 1).
    stride_sb = tl.cast(stride_sb, tl.int64)
    stride_ll = tl.cast(stride_ll, tl.int64)
    stride_lb = tl.cast(stride_lb, tl.int64)
    stride_tb = tl.cast(stride_tb, tl.int64)
    stride_tp = tl.cast(stride_tp, tl.int64)
    page_units = tl.cast(page_units, tl.int64)
    n_all, start_all, first_all, cum, total = _row_table(len_ptr, B, max_chunks, max_pages,
                                                         BLOCK_B, BLOCK_N, PAGED)
    n_fill = tl.cdiv(max_chunks, FILL_N)
    if WHILE_LOOP:
        t = pid
        while t < total:
            _score_tile(t, kb_ptr, kf_ptr, layer_off_ptr, table_ptr, q_ptr, w_ptr, scores_ptr,
                        logits_ptr, n_all, start_all, first_all, cum, B_q, row0, H, limit,
                        page_units, stride_tb, stride_tp, stride_sb, stride_ll, stride_lb,
                        logit_offset,
                        L, D, H_PAD, BLOCK_N, BLOCK_H, BLOCK_B, LAYER_UNIT, PAGED, PRECISION,
                        HW_FP8, SHARED_KEYS, ENSEMBLE_MEAN, WRITE_LOGITS, BF16_DOT_VIA_F32)
            t += nprog
        f = pid
        while f < B * n_fill:
            _fill_block(f, n_fill, n_all, row0, max_chunks, scores_ptr, logits_ptr,
                        stride_sb, stride_ll, stride_lb, L, BLOCK_B, FILL_N, WRITE_LOGITS)
            f += nprog
    else:
        for t in range(pid, total, nprog):
            _score_tile(t, kb_ptr, kf_ptr, layer_off_ptr, table_ptr, q_ptr, w_ptr, scores_ptr,
                        logits_ptr, n_all, start_all, first_all, cum, B_q, row0, H, limit,
                        page_units, stride_tb, stride_tp, stride_sb, stride_ll, stride_lb,
                        logit_offset,
                        L, D, H_PAD, BLOCK_N, BLOCK_H, BLOCK_B, LAYER_UNIT, PAGED, PRECISION,
                        HW_FP8, SHARED_KEYS, ENSEMBLE_MEAN, WRITE_LOGITS, BF16_DOT_VIA_F32)
        for f in range(pid, B * n_fill, nprog):
            _fill_block(f, n_fill, n_all, row0, max_chunks, scores_ptr, logits_ptr,
                        stride_sb, stride_ll, stride_lb, L, BLOCK_B, FILL_N, WRITE_LOGITS)


# --- host side ---------------------------------------------------------------------------------
def batched_launch_config(max_chunks: int, H_pad: int, precision: str,
                          capability: tuple[int, int] | None, paged: bool = True,
                          shared: bool = True,
                          triton_version: tuple[int, int] | None = None) -> dict:
    """Launch parameters, chosen from the compiled resource usage (every GPU default is
    spill-free: ``python -m flashmemory_triton.kernels.aot``, enforced by
    ``tests/test_compile.py``; the exact fp32 mode excepted, as for the row-format scorer).

    Always ``num_stages=1``: the tile loop is the persistent outer loop, and software-
    pipelining it keeps a second tile's operands in shared memory (400 KB for tf32 on sm_90,
    over the limit) and registers (spills). sm_90: paged bf16/fp8 take 128-chunk tiles, 8 warps
    (16-byte loads of the 128-byte fp8 rows keep the address registers low), 64-head blocks
    (paged bf16: by Triton release and pool layout, ``configs.PAGED_SM90_BF16_BLOCK_H``);
    tf32/fp32 (fp32 key tiles) and varlen rows (4-byte loads of 132-byte rows) take 64-chunk
    tiles, 64-head blocks, 8 warps. Before Hopper: 16-head blocks, 8 warps (4 warps, or
    32-head blocks with 128 requests, spill with per-layer pools on sm_80), 64-chunk tiles
    (by release and pool layout, ``configs.PAGED_SM8X_BLOCK_N``). Interpreter:
    ``score.launch_config``. ``triton_version`` defaults to the installed one."""
    if capability is None:
        return {**launch_config(max_chunks, H_pad, precision, capability), "num_stages": 1}
    layout = "shared" if shared else "per_layer"
    if capability < (9, 0):
        block_n = configs.pick(configs.PAGED_SM8X_BLOCK_N, triton_version)[layout]
        return dict(BLOCK_N=block_n, BLOCK_H=min(H_pad, 16), num_warps=8, num_stages=1)
    if not (paged and precision in ("bf16", "fp8")):
        return dict(BLOCK_N=64, BLOCK_H=min(H_pad, 64), num_warps=8, num_stages=1)
    block_h = 64
    if precision == "bf16":
        block_h = configs.pick(configs.PAGED_SM90_BF16_BLOCK_H, triton_version)[layout]
    return dict(BLOCK_N=128, BLOCK_H=min(H_pad, block_h), num_warps=8, num_stages=1)


def _num_programs(device: torch.device, work_items: int) -> int:
    if device.type != "cuda":
        return max(1, min(work_items, INTERPRETER_PROGRAMS))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(work_items, sms * PROGRAMS_PER_SM))


def batched_score_launch(q: torch.Tensor, w: torch.Tensor, keys: KeyBuffers,
                         lengths: torch.Tensor, page_table: torch.Tensor | None, *,
                         max_chunks: int, precision: str, hw_fp8: bool, ensemble: str = "max",
                         logit_offset: float = 0.0, return_logits: bool = False,
                         kernel: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the batched scorer. ``q [L, B, H, D]``/``w [L, B, H]`` prepared (see
    ``query_prep``); ``lengths``: ``n_chunks [B]`` (paged, with ``page_table [B, max_pages]``)
    or ``cu_chunks [B + 1]`` (varlen, ``page_table=None``), int32/int64 on the keys' device.
    Returns ``scores [B, max_chunks]`` and, if asked, ``logits [L, B, max_chunks]``, filled with
    0 / -inf past each request's length. Inputs are assumed validated by the caller
    (``flashmemory_triton.paged``). ``kernel``: ``"auto"`` (v2, ``kernels.paged_v2``, where
    ``paged_v2.uses_v2``, else v1), ``"v1"`` (this module's kernel, kept for comparison) or
    ``"v2"``."""
    if kernel not in ("auto", "v1", "v2"):
        raise ValueError(f"kernel must be 'auto', 'v1' or 'v2', got {kernel!r}")
    from . import paged_v2
    if kernel == "v2" or (kernel == "auto" and paged_v2.uses_v2(
            keys, page_table is not None, precision, ensemble, return_logits, keys.base.device)):
        return paged_v2.paged_v2_launch(q, w, keys, lengths, page_table, max_chunks=max_chunks,
                                        precision=precision, hw_fp8=hw_fp8, ensemble=ensemble,
                                        logit_offset=logit_offset, return_logits=return_logits)
    L, B, H, D = q.shape
    device = keys.base.device
    scores = alloc_output((B, max_chunks), torch.float32, device)
    logits = alloc_output((L, B, max_chunks), torch.float32, device) if return_logits else None
    if B == 0 or max_chunks == 0:
        return scores, logits
    q = q.contiguous()
    w = w.contiguous().float()
    # The kernel reads the lengths at len_ptr + i (stride 1); a strided view would be read as
    # other values. A no-op when already contiguous, and graph-capture safe.
    lengths = lengths.contiguous()
    kb = keys.base
    kf = kb.view(torch.float32)
    offsets = keys.layer_offsets if keys.layer_offsets is not None else lengths  # unused if shared
    paged = page_table is not None
    table = page_table if paged else lengths  # unused pointer in varlen mode
    stride_tb, stride_tp = (page_table.stride(0), page_table.stride(1)) if paged else (0, 0)
    max_pages = page_table.shape[1] if paged else 0
    H_pad = max(16, triton.next_power_of_2(H))
    cfg = batched_launch_config(max_chunks, H_pad, precision, _device.capability(device), paged,
                                keys.shared)
    logits_arg = logits if logits is not None else scores
    for row0 in range(0, B, MAX_ROWS):
        nb = min(MAX_ROWS, B - row0)
        lens = lengths[row0:row0 + nb + (0 if paged else 1)]
        tab = table[row0:row0 + nb] if paged else table
        items = nb * triton.cdiv(max_chunks, cfg["BLOCK_N"])
        grid = (_num_programs(device, items),)
        batched_score_kernel[grid](
            kb, kf, offsets, tab, lens, q, w, scores, logits_arg,
            nb, B, row0, H, max_chunks, keys.limit, max_pages, keys.page_stride // 16,
            stride_tb, stride_tp, max_chunks, B * max_chunks, max_chunks, float(logit_offset),
            L=L, D=D, H_PAD=H_pad, BLOCK_B=max(16, triton.next_power_of_2(nb)), FILL_N=FILL_N,
            LAYER_UNIT=PAGED_LAYER_UNIT if paged else VARLEN_LAYER_UNIT, PAGED=paged,
            PRECISION=precision, HW_FP8=bool(hw_fp8), SHARED_KEYS=keys.shared,
            ENSEMBLE_MEAN=ensemble == "mean", WRITE_LOGITS=return_logits,
            # Triton 3.6's interpreter runs np.matmul on the uint16 storage of bf16 operands,
            # and its range() cannot take tensor bounds; both switches only apply off the GPU.
            BF16_DOT_VIA_F32=device.type != "cuda", WHILE_LOOP=device.type != "cuda",
            **cfg)
    return scores, logits
