"""Paged (and varlen) scorer v2: a persistent walk of each request's pages in order, whose steady
state is key loads, tensor-core dots and the ReLU-weighted head sum (design §12).

Same function, output and fill as ``paged.batched_score_kernel`` (v1, kept for comparison as a
bench provider and for everything v2 does not serve) on the paged split format with ONE pool
for every layer, in bf16/fp8. What changes is how a program finds its work and what runs per
tile (a tile is one 64-chunk page):

* **A contiguous slice of the global tile list per program**: program ``p`` of ``P`` scores
  tiles ``[p T / P, (p + 1) T / P)`` of the ``T`` tiles of the launch (the requests' pages in
  order), so the load stays balanced however unequal the requests are. The request holding
  the slice's first tile is found ONCE per program (the lengths' prefix sum, in registers);
  from there the program walks request by request (an incremental walk: scalar loads of each
  request's length), with no per-tile search for the request.
* **q and w of a request loaded once** (``dense._prepare_q``: every layer, converted to e4m3
  once in fp8 mode), before the walk of its pages; a program loads q for at most the requests
  its slice overlaps (``P + B`` request loads a launch in all).
* **Page ids and keys a tile ahead**: the loop loads the keys of tile ``j + 1`` (through the
  page id read one iteration before) and the page id of tile ``j + 2`` before scoring tile
  ``j``; the prefetch indices are clamped into the request's own pages, so no table entry or
  page outside the request is read.
* **Full pages without masks**: every page of the pool is whole, so even a request's partial
  last page is loaded unmasked; only its stores are masked (``n < n_chunks``), and it is
  scored after the loop from the registers the prefetch already filled.
* The tile operand, the sign fold into the e4m3 sign bit, the NaN-word test and the epilogue
  are dense v2's (``dense._tile_operand`` / ``dense._score_tile``): pages hold the same bytes as
  rows, 128 e4m3 bytes and a float32 scale per chunk, only laid out split.

Varlen rows (``PAGED=False``: one shared buffer of 132-byte rows, request ``b`` owning rows
``cu_chunks[b] .. cu_chunks[b + 1] - 1``) take the same walk: tiles wholly inside the request
and the buffer unmasked (4-byte words, dense v2's ``_load_tile``), the partial last tile and
rows past the buffer (only without host validation: NaN, never read) masked after the loop.

Non-finite inputs: as v1 and dense v2 (a NaN byte or a non-finite or overflowing scale makes
the chunk's logits NaN in every layer). A page id outside the pool (possible only when host
validation was skipped, under CUDA-graph capture) is never dereferenced: page 0 is read in its
place (the launcher only runs v2 on a pool of at least one page) and its chunks score NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashmemory_triton import constants as C
from flashmemory_triton.utils import _device

from . import configs
from ._alloc import alloc_output
from .dense import _load_tile, _prepare_q, _score_tile
from .numerics import bf16_asm_enabled

_PAGE_CHUNKS = tl.constexpr(C.PAGE_CHUNKS)

PRECISIONS = ("bf16", "fp8")  # v2's modes; tf32/fp32 (fp32 key tiles) stay on v1
MAX_ROWS = 128  # requests per launch (the lengths' prefix sum lives in registers), as v1
FILL_N = 1024  # chunks per fill block
CTAS_PER_SM = 1  # from the compile report: the v2 tile at 8 warps holds one CTA per SM
INTERPRETER_PROGRAMS = 3  # several, so the slices and the request walk are exercised off the GPU


@triton.jit
def _clamp_len(n, cap):
    """A request's chunk count as the kernel uses it: in ``[0, cap]`` (``cap``: the output width
    and the table's ``64 * max_pages``, the smaller)."""
    return tl.minimum(tl.maximum(n.to(tl.int64), 0), cap)


@triton.jit
def _page_of(trow_ptr, j, limit):
    """Page id of the request's tile ``j`` and whether it is inside the pool; outside, page 0
    (never dereferenced as the request's: its chunks get a NaN scale). int32 once checked
    (``limit`` is), so the page's word offset is one 32 x 32 -> 64-bit multiply."""
    page = tl.load(trow_ptr + j.to(tl.int64))  # table rows are contiguous (the launcher)
    valid = (page >= 0) & (page < limit)
    return tl.where(valid, page, 0).to(tl.int32), valid


