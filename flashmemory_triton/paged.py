"""Serving batches: the paged split format, variable-length rows, and converters (design §4).

Formats
-------
Row format (the release's tensors)
    ``uint8 [..., N, 132]``: per chunk 128 e4m3 bytes then one little-endian float32 scale.
Paged split format (DeepSeek-V4 serving engines)
    A POOL is ``uint8 [P, 8448]``: page ``p`` holds 64 chunks as ``[64 x 128 e4m3 bytes]``
    followed by ``[64 x 4-byte float32 scales]``. A batch is a pool (or one pool per layer),
    ``page_table [B, max_pages]`` (int32 or int64: request ``b``'s chunks ``64 j .. 64 j + 63``
    are in page ``page_table[b, j]``) and ``n_chunks [B]``. Only the split layout is accepted,
    always with the page as the last dim of 8448 bytes: a ``[P, 64, 132]`` tensor is refused
    because its bytes would be read as ROW-format chunks (design §10); if such a tensor does hold
    split-layout bytes, pass ``.view(P, 8448)``; if it holds rows, convert with
    :func:`rows_to_pages`.
Varlen row format
    Row-format chunks of every request packed back to back, ``uint8 [total, 132]``, with
    ``cu_chunks [B + 1]`` (request ``b`` owns rows ``cu_chunks[b] .. cu_chunks[b + 1] - 1``).

Keys per layer: one buffer for every layer (the release: a pool ``[P, 8448]`` or rows
``[total, 132]``) or one per layer (serving): a stacked tensor ``[L, P, 8448]`` /
``[L, total, 132]``, or a list of ``L`` separately allocated buffers, read in place (see
:class:`KeyBuffers`).

Scoring (:func:`score_paged`, :func:`score_varlen`, and the retriever's
:meth:`~flashmemory_triton.FlashMemoryRetriever.score_paged` /
:meth:`~flashmemory_triton.FlashMemoryRetriever.score_varlen`) returns a
:class:`BatchScores`: ``scores [B, max_chunks]`` padded with 0 past each request's length,
optional ``logits [L, B, max_chunks]`` padded with ``-inf``, and ``n_chunks [B]`` int64; pass
it straight to :func:`~flashmemory_triton.select_resident` (the lengths come with it), and
map page-mode selections to the engine's page ids with
:meth:`~flashmemory_triton.ResidentSet.engine_pages`.

Validation: shapes, dtypes and devices always; VALUES (page ids of the pages each request
uses in ``[0, P)``, lengths within the table and ``max_chunks``, ``cu_chunks`` non-decreasing
and inside the buffer) whenever values are readable (not on meta, not while a CUDA graph is
being captured; see ``docs/validation.md``). Without validation the kernel still never reads
outside the buffers: an out-of-range page id or row makes those chunks NaN.
"""

from __future__ import annotations

import threading
from typing import NamedTuple, Sequence

import torch

from . import constants as C
from . import _validate as V

__all__ = [
    "BatchScores", "PagedBatch", "VarlenBatch",
    "rows_to_pages", "pages_to_rows", "pack_pool", "pool_to_rows", "unpack_pool",
    "pack_varlen", "varlen_to_rows", "unpack_varlen", "varlen_to_pool",
    "KeyBuffers", "page_pools", "varlen_buffers", "score_paged", "score_varlen",
]

_FP8_BLOCK = C.PAGE_CHUNKS * C.FP8_BYTES  # 8192: the fp8 part of a page
_INDEX_DTYPES = (torch.int32, torch.int64)
PAGED_LAYER_UNIT = 16  # per-layer pool offsets in 16-byte units (keeps 16-byte vector loads)
VARLEN_LAYER_UNIT = 4  # per-layer row buffers: 4-byte words (132-byte rows are word aligned)


