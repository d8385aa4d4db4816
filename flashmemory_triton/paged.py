"""Serving batches scored in one launch: buffer wrappers, validation and scoring (design §4).

The key formats (row, paged split, varlen) and their converters are in
:mod:`flashmemory_triton.formats`; their names are importable from here too.

Scoring (:func:`score_paged`, :func:`score_varlen`, and the retriever's
:meth:`~flashmemory_triton.FlashMemoryRetriever.score_paged` /
:meth:`~flashmemory_triton.FlashMemoryRetriever.score_varlen`) returns a
:class:`BatchScores`: ``scores [B, max_chunks]`` padded with 0 past each request's length,
optional ``logits [L, B, max_chunks]`` padded with ``-inf``, and ``n_chunks [B]`` int64; pass
it straight to :func:`~flashmemory_triton.select_resident` (the lengths come with it), and
map page-mode selections to the engine's page ids with
:meth:`~flashmemory_triton.ResidentSet.engine_pages`. Per-layer keys are read in place (see
:func:`page_pools`, :func:`varlen_buffers`).

Validation: shapes, dtypes and devices always; VALUES (page ids of the pages each request
uses in ``[0, P)``, lengths within the table and ``max_chunks``, ``cu_chunks`` non-decreasing
and inside the buffer) whenever values are readable (not on meta, not while a CUDA graph is
being captured; see ``docs/validation.md``). Without validation the kernel still never reads
outside the buffers: an out-of-range page id or row makes those chunks NaN.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import torch

from . import _validate as V
from . import constants as C
from .formats import (  # noqa: F401  (the formats' names stay importable from here)
    _INDEX_DTYPES,
    KeyBuffers,
    PagedBatch,
    VarlenBatch,
    _check_cu,
    _check_cu_values,
    _check_paged_values,
    _check_pages,
    _check_table,
    _per_layer_pool,
    _per_layer_varlen,
    _pool_list,
    _resolve_max_chunks,
    _unwrap,
    _varlen_lengths,
    _varlen_list,
    engine_pages,
    expand_next_n,
    pack_pool,
    pack_varlen,
    pages_to_rows,
    pool_to_rows,
    rows_to_pages,
    unpack_pool,
    unpack_varlen,
    varlen_to_pool,
    varlen_to_rows,
)

__all__ = [
    "BatchScores", "PagedBatch", "VarlenBatch",
    "rows_to_pages", "pages_to_rows", "pack_pool", "pool_to_rows", "unpack_pool",
    "pack_varlen", "varlen_to_rows", "unpack_varlen", "varlen_to_pool",
    "KeyBuffers", "page_pools", "varlen_buffers", "score_paged", "score_varlen",
]

PAGED_LAYER_UNIT = 16  # per-layer pool offsets in 16-byte units (keeps 16-byte vector loads)
VARLEN_LAYER_UNIT = 4  # per-layer row buffers: 4-byte words (132-byte rows are word aligned)


class BatchScores(NamedTuple):
    """Scores of a serving batch. ``scores`` float32 ``[B, max_chunks]`` (0 past a request's
    length), ``logits`` float32 ``[L, B, max_chunks]`` (``-inf`` past it) or None, ``n_chunks``
    int64 ``[B]``."""
    scores: torch.Tensor
    logits: torch.Tensor | None
    n_chunks: torch.Tensor


# --- key buffers for the kernel -----------------------------------------------------------------
_OFFSET_CACHE: dict = {}
_OFFSET_CACHE_SIZE = 64
_OFFSET_LOCK = threading.Lock()


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
    """Pools (``[P, 8448]``, ``[L, P, 8448]``, a list of ``L`` ``[P, 8448]``, or the engines'
    ``[P, 64, 1, 132]`` / ``[L, P, 64, 1, 132]`` / list of them) -> the kernel's
    :class:`KeyBuffers`. Read in place when every pool's page stride is one multiple of 16
    bytes (at least 8448; an engine's padded pages included) and every pool starts 16-byte
    aligned (16-byte loads); any other pool is first copied to contiguous pages."""
    if isinstance(pools, KeyBuffers):
        return pools
    pools = engine_pages(pools)
    bufs = _pool_list(pools)
    strides = {p.stride(0) for p in bufs if p.shape[0] > 1}
    stride = strides.pop() if len(strides) == 1 else C.PAGE_BYTES

    def in_place(p):
        return (p.shape[0] <= 1 or p.stride(0) == stride) and p.stride(1) == 1 \
            and p.data_ptr() % 16 == 0

    if stride % 16 or stride < C.PAGE_BYTES or not all(in_place(p) for p in bufs):
        stride = C.PAGE_BYTES
        bufs = [p if in_place(p) else p.clone(memory_format=torch.contiguous_format)
                for p in bufs]
    limit = min(p.shape[0] for p in bufs)
    if not _per_layer_pool(pools):
        return KeyBuffers(bufs[0], None, limit, paged=True, keep=bufs, page_stride=stride)
    return KeyBuffers(bufs[0], _layer_offsets(bufs, PAGED_LAYER_UNIT), limit, paged=True,
                      keep=bufs, page_stride=stride)


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
def _check_scoring(prepared, ensemble, logit_offset):
    from . import ops
    if not isinstance(prepared, ops.PreparedQueries):
        raise TypeError(f"prepared must come from prepare_queries, got {type(prepared).__name__}")
    ops._check_prepared(prepared)
    V.choice("ensemble", ensemble, ops.ENSEMBLES)
    return V.real_number("logit_offset", logit_offset)


def check_paged(pools, page_table, n_chunks, max_chunks, L: int, B: int, device,
                queries: str = "the queries"):
    """Every check of a paged batch against queries of ``L`` layers and ``B`` rows on
    ``device`` (``queries`` names them in messages), before anything launches. Returns
    ``(held KeyBuffers or None, pages every buffer holds, output width M, lengths n64)``."""
    bufs, limit = _key_source(pools, True, L, device, queries)
    Bt, width = _check_table(page_table, n_chunks, device)
    if Bt != B:
        raise ValueError(f"page_table has {Bt} requests but {queries} have B={B}")
    M = _resolve_max_chunks(max_chunks, width * C.PAGE_CHUNKS, "64 * page_table.shape[1]", L * B)
    _check_paged_values(page_table, n_chunks, limit, M)
    # The lengths the kernel uses (clamped as it clamps them), a fresh tensor: never an alias
    # of the caller's n_chunks.
    n64 = n_chunks.to(torch.int64).clamp(0, min(M, page_table.shape[1] * C.PAGE_CHUNKS))
    return bufs, limit, M, n64


def check_varlen(keys, cu_chunks, max_chunks, L: int, B: int, device,
                 queries: str = "the queries"):
    """Every check of a varlen batch (as :func:`check_paged`). Returns ``(held KeyBuffers or
    None, rows every buffer holds, output width M, lengths n64)``."""
    bufs, rows_avail = _key_source(keys, False, L, device, queries)
    Bc = _check_cu(cu_chunks, device)
    if Bc != B:
        raise ValueError(f"cu_chunks describes {Bc} requests (shape {tuple(cu_chunks.shape)}) "
                         f"but {queries} have B={B}")
    _, n64, M = _varlen_lengths(cu_chunks, rows_avail, max_chunks, L * B)
    return bufs, rows_avail, M, n64


# --- scoring ------------------------------------------------------------------------------------
def score_paged(prepared, pools, page_table: torch.Tensor, n_chunks: torch.Tensor, *,
                max_chunks: int | None = None, ensemble: str = "max", logit_offset: float = 0.0,
                return_logits: bool = False) -> BatchScores:
    """Score every layer of every request of a paged batch in one launch.

    ``prepared`` from :func:`~flashmemory_triton.ops.prepare_queries` (``[L, B, H, D]``);
    ``pools``: ``[P, 8448]`` (one pool for every layer), ``[L, P, 8448]`` or a list of ``L``
    ``[P_l, 8448]`` pools, the same as the engines' ``[P, 64, 1, 132]`` (``[L, P, 64, 1,
    132]``, lists) with any page stride (read in place: see :func:`page_pools`), or
    :func:`page_pools`' result; ``page_table [B, max_pages]`` and ``n_chunks [B]``
    (int32/int64), or ``n_chunks [B, next_n]`` (MTP: the queries then have ``B * next_n``
    rows, row ``b * next_n + t`` seeing ``n_chunks[b, t]`` chunks of request ``b``). Output
    width ``max_chunks`` defaults to ``64 * max_pages``, known from the shape. The kernel needs
    no host values; the value checks read a few on the host (a sync) except under CUDA graph
    capture, where they are skipped and the call is capturable (per-layer pools then as a held
    :func:`page_pools`).
    """
    pools = engine_pages(pools)
    page_table, n_chunks = expand_next_n(page_table, n_chunks)
    logit_offset = _check_scoring(prepared, ensemble, logit_offset)
    L, B = prepared.q.shape[:2]
    checked = check_paged(pools, page_table, n_chunks, max_chunks, L, B, prepared.q.device)
    return _score_paged(prepared, pools, page_table, n_chunks, checked, ensemble, logit_offset,
                        return_logits)


def _score_paged(prepared, pools, page_table, n_chunks, checked, ensemble, logit_offset,
                 return_logits) -> BatchScores:
    """:func:`score_paged` on arguments :func:`check_paged` accepted (``checked``)."""
    bufs, _, M, n64 = checked
    if prepared.backend != "triton":  # torch (reference) or cpu
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
    L, B = prepared.q.shape[:2]
    checked = check_varlen(keys, cu_chunks, max_chunks, L, B, prepared.q.device)
    return _score_varlen(prepared, keys, cu_chunks, checked, ensemble, logit_offset,
                         return_logits)


def _score_varlen(prepared, keys, cu_chunks, checked, ensemble, logit_offset,
                  return_logits) -> BatchScores:
    """:func:`score_varlen` on arguments :func:`check_varlen` accepted (``checked``)."""
    bufs, _, M, n64 = checked
    if prepared.backend != "triton":  # torch (reference) or cpu
        rows = varlen_to_rows(_unwrap(keys), cu_chunks, M)
        return _score_rows_torch(prepared, rows, n64, M, ensemble, logit_offset, return_logits)
    kb = bufs if bufs is not None else varlen_buffers(keys)
    scores, logits = _launch(prepared, kb, cu_chunks, None, M, ensemble, logit_offset,
                             return_logits)
    return BatchScores(scores, logits, n64.clamp(0, M))


def _key_source(keys, paged: bool, L: int, device,
                queries: str = "the queries") -> tuple[KeyBuffers | None, int]:
    """Check a key argument of the batched ops against the queries: the right kind of
    KeyBuffers, the queries' device, one buffer or ``L`` per-layer ones (held as a KeyBuffers
    under graph capture). Returns ``(keys if already a KeyBuffers else None, limit)``, where
    ``limit`` is the smallest buffer's pages (paged) or rows (varlen)."""
    what, builder = ("pools", "page_pools") if paged else ("keys", "varlen_buffers")
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
        raise ValueError(f"{what} are on {dev} but {queries} are on {device}; move the "
                         f"{what} with .to({str(device)!r})")
    if n_layers is not None and n_layers != L:
        raise ValueError(f"per-layer {what} hold {n_layers} layers but {queries} have L={L}")
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
    """Torch and CPU backends: the scorer on padded rows, then the documented fill."""
    from . import ops
    q, w = prepared.q, prepared.w
    real = torch.arange(M, device=q.device)[None, :] < n64[:, None]
    scores, logits = ops._score_torch(q, w, rows, ensemble, logit_offset, True, prepared.backend)
    logits = torch.where(real[None], logits, torch.full_like(logits, float("-inf")))
    scores = torch.where(real, scores, torch.zeros_like(scores))
    return BatchScores(scores, logits if return_logits else None, n64)


# --- retriever path -----------------------------------------------------------------------------
def score_hidden_paged(retriever, hidden, pools, page_table, n_chunks, positions, checked, *,
                       ensemble="max", return_logits=False) -> BatchScores:
    """The retriever's paged path on arguments :func:`check_paged` accepted: batched
    projections, query kernel, batched scorer."""
    prepared = _prepare_hidden(retriever, hidden, positions)
    return _score_paged(prepared, pools, page_table, n_chunks, checked, ensemble,
                        retriever.logit_offset, return_logits)


def score_hidden_varlen(retriever, hidden, keys, cu_chunks, positions, checked, *,
                        ensemble="max", return_logits=False) -> BatchScores:
    """The retriever's varlen path on arguments :func:`check_varlen` accepted."""
    prepared = _prepare_hidden(retriever, hidden, positions)
    return _score_varlen(prepared, keys, cu_chunks, checked, ensemble, retriever.logit_offset,
                         return_logits)


def _prepare_hidden(retriever, hidden, positions):
    from . import ops
    q, w = ops.project_queries(retriever, hidden)
    return ops.prepare_queries(q, w, positions, max_position=retriever.max_position,
                               precision=retriever.precision, backend="triton",
                               rope_freqs=retriever.rope_freqs)
