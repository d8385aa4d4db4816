"""Key formats of serving batches and their converters (design §4).

Row format (the release's tensors)
    ``uint8 [..., N, 132]``: per chunk 128 e4m3 bytes then one little-endian float32 scale.
Paged split format (DeepSeek-V4 serving engines)
    A POOL is ``uint8 [P, 8448]``: page ``p`` holds 64 chunks as ``[64 x 128 e4m3 bytes]``
    followed by ``[64 x 4-byte float32 scales]``. A batch is a pool (or one pool per layer),
    ``page_table [B, max_pages]`` (int32 or int64: request ``b``'s chunks ``64 j .. 64 j + 63``
    are in page ``page_table[b, j]``) and ``n_chunks [B]``. Only the split layout is accepted,
    in one of two shapes, each read by its shape alone:

    * ``[P, 8448]`` (``[L, P, 8448]`` per layer): a page is the last dim;
    * ``[P, 64, 1, 132]`` (``[L, P, 64, 1, 132]``): the serving engines' (DeepGEMM's) fused
      cache, whose singleton head dim marks it: page ``p`` is the 8448 bytes from
      ``kv_cache[p]``'s first byte, read as ``[64 x 128 e4m3][64 x 4-byte scales]`` (its
      ``[64, 1, 132]`` view is NOT 64 rows of 132 bytes).

    The page stride (``stride(0)`` of the pages dim) may exceed 8448 (an engine's padded pages).
    A ``[P, 64, 132]`` tensor is refused: that is the ROW format's shape, and its bytes would
    be read as 64 row-format chunks a page (design §10). If it holds split-layout bytes pass
    ``.view(P, 8448)`` (or ``.unsqueeze(2)``); if it holds rows, convert with
    :func:`rows_to_pages`.
MTP (``next_n`` draft tokens a request)
    ``n_chunks [B, next_n]``: query row ``b * next_n + t`` reads request ``b``'s pages
    (``page_table[b]``) and sees its first ``n_chunks[b, t]`` chunks
    (:func:`expand_next_n`).
Varlen row format
    Row-format chunks of every request packed back to back, ``uint8 [total, 132]``, with
    ``cu_chunks [B + 1]`` (request ``b`` owns rows ``cu_chunks[b] .. cu_chunks[b + 1] - 1``).

Keys per layer: one buffer for every layer (the release: a pool ``[P, 8448]`` or rows
``[total, 132]``) or one per layer (serving): a stacked tensor ``[L, P, 8448]`` /
``[L, total, 132]``, or a list of ``L`` separately allocated buffers. :class:`KeyBuffers` says
where one launch's keys live (built by :func:`flashmemory_triton.paged.page_pools` /
:func:`flashmemory_triton.paged.varlen_buffers`); every converter here accepts it too.

This module also holds the argument checks of these formats (tables, lengths, offsets), shared
by the converters and the scorer (:mod:`flashmemory_triton.paged`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import _validate as V
from . import constants as C

__all__ = [
    "KeyBuffers", "PagedBatch", "VarlenBatch", "engine_pages", "expand_next_n",
    "rows_to_pages", "pages_to_rows", "pack_pool", "pool_to_rows", "unpack_pool",
    "pack_varlen", "varlen_to_rows", "unpack_varlen", "varlen_to_pool",
]

_FP8_BLOCK = C.PAGE_CHUNKS * C.FP8_BYTES  # 8192: the fp8 part of a page
_INDEX_DTYPES = (torch.int32, torch.int64)

class KeyBuffers:
    """Where the keys of one batched launch live (:func:`page_pools`, :func:`varlen_buffers`).

    ``base`` is the uint8 tensor the kernel's pointer comes from (the shared buffer, or layer
    0's); ``layer_offsets`` is ``None`` (one buffer for every layer) or an int64 device tensor
    ``[L]``: layer ``l``'s buffer start minus ``base``'s, in units of ``layer_unit`` bytes;
    ``limit`` is the number of pages (paged) or rows (varlen) every layer's buffer holds.
    ``keep`` holds the per-layer tensors so they outlive the launch. ``page_stride``: bytes
    from one page to the next in every pool (paged; 8448 unless an engine pads its pages).
    """

    __slots__ = ("base", "layer_offsets", "limit", "paged", "keep", "page_stride")

    def __init__(self, base, layer_offsets, limit, paged, keep=(), page_stride=C.PAGE_BYTES):
        self.base = base
        self.layer_offsets = layer_offsets
        self.limit = int(limit)
        self.paged = bool(paged)
        self.keep = tuple(keep)
        self.page_stride = int(page_stride)

    @property
    def shared(self) -> bool:
        return self.layer_offsets is None

    @property
    def n_layers(self) -> int | None:
        return None if self.shared else int(self.layer_offsets.shape[0])


def _unwrap(keys):
    """KeyBuffers -> the tensor or list it was built from; anything else unchanged."""
    if isinstance(keys, KeyBuffers):
        return list(keys.keep) if not keys.shared else keys.keep[0]
    return keys


class PagedBatch(NamedTuple):
    """``pool`` uint8 ``[P, 8448]`` (or ``[L, P, 8448]``), ``page_table [B, max_pages]`` (-1
    where a request has no page), ``n_chunks`` int64 ``[B]``."""
    pool: torch.Tensor
    page_table: torch.Tensor
    n_chunks: torch.Tensor


class VarlenBatch(NamedTuple):
    """``keys`` uint8 ``[total, 132]`` (or ``[L, total, 132]``), ``cu_chunks`` int64 ``[B + 1]``."""
    keys: torch.Tensor
    cu_chunks: torch.Tensor


# --- raw format conversion ---------------------------------------------------------------------
def rows_to_pages(rows: torch.Tensor) -> torch.Tensor:
    """Row format ``uint8 [..., N, 132]`` -> split pages ``uint8 [..., ceil(N / 64), 8448]``.

    Chunk ``n`` goes to page ``n // 64``, slot ``n % 64``. Slots past N (the last page's tail)
    are zero bytes (e4m3 0, scale 0.0). Exact: :func:`pages_to_rows` gives ``rows`` back."""
    V.compressed_keys("rows", rows, ndims=tuple(range(2, 8)))
    *lead, N, _ = rows.shape
    P = -(-N // C.PAGE_CHUNKS)
    padded = rows.new_zeros(*lead, P * C.PAGE_CHUNKS, C.CHUNK_BYTES)
    padded[..., :N, :] = rows
    chunks = padded.view(*lead, P, C.PAGE_CHUNKS, C.CHUNK_BYTES)
    fp8 = chunks[..., :C.FP8_BYTES].reshape(*lead, P, _FP8_BLOCK)
    scales = chunks[..., C.FP8_BYTES:].reshape(*lead, P, C.PAGE_CHUNKS * C.SCALE_BYTES)
    return torch.cat([fp8, scales], dim=-1)


def pages_to_rows(pages: torch.Tensor, n_chunks: int | None = None) -> torch.Tensor:
    """Split pages ``uint8 [..., P, 8448]`` -> row format ``uint8 [..., n_chunks, 132]``
    (default: all ``64 * P`` chunks)."""
    _check_pages("pages", pages, ndims=tuple(range(2, 8)))
    *lead, P, _ = pages.shape
    total = P * C.PAGE_CHUNKS
    if n_chunks is None:
        n_chunks = total
    if isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or not 0 <= n_chunks <= total:
        raise ValueError(f"n_chunks must be an int in [0, {total}] (64 x {P} pages), "
                         f"got {n_chunks!r}")
    fp8 = pages[..., :_FP8_BLOCK].reshape(*lead, P, C.PAGE_CHUNKS, C.FP8_BYTES)
    scales = pages[..., _FP8_BLOCK:].reshape(*lead, P, C.PAGE_CHUNKS, C.SCALE_BYTES)
    rows = torch.cat([fp8, scales], dim=-1).reshape(*lead, total, C.CHUNK_BYTES)
    return rows[..., :n_chunks, :].contiguous()


def engine_pages(pool):
    """The engines' fused cache ``[..., P, 64, 1, 132]`` -> the same bytes as ``[..., P, 8448]``
    pages (a view: same storage, same page stride); a list of them element-wise; anything
    else unchanged. The 64 slots must be 132 bytes apart and bytes contiguous, as engines
    allocate them."""
    if isinstance(pool, (list, tuple)):
        return type(pool)(engine_pages(p) for p in pool)
    if not isinstance(pool, torch.Tensor) or pool.dim() < 4 or \
            tuple(pool.shape[-3:]) != (C.PAGE_CHUNKS, 1, C.CHUNK_BYTES):
        return pool
    V.tensor("pools", pool, dtype=torch.uint8)
    if pool.stride(-3) != C.CHUNK_BYTES or pool.stride(-1) != 1:
        raise ValueError(f"a [P, 64, 1, 132] pool must hold each page's 8448 bytes contiguously "
                         f"(strides (page, 132, *, 1)), got strides {pool.stride()}")
    return pool.as_strided((*pool.shape[:-3], C.PAGE_BYTES), (*pool.stride()[:-3], 1))


def expand_next_n(page_table, n_chunks):
    """MTP rows: ``n_chunks [B, next_n]`` -> ``(page_table`` with each row repeated ``next_n``
    times ``[B * next_n, max_pages]``, ``n_chunks.reshape(-1))``: row ``b * next_n + t`` reads
    request ``b``'s pages and sees ``n_chunks[b, t]`` chunks. Device ops only (no host sync).
    1-D ``n_chunks`` (and anything malformed, left to the checks) pass unchanged."""
    if isinstance(n_chunks, torch.Tensor) and n_chunks.dim() == 2 \
            and isinstance(page_table, torch.Tensor) and page_table.dim() == 2:
        if n_chunks.shape[0] != page_table.shape[0]:
            raise ValueError(f"2-D n_chunks must be [B={page_table.shape[0]}, next_n] to match "
                             f"page_table, got {V.describe(n_chunks)}")
        return page_table.repeat_interleave(n_chunks.shape[1], 0), n_chunks.reshape(-1)
    return page_table, n_chunks


def _check_pages(name: str, pages: torch.Tensor, ndims) -> torch.Tensor:
    V.tensor(name, pages, dtype=torch.uint8, ndims=ndims)
    if pages.shape[-1] != C.PAGE_BYTES:
        hint = ""
        if pages.dim() >= 2 and tuple(pages.shape[-2:]) == (C.PAGE_CHUNKS, C.CHUNK_BYTES):
            hint = (" ([..., 64, 132] is the ROW layout's shape: if the bytes are split-layout "
                    "pages pass .view(..., 8448); if they are 132-byte rows use rows_to_pages)")
        raise ValueError(f"{name} must be split-format pages [..., P, {C.PAGE_BYTES}] "
                         f"([64 x 128 e4m3][64 x 4-byte scales]), got {V.describe(pages)}{hint}")
    return pages


# --- batch conversion: paged --------------------------------------------------------------------
def _request_list(name: str, requests) -> tuple[list[torch.Tensor], bool]:
    """Validate a list of per-request row tensors; returns it and whether they are per layer."""
    if isinstance(requests, torch.Tensor) or not isinstance(requests, Sequence):
        raise TypeError(f"{name} must be a list of per-request row tensors [n_b, 132] or "
                        f"[L, n_b, 132], got {type(requests).__name__}")
    reqs = list(requests)
    for i, r in enumerate(reqs):
        V.compressed_keys(f"{name}[{i}]", r, ndims=(2, 3))
    if reqs:
        lead = {tuple(r.shape[:-2]) for r in reqs}
        devices = {r.device for r in reqs}
        if len(lead) != 1 or len(devices) != 1:
            raise ValueError(f"{name} must all be [n_b, 132] or all [L, n_b, 132] with the same "
                             f"L, on one device; got leading dims {sorted(lead)} on {devices}")
    return reqs, bool(reqs) and reqs[0].dim() == 3


def pack_pool(requests, *, page_ids=None, num_pages: int | None = None,
              max_pages: int | None = None, index_dtype: torch.dtype = torch.int32,
              device=None) -> PagedBatch:
    """Build an engine-style pool from per-request row-format keys.

    ``requests``: list of ``B`` tensors ``[n_b, 132]`` (one pool for every layer) or
    ``[L, n_b, 132]`` (a stacked per-layer pool ``[L, P, 8448]``). ``page_ids``: optional list
    of ``B`` int sequences/tensors, the pool pages request ``b``'s pages go to (at least
    ``ceil(n_b / 64)`` each, extra ignored); default: consecutive pages in request order.
    Shared pages (prefix sharing) are allowed when the requests agree on their bytes; a page
    given two different contents is a ValueError. ``num_pages`` defaults to the highest page
    used + 1, ``max_pages`` (table width) to the longest request's page count. Pages nothing
    uses and slots no request fills (the tail of a last page) are zero; a request
    writes only its own slots of a shared partial page. Returns a :class:`PagedBatch` whose
    table holds -1 past each request's pages.
    """
    reqs, per_layer = _request_list("requests", requests)
    if index_dtype not in _INDEX_DTYPES:
        raise TypeError(f"index_dtype must be torch.int32 or torch.int64, got {index_dtype}")
    device = torch.device(device) if device is not None else (reqs[0].device if reqs else
                                                              torch.device("cpu"))
    need = [-(-r.shape[-2] // C.PAGE_CHUNKS) for r in reqs]
    if page_ids is None:
        starts = [sum(need[:i]) for i in range(len(reqs))]
        ids = [list(range(s, s + k)) for s, k in zip(starts, need)]
    else:
        if isinstance(page_ids, torch.Tensor) or not isinstance(page_ids, Sequence) \
                or len(page_ids) != len(reqs):
            raise TypeError(f"page_ids must be a list of {len(reqs)} page-id sequences (one per "
                            f"request), got {type(page_ids).__name__}")
        ids = []
        for b, (p, k) in enumerate(zip(page_ids, need)):
            p = [int(x) for x in (p.tolist() if isinstance(p, torch.Tensor) else p)]
            if len(p) < k:
                raise ValueError(f"page_ids[{b}] has {len(p)} pages but request {b} has "
                                 f"{reqs[b].shape[-2]} chunks ({k} pages)")
            if min(p[:k], default=0) < 0:
                raise ValueError(f"page_ids[{b}] must be non-negative, got {p[:k]}")
            if len(set(p[:k])) != k:
                raise ValueError(f"page_ids[{b}] repeats a page within one request: {p[:k]}")
            ids.append(p[:k])
    used = max((max(p) for p in ids if p), default=-1) + 1
    P = used if num_pages is None else num_pages
    if isinstance(P, bool) or not isinstance(P, int) or P < used:
        raise ValueError(f"num_pages must be an int >= {used} (the highest page used + 1), "
                         f"got {num_pages!r}")
    width = max(need, default=0) if max_pages is None else max_pages
    if isinstance(width, bool) or not isinstance(width, int) or width < max(need, default=0):
        raise ValueError(f"max_pages must be an int >= {max(need, default=0)} (the longest "
                         f"request's pages), got {max_pages!r}")
    L = reqs[0].shape[0] if per_layer else None
    V.addressable("the pool", ((L,) if per_layer else ()) + (P, C.PAGE_BYTES), 1,
                  **{"num_pages" if num_pages is not None else "page_ids (highest page + 1)": P})
    V.addressable("the page table", (len(reqs), width), index_dtype.itemsize, max_pages=width)
    pool = torch.zeros(*((L,) if per_layer else ()), P, C.PAGE_BYTES, dtype=torch.uint8,
                       device=device)
    table = torch.full((len(reqs), width), -1, dtype=index_dtype, device=device)
    for b, (r, p) in enumerate(zip(reqs, ids)):
        if not p:
            continue
        idx = torch.tensor(p, dtype=torch.int64, device=device)
        pages = rows_to_pages(r.to(device))
        full = r.shape[-2] // C.PAGE_CHUNKS
        pool[..., idx[:full], :] = pages[..., :full, :]
        tail = r.shape[-2] - full * C.PAGE_CHUNKS
        if tail:
            # A last partial page: write only its real slots, so a request sharing the first
            # chunks of a longer request's page (prefix sharing) never zeroes the rest.
            last, src = int(idx[full]), pages[..., full, :]
            pool[..., last, :tail * C.FP8_BYTES] = src[..., :tail * C.FP8_BYTES]
            pool[..., last, _FP8_BLOCK:_FP8_BLOCK + tail * C.SCALE_BYTES] = \
                src[..., _FP8_BLOCK:_FP8_BLOCK + tail * C.SCALE_BYTES]
        table[b, :len(p)] = idx.to(index_dtype)
    n_chunks = torch.tensor([r.shape[-2] for r in reqs], dtype=torch.int64, device=device)
    # Shared pages were written once per request; make sure everyone reads its own bytes.
    back = unpack_pool(pool, table, n_chunks)
    for b, (r, got) in enumerate(zip(reqs, back)):
        if not torch.equal(got, r.to(device)):
            raise ValueError(f"request {b} shares a page with another request whose chunks "
                             f"differ (page_ids {ids[b]}); shared pages must hold equal bytes")
    return PagedBatch(pool, table, n_chunks)


def pool_to_rows(pool, page_table: torch.Tensor, n_chunks: torch.Tensor,
                 max_chunks: int | None = None) -> torch.Tensor:
    """Gather a paged batch into padded row format: ``[B, max_chunks, 132]`` for a shared pool,
    ``[L, B, max_chunks, 132]`` for per-layer pools (a ``[L, P, 8448]`` tensor or a list).
    Chunks past ``n_chunks[b]`` are zero bytes. ``max_chunks`` defaults to
    ``64 * page_table.shape[1]``. Page ids of used pages are validated (host sync). Pools may
    be engine-shaped (``[P, 64, 1, 132]``) and ``n_chunks`` 2-D (``[B, next_n]``: ``B *
    next_n`` rows)."""
    pool = engine_pages(_unwrap(pool))
    page_table, n_chunks = expand_next_n(page_table, n_chunks)
    pools = _pool_list(pool)
    B, width = _check_table(page_table, n_chunks, pools[0].device)
    M = _resolve_max_chunks(max_chunks, width * C.PAGE_CHUNKS, "64 * page_table.shape[1]")
    _check_paged_values(page_table, n_chunks, min(p.shape[0] for p in pools), M)
    n = n_chunks.to(torch.int64)
    slots = torch.arange(width, device=page_table.device)
    used = slots[None, :] * C.PAGE_CHUNKS < n[:, None]
    ids = torch.where(used, page_table.to(torch.int64), torch.zeros_like(page_table,
                                                                          dtype=torch.int64))
    real = torch.arange(M, device=page_table.device)[None, :] < n[:, None]  # [B, M]
    out = []
    for p in pools:
        if p.shape[0] == 0:  # an empty pool: only empty requests passed the check above
            p = p.new_zeros(1, C.PAGE_BYTES)
        rows = pages_to_rows(p[ids])  # [B, width * 64, 132]
        rows = _fit(rows, M)
        out.append(rows * real[..., None])
    return torch.stack(out) if _per_layer_pool(pool) else out[0]


def unpack_pool(pool, page_table, n_chunks) -> list[torch.Tensor]:
    """Per-request row-format keys (``[n_b, 132]`` or ``[L, n_b, 132]``), a list of ``B``."""
    rows = pool_to_rows(pool, page_table, n_chunks)
    lengths = expand_next_n(page_table, n_chunks)[1].tolist()
    return [rows[..., b, :n, :].contiguous() for b, n in enumerate(lengths)]


def _fit(rows: torch.Tensor, M: int) -> torch.Tensor:
    """Cut or zero-pad dim -2 to M."""
    have = rows.shape[-2]
    if have >= M:
        return rows[..., :M, :]
    pad = rows.new_zeros(*rows.shape[:-2], M - have, rows.shape[-1])
    return torch.cat([rows, pad], dim=-2)


# --- batch conversion: varlen -------------------------------------------------------------------
def pack_varlen(requests, *, device=None) -> VarlenBatch:
    """Concatenate per-request row-format keys (``[n_b, 132]`` or ``[L, n_b, 132]``) into
    ``keys [total, 132]`` (or ``[L, total, 132]``) and ``cu_chunks`` int64 ``[B + 1]``."""
    reqs, per_layer = _request_list("requests", requests)
    device = torch.device(device) if device is not None else (reqs[0].device if reqs else
                                                              torch.device("cpu"))
    lengths = torch.tensor([0] + [r.shape[-2] for r in reqs], dtype=torch.int64)
    cu = torch.cumsum(lengths, 0).to(device)
    if not reqs:
        return VarlenBatch(torch.empty(0, C.CHUNK_BYTES, dtype=torch.uint8, device=device), cu)
    keys = torch.cat([r.to(device) for r in reqs], dim=-2)
    return VarlenBatch(keys, cu)


def varlen_to_rows(keys, cu_chunks: torch.Tensor, max_chunks: int | None = None) -> torch.Tensor:
    """Padded row format ``[B, max_chunks, 132]`` (``[L, B, max_chunks, 132]`` per layer) from
    varlen keys; zero bytes past each request's length. ``max_chunks`` defaults to the longest
    request (a host sync)."""
    keys = _unwrap(keys)
    bufs = _varlen_list(keys)
    B = _check_cu(cu_chunks, bufs[0].device)
    cu, n, M = _varlen_lengths(cu_chunks, min(k.shape[0] for k in bufs), max_chunks)
    idx = cu[:-1, None] + torch.arange(M, device=cu.device)[None, :]
    real = torch.arange(M, device=cu.device)[None, :] < n[:, None]
    out = []
    for k in bufs:
        rows = k[torch.where(real, idx, torch.zeros_like(idx)).clamp(max=max(k.shape[0] - 1, 0))] \
            if k.shape[0] else k.new_zeros(B, M, C.CHUNK_BYTES)
        out.append(rows * real[..., None])
    return torch.stack(out) if _per_layer_varlen(keys) else out[0]


def unpack_varlen(keys, cu_chunks) -> list[torch.Tensor]:
    """Per-request row-format keys from varlen keys: a list of ``B`` ``[n_b, 132]`` (or
    ``[L, n_b, 132]``) tensors."""
    keys = _unwrap(keys)
    bufs = _varlen_list(keys)
    _check_cu(cu_chunks, bufs[0].device)
    _check_cu_values(cu_chunks, min(k.shape[0] for k in bufs), None)
    cu = cu_chunks.tolist()
    parts = [[k[cu[b]:cu[b + 1]] for k in bufs] for b in range(len(cu) - 1)]
    if _per_layer_varlen(keys):
        return [torch.stack(p) for p in parts]
    return [p[0].clone() for p in parts]


def varlen_to_pool(keys, cu_chunks, **pack_kwargs) -> PagedBatch:
    """Varlen row-format batch -> paged batch (:func:`pack_pool` of the unpacked requests)."""
    return pack_pool(unpack_varlen(keys, cu_chunks), **pack_kwargs)


# --- argument checks ----------------------------------------------------------------------------
def _per_layer_pool(pool) -> bool:
    return not isinstance(pool, torch.Tensor) or pool.dim() == 3


def _per_layer_varlen(keys) -> bool:
    return not isinstance(keys, torch.Tensor) or keys.dim() == 3


def _pool_list(pool) -> list[torch.Tensor]:
    """A pool argument -> list of 2-D ``[P, 8448]`` pools (one, or one per layer)."""
    if isinstance(pool, torch.Tensor):
        _check_pages("pools", pool, ndims=(2, 3))
        return [pool] if pool.dim() == 2 else list(pool.unbind(0))
    if not isinstance(pool, Sequence) or not pool:
        raise TypeError(f"pools must be a uint8 tensor [P, 8448] / [L, P, 8448] or a non-empty "
                        f"list of per-layer [P, 8448] tensors, got {type(pool).__name__}")
    for i, p in enumerate(pool):
        _check_pages(f"pools[{i}]", p, ndims=(2,))
    devices = {p.device for p in pool}
    if len(devices) != 1:
        raise ValueError(f"pools must all be on one device, got {sorted(map(str, devices))}")
    return list(pool)


def _varlen_list(keys) -> list[torch.Tensor]:
    if isinstance(keys, torch.Tensor):
        V.compressed_keys("keys", keys, ndims=(2, 3))
        return [keys] if keys.dim() == 2 else list(keys.unbind(0))
    if not isinstance(keys, Sequence) or not keys:
        raise TypeError(f"keys must be a uint8 tensor [total, 132] / [L, total, 132] or a "
                        f"non-empty list of per-layer [total, 132] tensors, got "
                        f"{type(keys).__name__}")
    for i, k in enumerate(keys):
        V.compressed_keys(f"keys[{i}]", k, ndims=(2,))
    devices = {k.device for k in keys}
    if len(devices) != 1:
        raise ValueError(f"keys must all be on one device, got {sorted(map(str, devices))}")
    return list(keys)


def _resolve_max_chunks(max_chunks, default: int, what: str, lanes: int = 1) -> int:
    """``max_chunks`` checked, or ``default``. ``lanes`` (layers x requests) padded rows of
    ``max_chunks`` 132-byte chunks must stay addressable (int64 bytes): past that torch's own
    allocation would fail with an overflow, after the query kernel on the Triton backend."""
    if max_chunks is None:
        return default
    if isinstance(max_chunks, bool) or not isinstance(max_chunks, int) or max_chunks < 0:
        raise ValueError(f"max_chunks must be a non-negative int (default: {what}), "
                         f"got {max_chunks!r}")
    if max(lanes, 1) * max_chunks * C.CHUNK_BYTES >= 2 ** 63:
        raise ValueError(f"max_chunks = {max_chunks} is too large: {max(lanes, 1)} padded rows "
                         f"of that many {C.CHUNK_BYTES}-byte chunks exceed 2**63 bytes")
    return max_chunks


def _check_table(page_table, n_chunks, device) -> tuple[int, int]:
    V.tensor("page_table", page_table, dtypes=_INDEX_DTYPES, ndim=2)
    V.tensor("n_chunks", n_chunks, dtypes=_INDEX_DTYPES, ndim=1)
    B, width = page_table.shape
    if n_chunks.shape[0] != B:
        raise ValueError(f"n_chunks must have shape ({B},) to match page_table [B={B}, "
                         f"max_pages={width}], got {V.describe(n_chunks)}")
    V.same_device(device, page_table=page_table, n_chunks=n_chunks)
    return B, width


def _check_paged_values(page_table, n_chunks, num_pages: int, max_chunks: int) -> None:
    """Lengths in ``[0, min(64 * max_pages, max_chunks)]``; the pages each request uses in
    ``[0, num_pages)``. Skipped where values cannot be read (meta, CUDA graph capture)."""
    if not V.values_readable(page_table.device) or page_table.shape[0] == 0:
        return
    width = page_table.shape[1]
    n = n_chunks.to(torch.int64)
    cap = min(width * C.PAGE_CHUNKS, max_chunks)
    lo, hi = int(n.min()), int(n.max())
    if lo < 0 or hi > cap:
        raise ValueError(f"n_chunks must be in [0, {cap}] (min of 64 x max_pages = "
                         f"{width * C.PAGE_CHUNKS} and max_chunks = {max_chunks}), "
                         f"got min {lo}, max {hi}")
    used = torch.arange(width, device=n.device)[None, :] * C.PAGE_CHUNKS < n[:, None]
    bad = used & ((page_table < 0) | (page_table >= num_pages))
    if bool(bad.any()):
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"page_table[{b}, {j}] = {int(page_table[b, j])} is not a page of the "
                         f"pool (valid: 0..{num_pages - 1}); request {b} uses pages 0.."
                         f"{(int(n[b]) - 1) // C.PAGE_CHUNKS} of its table row")


def _check_cu(cu_chunks, device) -> int:
    V.tensor("cu_chunks", cu_chunks, dtypes=_INDEX_DTYPES, ndim=1)
    if cu_chunks.shape[0] < 1:
        raise ValueError(f"cu_chunks must be [B + 1] cumulative offsets (at least one element), "
                         f"got {V.describe(cu_chunks)}")
    V.same_device(device, cu_chunks=cu_chunks)
    return cu_chunks.shape[0] - 1


def _varlen_lengths(cu_chunks, rows: int, max_chunks: int | None, lanes: int = 1):
    """int64 ``cu``, the lengths ``n [B]`` and the output width ``M`` (``max_chunks``, or the
    longest request: a host sync), after the value checks: a request longer than ``M`` is
    refused on every backend, never truncated."""
    cu = cu_chunks.to(torch.int64)
    n = cu[1:] - cu[:-1]
    if max_chunks is None:
        M = max(int(n.max()), 0) if n.numel() else 0  # host sync
    else:
        M = _resolve_max_chunks(max_chunks, 0, "the longest request", lanes)
    _check_cu_values(cu_chunks, rows, M)
    return cu, n, M


def _check_cu_values(cu_chunks, rows: int, max_chunks: int | None) -> None:
    if not V.values_readable(cu_chunks.device) or cu_chunks.shape[0] < 2:
        return
    cu = cu_chunks.to(torch.int64)
    n = cu[1:] - cu[:-1]
    if int(cu[0]) < 0 or int(n.min()) < 0:
        raise ValueError(f"cu_chunks must be non-negative and non-decreasing, got "
                         f"{cu_chunks.tolist() if cu.numel() <= 16 else V.describe(cu_chunks)}")
    if int(cu[-1]) > rows:
        raise ValueError(f"cu_chunks[-1] = {int(cu[-1])} exceeds the {rows} rows of keys")
    if max_chunks is not None and int(n.max()) > max_chunks:
        raise ValueError(f"max_chunks = {max_chunks} is shorter than the longest request "
                         f"({int(n.max())} chunks)")