class KeyBuffers:
    """Where the keys of one batched launch live (:func:`page_pools`, :func:`varlen_buffers`).

    ``base`` is the uint8 tensor the kernel's pointer comes from (the shared buffer, or layer
    0's); ``layer_offsets`` is ``None`` (one buffer for every layer) or an int64 device tensor
    ``[L]``: layer ``l``'s buffer start minus ``base``'s, in units of ``layer_unit`` bytes;
    ``limit`` is the number of pages (paged) or rows (varlen) every layer's buffer holds.
    ``keep`` holds the per-layer tensors so they outlive the launch.
    """

    __slots__ = ("base", "layer_offsets", "limit", "paged", "keep")

    def __init__(self, base, layer_offsets, limit, paged, keep=()):
        self.base = base
        self.layer_offsets = layer_offsets
        self.limit = int(limit)
        self.paged = bool(paged)
        self.keep = tuple(keep)

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


class BatchScores(NamedTuple):
    """Scores of a serving batch. ``scores`` float32 ``[B, max_chunks]`` (0 past a request's
    length), ``logits`` float32 ``[L, B, max_chunks]`` (``-inf`` past it) or None, ``n_chunks``
    int64 ``[B]``."""
    scores: torch.Tensor
    logits: torch.Tensor | None
    n_chunks: torch.Tensor


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
    ``64 * page_table.shape[1]``. Page ids of used pages are validated (host sync)."""
    pool = _unwrap(pool)
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
    lengths = n_chunks.tolist()
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


# --- key buffers for the kernel -----------------------------------------------------------------
_OFFSET_CACHE: dict = {}
_OFFSET_CACHE_SIZE = 64
_OFFSET_LOCK = threading.Lock()


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


def _layer_offsets(bufs: list[torch.Tensor], unit: int) -> torch.Tensor:
    """int64 device tensor ``[L]``: each buffer's address minus the first's, in ``unit`` bytes.
    Cached by addresses (eager calls on the same buffers skip the host-to-device copy). The
    cache may evict and free it, so a CUDA graph must not rely on it: under capture the ops
    require a caller-held :func:`page_pools` / :func:`varlen_buffers` object, which keeps its
    own reference (see :func:`_require_held_buffers`)."""
    ptrs = tuple(b.data_ptr() for b in bufs)
    key = (ptrs, unit, str(bufs[0].device))
    with _OFFSET_LOCK:
        hit = _OFFSET_CACHE.get(key)
    if hit is None:
        for i, p in enumerate(ptrs):
            if (p - ptrs[0]) % unit:
                raise ValueError(f"per-layer buffer {i} starts {p - ptrs[0]} bytes from buffer 0, "
                                 f"not a multiple of {unit}; allocate each layer's buffer "
                                 f"{unit}-byte aligned (torch allocations are)")
        hit = torch.tensor([(p - ptrs[0]) // unit for p in ptrs], dtype=torch.int64,
                           device=bufs[0].device)
        with _OFFSET_LOCK:
            while len(_OFFSET_CACHE) >= _OFFSET_CACHE_SIZE:
                _OFFSET_CACHE.pop(next(iter(_OFFSET_CACHE)), None)
            _OFFSET_CACHE[key] = hit
    return hit


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _require_held_buffers(n_layers, device: torch.device, what: str, builder: str) -> None:
    """Per-layer keys under CUDA graph capture must come as a caller-held KeyBuffers: the graph
    bakes in the address of the layer-offsets tensor, which only that object keeps alive (a
    per-call one would be freed, and a replay would read freed memory as offsets)."""
    if n_layers is not None and _capturing(device):
        raise ValueError(f"per-layer {what} under CUDA graph capture must be passed as a "
                         f"{builder}(...) object built before capture and kept alive as long "
                         f"as the graph (it holds the layer-offsets tensor the graph reads)")


def page_pools(pools):
    """Pools (``[P, 8448]``, ``[L, P, 8448]`` or a list of ``L`` ``[P, 8448]``) -> the kernel's
    :class:`KeyBuffers`. Every pool must have contiguous
    8448-byte pages (page stride 8448, a 16-byte aligned start) and is read in place."""
    if isinstance(pools, KeyBuffers):
        return pools
    bufs = _pool_list(pools)
    for i, p in enumerate(bufs):
        if p.shape[0] > 1 and p.stride(0) != C.PAGE_BYTES or p.stride(1) != 1:
            raise ValueError(f"pool {i} must hold contiguous {C.PAGE_BYTES}-byte pages "
                             f"(strides ({C.PAGE_BYTES}, 1)), got strides {p.stride()}")
        if p.data_ptr() % 16:
            raise ValueError(f"pool {i} must start 16-byte aligned, its address is "
                             f"{p.data_ptr()} (% 16 = {p.data_ptr() % 16}); use .clone()")
    limit = min(p.shape[0] for p in bufs)
    if not _per_layer_pool(pools):
        return KeyBuffers(bufs[0], None, limit, paged=True, keep=bufs)
    return KeyBuffers(bufs[0], _layer_offsets(bufs, PAGED_LAYER_UNIT), limit, paged=True,
                      keep=bufs)


def varlen_buffers(keys):
    """Varlen keys (``[total, 132]``, ``[L, total, 132]`` or a list of ``L`` ``[total, 132]``)
    -> :class:`KeyBuffers`. Rows must be contiguous
    132-byte records starting 4-byte aligned; other layouts are copied first."""
    if isinstance(keys, KeyBuffers):
        return keys
    bufs = _varlen_list(keys)
    fixed = []
    for k in bufs:
        if (k.shape[0] > 1 and k.stride(0) != C.CHUNK_BYTES) or k.stride(1) != 1 \
                or k.data_ptr() % 4:
            k = k.clone(memory_format=torch.contiguous_format)
        fixed.append(k)
    limit = min(k.shape[0] for k in fixed)
    if not _per_layer_varlen(keys):
        return KeyBuffers(fixed[0], None, limit, paged=False, keep=fixed)
    return KeyBuffers(fixed[0], _layer_offsets(fixed, VARLEN_LAYER_UNIT), limit, paged=False,
                      keep=fixed)


# --- argument checks ----------------------------------------------------------------------------
def _resolve_max_chunks(max_chunks, default: int, what: str) -> int:
    if max_chunks is None:
        return default
    if isinstance(max_chunks, bool) or not isinstance(max_chunks, int) or max_chunks < 0:
        raise ValueError(f"max_chunks must be a non-negative int (default: {what}), "
                         f"got {max_chunks!r}")
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


def _varlen_lengths(cu_chunks, rows: int, max_chunks: int | None):
    """int64 ``cu``, the lengths ``n [B]`` and the output width ``M`` (``max_chunks``, or the
    longest request: a host sync), after the value checks: a request longer than ``M`` is
    refused on every backend, never truncated."""
    cu = cu_chunks.to(torch.int64)
    n = cu[1:] - cu[:-1]
    if max_chunks is None:
        M = max(int(n.max()), 0) if n.numel() else 0  # host sync
    else:
        M = _resolve_max_chunks(max_chunks, 0, "the longest request")
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


def _check_scoring(prepared, ensemble, logit_offset):
    from . import ops
    if not isinstance(prepared, ops.PreparedQueries):
        raise TypeError(f"prepared must come from prepare_queries, got {type(prepared).__name__}")
    ops._check_prepared(prepared)
    V.choice("ensemble", ensemble, ops.ENSEMBLES)
    return V.real_number("logit_offset", logit_offset)


def _check_layers(n_layers: int | None, L: int, what: str) -> None:
    if n_layers is not None and n_layers != L:
        raise ValueError(f"per-layer {what} hold {n_layers} layers but the queries have L={L}")


# --- scoring ------------------------------------------------------------------------------------
def score_paged(prepared, pools, page_table: torch.Tensor, n_chunks: torch.Tensor, *,
                max_chunks: int | None = None, ensemble: str = "max", logit_offset: float = 0.0,
                return_logits: bool = False) -> BatchScores:
    """Score every layer of every request of a paged batch in one launch.

    ``prepared`` from :func:`~flashmemory_triton.ops.prepare_queries` (``[L, B, H, D]``);
    ``pools``: ``[P, 8448]`` (one pool for every layer), ``[L, P, 8448]`` or a list of ``L``
    ``[P_l, 8448]`` pools (read in place), or :func:`page_pools`' result; ``page_table``
    ``[B, max_pages]`` and ``n_chunks [B]`` (int32/int64). Output width ``max_chunks`` defaults
    to ``64 * max_pages``, known from the shape. The kernel needs no host values; the value
    checks read a few on the host (a sync) except under CUDA graph capture, where they are
    skipped and the call is capturable (per-layer pools then as a held :func:`page_pools`).
    """
    logit_offset = _check_scoring(prepared, ensemble, logit_offset)
    B = prepared.q.shape[1]
    device = prepared.q.device
    bufs, limit = _key_source(pools, True, prepared)
    Bt, width = _check_table(page_table, n_chunks, device)
    if Bt != B:
        raise ValueError(f"page_table has {Bt} requests but the queries have B={B}")
    M = _resolve_max_chunks(max_chunks, width * C.PAGE_CHUNKS, "64 * page_table.shape[1]")
    _check_paged_values(page_table, n_chunks, limit, M)
    # The lengths the kernel uses (clamped as it clamps them), a fresh tensor: never an alias
    # of the caller's n_chunks.
    n64 = n_chunks.to(torch.int64).clamp(0, min(M, page_table.shape[1] * C.PAGE_CHUNKS))
    if prepared.backend == "torch":
        rows = pool_to_rows(_unwrap(pools), page_table, n_chunks, M)
        return _score_rows_torch(prepared, rows, n64, M, ensemble, logit_offset, return_logits)
    keys = bufs if bufs is not None else page_pools(pools)
    scores, logits = _launch(prepared, keys, n_chunks, page_table, M, ensemble, logit_offset,
                             return_logits)
    return BatchScores(scores, logits, n64)


def score_varlen(prepared, keys, cu_chunks: torch.Tensor, *, max_chunks: int | None = None,
                 ensemble: str = "max", logit_offset: float = 0.0,
                 return_logits: bool = False) -> BatchScores:
    """Score every layer of every request of a varlen row-format batch in one launch.

    ``keys``: ``[total, 132]`` (every layer), ``[L, total, 132]``, a list of ``L``
    ``[total_l, 132]`` buffers, or :func:`varlen_buffers`' result; ``cu_chunks [B + 1]``
    int32/int64. ``max_chunks`` (output width) defaults to the longest request, which reads
    ``cu_chunks`` on the host: pass it explicitly to capture the call in a CUDA graph (per-layer
    keys then as a held :func:`varlen_buffers`). Outside capture the value checks read a few
    values on the host (a sync).
    """
    logit_offset = _check_scoring(prepared, ensemble, logit_offset)
    B = prepared.q.shape[1]
    bufs, rows_avail = _key_source(keys, False, prepared)
    Bc = _check_cu(cu_chunks, prepared.q.device)
    if Bc != B:
        raise ValueError(f"cu_chunks describes {Bc} requests (shape {tuple(cu_chunks.shape)}) "
                         f"but the queries have B={B}")
    _, n64, M = _varlen_lengths(cu_chunks, rows_avail, max_chunks)
    if prepared.backend == "torch":
        rows = varlen_to_rows(_unwrap(keys), cu_chunks, M)
        return _score_rows_torch(prepared, rows, n64, M, ensemble, logit_offset, return_logits)
    kb = bufs if bufs is not None else varlen_buffers(keys)
    scores, logits = _launch(prepared, kb, cu_chunks, None, M, ensemble, logit_offset,
                             return_logits)
    return BatchScores(scores, logits, n64.clamp(0, M))


def _key_source(keys, paged: bool, prepared) -> tuple[KeyBuffers | None, int]:
    """Check a key argument of the batched ops against the queries: the right kind of
    KeyBuffers, the queries' device, one buffer or ``L`` per-layer ones (held as a KeyBuffers
    under graph capture). Returns ``(keys if already a KeyBuffers else None, limit)``, where
    ``limit`` is the smallest buffer's pages (paged) or rows (varlen)."""
    what, builder = ("pools", "page_pools") if paged else ("keys", "varlen_buffers")
    L, device = prepared.q.shape[0], prepared.q.device
    if isinstance(keys, KeyBuffers):
        if keys.paged != paged:
            other = "varlen_buffers" if paged else "page_pools"
            raise TypeError(f"{what} is a {'varlen' if paged else 'paged'} KeyBuffers (from "
                            f"{other}); use {builder}")
        bufs, dev, n_layers, limit = keys, keys.base.device, keys.n_layers, keys.limit
    else:
        found = _pool_list(keys) if paged else _varlen_list(keys)
        bufs, dev = None, found[0].device
        per_layer = _per_layer_pool(keys) if paged else _per_layer_varlen(keys)
        n_layers = len(found) if per_layer else None
        limit = min(b.shape[0] for b in found)
    if dev != device:
        raise ValueError(f"{what} are on {dev} but the queries are on {device}")
    _check_layers(n_layers, L, what)
    if bufs is None:
        _require_held_buffers(n_layers, device, what, f"paged.{builder}")
    return bufs, limit