@triton.jit
def _load_page(kw_ptr, kf_ptr, page, valid, page_words, rows, D: tl.constexpr):
    """A page's key bytes as int32 words ``[64, D / 4]`` and its 64 scales (NaN for a page id
    outside the pool), unmasked: every page of the pool is whole. ``page_words``: the page
    stride in 4-byte words (int32), a multiple of 4, so 16-byte alignment is provable (vector
    loads)."""
    base = page.to(tl.int64) * page_words
    cols = tl.arange(0, D // 4)
    kw = tl.load(kw_ptr + base + (rows * (D // 4))[:, None] + cols[None, :])
    scale = tl.load(kf_ptr + base + (_PAGE_CHUNKS * D // 4) + rows)
    scale = tl.where(valid, scale, float("nan"))
    return kw, scale


@triton.jit
def _varlen_walk(kw_ptr, kf_ptr, start_b, n_b, lo, hi, full, limit, rows, every, qts, ws,
                 logit_offset, out_base, scores_ptr, logits_ptr, lstride,
                 L: tl.constexpr, D: tl.constexpr, H_PAD: tl.constexpr,
                 PRECISION: tl.constexpr, HW_FP8: tl.constexpr, ENSEMBLE_MEAN: tl.constexpr,
                 WRITE_LOGITS: tl.constexpr, BF16_DOT_VIA_F32: tl.constexpr,
                 PREFETCH: tl.constexpr, BF16_ASM: tl.constexpr):
    """Varlen rows: tiles ``lo .. hi - 1`` of the request whose rows start at ``start_b``
    (132-byte rows, 4-byte words). Tiles wholly inside the request and the buffer (``< full``,
    cut at ``limit`` rows) run unmasked with the next tile prefetched; the rest (the partial
    last tile, and rows past the buffer, possible only without host validation: never read,
    NaN) masked after the loop."""
    ROW_WORDS: tl.constexpr = C.CHUNK_BYTES // 4
    # full tiles whose rows all lie in [0, limit)
    inside = tl.where(start_b >= 0, (limit - start_b) // _PAGE_CHUNKS, 0)
    full = tl.minimum(full, tl.maximum(inside, 0).to(tl.int32))
    j = lo
    if PREFETCH:
        r0 = start_b + lo.to(tl.int64) * _PAGE_CHUNKS
        # prologue: tile lo, masked (nothing is read unless it is a full tile inside the buffer)
        kw, scale = _load_tile(kw_ptr + r0 * ROW_WORDS, kf_ptr + r0 * ROW_WORDS, ROW_WORDS,
                               rows, rows < tl.where(lo < full, _PAGE_CHUNKS, 0), D, True)
        while j < full:
            rn = start_b + tl.minimum(j + 1, full - 1).to(tl.int64) * _PAGE_CHUNKS
            kw_next, scale_next = _load_tile(kw_ptr + rn * ROW_WORDS, kf_ptr + rn * ROW_WORDS,
                                             ROW_WORDS, rows, every, D, False)
            _score_tile(kw, scale, qts, ws, logit_offset,
                        out_base + j.to(tl.int64) * _PAGE_CHUNKS, every, scores_ptr,
                        logits_ptr, lstride, L, D, H_PAD, _PAGE_CHUNKS, PRECISION, HW_FP8,
                        ENSEMBLE_MEAN, WRITE_LOGITS, BF16_DOT_VIA_F32, False,
                        BF16_ASM)
            kw = kw_next
            scale = scale_next
            j += 1
    else:
        while j < full:
            r0 = start_b + j.to(tl.int64) * _PAGE_CHUNKS
            kw, scale = _load_tile(kw_ptr + r0 * ROW_WORDS, kf_ptr + r0 * ROW_WORDS, ROW_WORDS,
                                   rows, every, D, False)
            _score_tile(kw, scale, qts, ws, logit_offset,
                        out_base + j.to(tl.int64) * _PAGE_CHUNKS, every, scores_ptr,
                        logits_ptr, lstride, L, D, H_PAD, _PAGE_CHUNKS, PRECISION, HW_FP8,
                        ENSEMBLE_MEAN, WRITE_LOGITS, BF16_DOT_VIA_F32, False,
                        BF16_ASM)
            j += 1
    while j < hi:
        n = j.to(tl.int64) * _PAGE_CHUNKS
        r = start_b + n + rows
        inbuf = (r >= 0) & (r < limit)
        nmask = rows < n_b - n
        kw, scale = _load_tile(kw_ptr + (start_b + n) * ROW_WORDS,
                               kf_ptr + (start_b + n) * ROW_WORDS, ROW_WORDS, rows,
                               nmask & inbuf, D, True)
        scale = tl.where(inbuf, scale, float("nan"))  # rows past the buffer: NaN, never read
        _score_tile(kw, scale, qts, ws, logit_offset, out_base + n, nmask, scores_ptr,
                    logits_ptr, lstride, L, D, H_PAD, _PAGE_CHUNKS, PRECISION, HW_FP8,
                    ENSEMBLE_MEAN, WRITE_LOGITS, BF16_DOT_VIA_F32, True, BF16_ASM)
        j += 1


@triton.jit
def paged_v2_kernel(
    kw_ptr, kf_ptr,  # int32 / float32 views of the shared pool
    table_ptr,  # page_table [B, max_pages] (int32/int64)
    len_ptr,  # n_chunks [B]
    q_ptr, w_ptr, scores_ptr, logits_ptr,
    B, B_q, row0, max_chunks, limit, max_pages,
    page_units,  # page stride in 16-byte units (528: contiguous 8448-byte pages)
    stride_tb,  # page table row stride (elements; its rows are contiguous)
    logit_offset,
    L: tl.constexpr, D: tl.constexpr, H_PAD: tl.constexpr, BLOCK_B: tl.constexpr,
    FILL_N: tl.constexpr, PRECISION: tl.constexpr, HW_FP8: tl.constexpr,
    ENSEMBLE_MEAN: tl.constexpr, WRITE_LOGITS: tl.constexpr,
    BF16_DOT_VIA_F32: tl.constexpr,  # interpreter only: its bf16 dot multiplies raw bits
    PREFETCH: tl.constexpr = True,  # load the next page's keys before scoring this one
    BF16_ASM: tl.constexpr = False,  # sm_90: dense v2's PTX e4m3 -> bf16 decoder
    PAGED: tl.constexpr = True,  # False: varlen rows (len_ptr: cu_chunks [B + 1]; no table)
):
    """``B`` requests starting at row ``row0`` of a ``B_q``-row batch (q ``[L, B_q, H_PAD, D]``
    and w ``[L, B_q, H_PAD]``, padded heads zero; outputs ``[B_q, max_chunks]``, logits
    ``[L, B_q, max_chunks]``); ``limit``: the pool's pages (PAGED) or the buffer's rows."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    stride_tb = tl.cast(stride_tb, tl.int64)
    page_words = page_units * 4  # int32: a page stride under 2**31 bytes
    # (zeros + int: a runtime int may arrive as a compile-time constant, e.g. 1)
    if PAGED:
        cap = tl.minimum(tl.zeros([], dtype=tl.int64) + max_chunks,
                         (tl.zeros([], dtype=tl.int64) + max_pages) * _PAGE_CHUNKS)
    else:
        cap = tl.zeros([], dtype=tl.int64) + max_chunks
    row_out = tl.cast(max_chunks, tl.int64)  # output row stride
    lstride = tl.cast(B_q, tl.int64) * row_out  # logits layer stride

    # Once per program: the launch's tiles, this program's slice [start, end), the request
    # holding its first tile and the tiles before that request.
    reqs = tl.arange(0, BLOCK_B)
    if PAGED:
        n_all = _clamp_len(tl.load(len_ptr + reqs, mask=reqs < B, other=0), cap)
    else:
        n_all = _clamp_len(tl.load(len_ptr + reqs + 1, mask=reqs < B, other=0).to(tl.int64)
                           - tl.load(len_ptr + reqs, mask=reqs < B, other=0), cap)
    tiles = (n_all + _PAGE_CHUNKS - 1) // _PAGE_CHUNKS
    cum = tl.cumsum(tiles, axis=0)
    total = tl.sum(tiles, axis=0)
    start = pid.to(tl.int64) * total // nprog
    end = (pid.to(tl.int64) + 1) * total // nprog
    b = tl.sum((cum <= start).to(tl.int32), axis=0)  # requests wholly before the slice
    first = tl.sum(tl.where(reqs < b, tiles, 0), axis=0)  # their tiles

    rows = tl.arange(0, _PAGE_CHUNKS)
    every = rows < _PAGE_CHUNKS  # the unused mask of full pages
    # The walk: request after request until the slice ends (first < end implies b < B).
    while first < end:
        if PAGED:
            n_b = _clamp_len(tl.load(len_ptr + b), cap)
        else:
            start_b = tl.load(len_ptr + b).to(tl.int64)  # the request's first row
            n_b = _clamp_len(tl.load(len_ptr + b + 1).to(tl.int64) - start_b, cap)
        tiles_b = (n_b + _PAGE_CHUNKS - 1) // _PAGE_CHUNKS
        lo = tl.maximum(start - first, 0).to(tl.int32)
        hi = tl.minimum(end - first, tiles_b).to(tl.int32)
        if lo < hi:
            gb = (row0 + b).to(tl.int64)  # the request's row in q, w and the outputs
            qts = ()
            ws = ()
            for l in tl.static_range(L):
                # heads padded on the host: no masks, 16-byte aligned rows of w
                qt, w = _prepare_q(q_ptr, w_ptr, l * B_q + gb, H_PAD, D, H_PAD, PRECISION,
                                   HW_FP8, BF16_DOT_VIA_F32)
                qts = qts + (qt,)
                ws = ws + (w,)
            full = tl.minimum(hi, (n_b // _PAGE_CHUNKS).to(tl.int32))  # full pages end here
            out_base = gb * row_out + rows  # output offsets of the request's first page
            j = lo
            trow = table_ptr + b.to(tl.int64) * stride_tb
            if not PAGED:
                _varlen_walk(kw_ptr, kf_ptr, start_b, n_b, lo, hi, full, limit, rows, every,
                             qts, ws, logit_offset, out_base, scores_ptr, logits_ptr, lstride,
                             L, D, H_PAD, PRECISION, HW_FP8, ENSEMBLE_MEAN, WRITE_LOGITS,
                             BF16_DOT_VIA_F32, PREFETCH, BF16_ASM)
            elif PREFETCH:
                page, valid = _page_of(trow, lo, limit)
                kw, scale = _load_page(kw_ptr, kf_ptr, page, valid, page_words, rows, D)
                page, valid = _page_of(trow, tl.minimum(lo + 1, hi - 1), limit)
                while j < full:
                    # tile j + 1's keys (its page id read last iteration), tile j + 2's page id
                    kw_next, scale_next = _load_page(kw_ptr, kf_ptr, page, valid, page_words,
                                                     rows, D)
                    page, valid = _page_of(trow, tl.minimum(j + 2, hi - 1), limit)
                    _score_tile(kw, scale, qts, ws, logit_offset,
                                out_base + j.to(tl.int64) * _PAGE_CHUNKS, every, scores_ptr,
                                logits_ptr, lstride, L, D, H_PAD, _PAGE_CHUNKS, PRECISION,
                                HW_FP8, ENSEMBLE_MEAN, WRITE_LOGITS, BF16_DOT_VIA_F32, False,
                                BF16_ASM)
                    kw = kw_next
                    scale = scale_next
                    j += 1
            else:
                while j < full:
                    page, valid = _page_of(trow, j, limit)
                    kw, scale = _load_page(kw_ptr, kf_ptr, page, valid, page_words, rows, D)
                    _score_tile(kw, scale, qts, ws, logit_offset,
                                out_base + j.to(tl.int64) * _PAGE_CHUNKS, every, scores_ptr,
                                logits_ptr, lstride, L, D, H_PAD, _PAGE_CHUNKS, PRECISION,
                                HW_FP8, ENSEMBLE_MEAN, WRITE_LOGITS, BF16_DOT_VIA_F32, False,
                                BF16_ASM)
                    j += 1
                page, valid = _page_of(trow, tl.minimum(j, hi - 1), limit)
                kw, scale = _load_page(kw_ptr, kf_ptr, page, valid, page_words, rows, D)
            if PAGED:
                if j < hi:
                    # the request's partial last page (j = tiles_b - 1): its keys are in registers
                    # already; only the stores are masked
                    n = j.to(tl.int64) * _PAGE_CHUNKS
                    _score_tile(kw, scale, qts, ws, logit_offset, out_base + n, rows < n_b - n,
                                scores_ptr, logits_ptr, lstride, L, D, H_PAD, _PAGE_CHUNKS,
                                PRECISION, HW_FP8, ENSEMBLE_MEAN, WRITE_LOGITS, BF16_DOT_VIA_F32,
                                True, BF16_ASM)
        first += tiles_b
        b += 1

    # Padding: score 0, logit -inf past each request's length, in FILL_N-chunk blocks dealt
    # round-robin (the tiles and the fill partition the output: every element written once).
    n_fill = tl.cdiv(max_chunks, FILL_N)
    f = pid
    while f < B * n_fill:
        bf = f // n_fill
        c = (f % n_fill).to(tl.int64) * FILL_N + tl.arange(0, FILL_N)
        if PAGED:
            n_f = _clamp_len(tl.load(len_ptr + bf), cap)
        else:
            n_f = _clamp_len(tl.load(len_ptr + bf + 1).to(tl.int64) - tl.load(len_ptr + bf),
                             cap)
        fmask = (c >= n_f) & (c < max_chunks)
        out = (row0 + bf).to(tl.int64) * row_out + c
        tl.store(scores_ptr + out, tl.zeros([FILL_N], dtype=tl.float32), mask=fmask)
        if WRITE_LOGITS:
            for l in tl.static_range(L):
                tl.store(logits_ptr + l * lstride + out,
                         tl.full([FILL_N], float("-inf"), dtype=tl.float32), mask=fmask)
        f += nprog


# --- host side ---------------------------------------------------------------------------------
def paged_v2_launch_config(capability: tuple[int, int] | None, paged: bool = True,
                           precision: str = "bf16", epilogue: str = "max",
                           triton_version: tuple[int, int] | None = None) -> dict:
    """Launch parameters (see ``kernels.aot --report``; spill-free wherever v2 serves,
    ``serves`` and ``tests/test_compile.py``): 8 warps (the two warpgroups split the heads, as
    dense v2), the next tile prefetched (pages always; varlen rows where it fits,
    ``configs.VARLEN_V2_EPILOGUES``). Interpreter: prefetching (the tests run both paths)."""
    if capability is None:
        return dict(num_warps=4, num_stages=1, PREFETCH=True)
    prefetch = True
    if not paged:
        prefetch = configs.pick(configs.VARLEN_V2_EPILOGUES, triton_version)[precision].get(
            epilogue, True)
    return dict(num_warps=8, num_stages=1, PREFETCH=prefetch)


def serves(precision: str, ensemble_mean: bool, write_logits: bool,
           triton_version: tuple[int, int] | None = None, paged: bool = True) -> bool:
    """Whether v2 compiles spill-free for this mode and epilogue on sm_90 with the installed (or
    given) Triton (``configs.PAGED_V2_EPILOGUES``; varlen rows:
    ``configs.VARLEN_V2_EPILOGUES``)."""
    if precision not in PRECISIONS:
        return False
    epilogue = "max" if not (ensemble_mean or write_logits) else "other"
    table = configs.PAGED_V2_EPILOGUES if paged else configs.VARLEN_V2_EPILOGUES
    return epilogue in configs.pick(table, triton_version)[precision]  # (keys of a dict)


def _takes(keys, paged: bool, precision: str) -> bool:
    """One shared buffer (a pool of at least one page whose stride in words is an int32, or
    varlen rows), bf16/fp8."""
    if paged != keys.paged or not keys.shared or precision not in PRECISIONS:
        return False
    if paged:
        return keys.limit >= 1 and keys.page_stride < 2 ** 31
    return keys.base.stride(0) % 4 == 0  # read as 4-byte words (a 1-row view may have any)


def uses_v2(keys, paged: bool, precision: str, ensemble: str, return_logits: bool,
            device: torch.device) -> bool:
    """Whether ``paged.batched_score_launch`` picks v2: one shared pool (of at least one page,
    stride under 2**31 bytes) or one shared varlen buffer, bf16/fp8, on Hopper and newer where
    v2 compiles spill-free (``serves``), and in the interpreter (so the tests run it).
    Per-layer keys, tf32/fp32 and sm_8x stay on v1."""
    if not _takes(keys, paged, precision):
        return False
    capability = _device.capability(device)
    if capability is None:
        return True
    return capability >= (9, 0) and serves(precision, ensemble == "mean", return_logits,
                                           paged=paged)


def _programs(device: torch.device, work_items: int) -> int:
    if device.type != "cuda":
        return max(1, min(work_items, INTERPRETER_PROGRAMS))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(work_items, sms * CTAS_PER_SM))


def paged_v2_launch(q: torch.Tensor, w: torch.Tensor, keys, lengths: torch.Tensor,
                    page_table: torch.Tensor | None, *, max_chunks: int, precision: str,
                    hw_fp8: bool, ensemble: str = "max", logit_offset: float = 0.0,
                    return_logits: bool = False, prefetch: bool | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch v2 on one shared pool (``keys``: ``paged.page_pools``' result, at least one
    page) or, ``page_table=None``, one shared varlen buffer (``paged.varlen_buffers``';
    ``lengths``: ``cu_chunks [B + 1]``). Arguments and outputs as
    ``paged.batched_score_launch``; inputs assumed validated by the caller. ``prefetch``
    overrides the launch table (the tests run both code paths)."""
    L, B, H, D = q.shape
    paged = page_table is not None
    if not _takes(keys, paged, precision):
        raise ValueError(f"paged v2 takes one shared pool of >= 1 page or one shared varlen "
                         f"buffer, in {PRECISIONS}; got {'a' if keys.paged else 'no'} paged "
                         f"pool ({keys.limit} pages or rows, shared={keys.shared}) with "
                         f"{'a' if paged else 'no'} page table in {precision!r}")
    device = keys.base.device
    scores = alloc_output((B, max_chunks), torch.float32, device)
    logits = alloc_output((L, B, max_chunks), torch.float32, device) if return_logits else None
    if B == 0 or max_chunks == 0:
        return scores, logits
    H_pad = max(16, triton.next_power_of_2(H))
    if H_pad != H:  # zero heads add relu(0) * 0; V4's H = 128 needs no copy
        q = torch.nn.functional.pad(q, (0, 0, 0, H_pad - H))
        w = torch.nn.functional.pad(w, (0, H_pad - H))
    q = q.contiguous()
    w = w.contiguous().float()
    lengths = lengths.contiguous()  # read at len_ptr + i
    if not paged:
        page_table = lengths[None]  # an unused pointer: varlen rows have no table
    elif page_table.stride(1) != 1:  # rows read at table_ptr + b * stride_tb + j (small copy)
        page_table = page_table.contiguous()
    kw = keys.base.view(torch.int32)
    kf = keys.base.view(torch.float32)
    epilogue = "max" if not (ensemble == "mean" or return_logits) else "other"
    cfg = paged_v2_launch_config(_device.capability(device), paged, precision, epilogue)
    if prefetch is not None:
        cfg["PREFETCH"] = bool(prefetch)
    logits_arg = logits if logits is not None else scores
    for row0 in range(0, B, MAX_ROWS):
        nb = min(MAX_ROWS, B - row0)
        grid = (_programs(device, nb * triton.cdiv(max_chunks, C.PAGE_CHUNKS)),)
        table = page_table[row0:row0 + nb] if paged else page_table
        paged_v2_kernel[grid](
            kw, kf, table, lengths[row0:row0 + nb + (0 if paged else 1)], q, w, scores,
            logits_arg, nb, B, row0, max_chunks, keys.limit, page_table.shape[1],
            keys.page_stride // 16, page_table.stride(0),
            float(logit_offset), L=L, D=D, H_PAD=H_pad,
            BLOCK_B=max(16, triton.next_power_of_2(nb)), FILL_N=FILL_N, PRECISION=precision,
            HW_FP8=bool(hw_fp8), ENSEMBLE_MEAN=ensemble == "mean", WRITE_LOGITS=return_logits,
            BF16_DOT_VIA_F32=device.type != "cuda", BF16_ASM=bf16_asm_enabled(device),
            PAGED=paged, **cfg)
    return scores, logits