def _launch(prepared, keys: KeyBuffers, lengths, page_table, M, ensemble, logit_offset,
            return_logits):
    """The batched kernel on validated inputs (``page_table`` None: varlen rows)."""
    from .kernels.paged import batched_score_launch
    from .utils import _device
    return batched_score_launch(
        prepared.q, prepared.w, keys, lengths, page_table, max_chunks=M,
        precision=prepared.precision, hw_fp8=_device.has_hw_fp8(prepared.q.device),
        ensemble=ensemble, logit_offset=logit_offset, return_logits=return_logits)


def _score_rows_torch(prepared, rows, n64, M, ensemble, logit_offset, return_logits):
    """Torch backend: the reference on padded rows, then the documented fill."""
    from . import ops
    q, w = prepared.q, prepared.w
    real = torch.arange(M, device=q.device)[None, :] < n64[:, None]
    scores, logits = ops._score_torch(q, w, rows, ensemble, logit_offset, True)
    logits = torch.where(real[None], logits, torch.full_like(logits, float("-inf")))
    scores = torch.where(real, scores, torch.zeros_like(scores))
    return BatchScores(scores, logits if return_logits else None, n64)


# --- retriever path -----------------------------------------------------------------------------
def score_hidden_paged(retriever, hidden, pools, page_table, n_chunks, positions, *,
                       ensemble="max", return_logits=False, max_chunks=None) -> BatchScores:
    """The retriever's paged path: batched projections, query kernel, batched scorer."""
    from . import ops
    q, w = ops.project_queries(retriever, hidden)
    prepared = ops.prepare_queries(q, w, positions, max_position=retriever.max_position,
                                   precision=retriever.precision, backend="triton",
                                   rope_freqs=retriever.rope_freqs)
    return score_paged(prepared, pools, page_table, n_chunks, max_chunks=max_chunks,
                       ensemble=ensemble, logit_offset=retriever.logit_offset,
                       return_logits=return_logits)


def score_hidden_varlen(retriever, hidden, keys, cu_chunks, positions, *, ensemble="max",
                        return_logits=False, max_chunks=None) -> BatchScores:
    """The retriever's varlen path: batched projections, query kernel, batched scorer."""
    from . import ops
    q, w = ops.project_queries(retriever, hidden)
    prepared = ops.prepare_queries(q, w, positions, max_position=retriever.max_position,
                                   precision=retriever.precision, backend="triton",
                                   rope_freqs=retriever.rope_freqs)
    return score_varlen(prepared, keys, cu_chunks, max_chunks=max_chunks, ensemble=ensemble,
                        logit_offset=retriever.logit_offset, return_logits=return_logits)
