"""Resident sets: turning ensemble scores into the chunks that stay on the GPU (design §6).

:func:`select_resident` implements the serving stack's three selection modes:

``"chunk"``
    ``keep = hit | recent | sink`` with ``hit = score > threshold`` (strict). The optional
    ``max_resident`` cap keeps every forced (recent or sink) chunk and then the highest-scoring
    hits until the row holds ``max_resident`` chunks; forced chunks are never dropped, so a row
    whose forced chunks alone exceed the cap keeps exactly its forced chunks.
``"page"`` (deployed)
    Pages of ``page_size`` chunks. ``page_score`` = number of hits in the page; pages touching
    the recent tail or the sink rank above every other page. Exactly
    ``min(max_pages, n_pages)`` pages per row are taken (pages without hits fill the quota) and
    the resident set is every real chunk of those pages.
``"topk"`` (the release demo)
    The ``top_k`` highest scores of the row's real chunks; ``recent``/``sink`` do not apply.

Determinism and ties: every ranking is a stable descending sort, so among equal scores (or
equal page hit counts) the LOWER index wins. NaN scores are never hits and rank below every
real score. When the forced pages alone exceed ``max_pages``, sink pages come first (lowest
index first), then recent-tail pages from the newest backwards: the pages nearest the decode
position are the ones the next window certainly reads.

Graph safety: the selection is pure tensor work on fixed shapes (sort / scatter / gather, no
``.item()``, no boolean indexing, no branching on values), so it stays on the scores' device
and can be captured in a CUDA graph. Only argument *shapes/types* are checked unconditionally;
the *values* of ``n_chunks`` are checked when that is free of consequences (CPU, or CUDA outside
stream capture) and never on the ``meta`` device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _validate as V
from . import constants as C
from .retriever import topk_mask

SELECT_MODES = ("chunk", "page", "topk")

__all__ = ["SELECT_MODES", "ResidentSet", "ThresholdFallback", "select_resident",
           "pages_from_mask", "engine_page_ids"]


@dataclass
class ResidentSet:
    """One cycle's resident set for a batch of requests (all tensors on the scores' device).

    ``mask`` bool ``[B, N]`` is authoritative: it is what attention may read and what the
    offload engine keeps resident. ``pages`` (page mode only, else ``None``) is int64
    ``[B, max_pages]``: the chosen page indices in ascending order, padded with -1. For a row
    switched to full attention by the threshold fallback, ``mask`` covers all real chunks while
    ``pages`` still lists the page-budget choice; ``fallback`` tells such rows apart.
    """

    mask: torch.Tensor  # bool [B, N]
    pages: torch.Tensor | None  # int64 [B, max_pages] ascending, -1 padded (page mode)
    n_selected: torch.Tensor  # int64 [B]: resident chunks per row
    n_real: torch.Tensor  # int64 [B]: real chunks per row (n_chunks)
    n_hits: torch.Tensor  # int64 [B]: real chunks with score > threshold
    fallback: torch.Tensor  # bool [B]: row switched to full attention
    mode: str
    page_size: int

    @property
    def keep_ratio(self) -> torch.Tensor:
        """float32 ``[B]``: resident chunks / real chunks (0 for an empty row)."""
        return _ratio(self.n_selected, self.n_real)

    @property
    def hit_ratio(self) -> torch.Tensor:
        """float32 ``[B]``: hits / real chunks (0 for an empty row)."""
        return _ratio(self.n_hits, self.n_real)

    def page_mask(self, page_size: int | None = None) -> torch.Tensor:
        """bool ``[B, ceil(N / page_size)]``: pages holding at least one resident chunk."""
        return pages_from_mask(self.mask, page_size or self.page_size)

    def engine_pages(self, page_table: torch.Tensor) -> torch.Tensor:
        """Page mode: the chosen pages as the ENGINE's page ids, ``page_table[b, pages[b]]``
        (int64 ``[B, max_pages]``, same order as ``pages``, -1 padded). ``pages`` holds the
        request's logical page indices (page ``j`` = chunks ``64 j .. 64 j + 63``)."""
        if self.pages is None:
            raise ValueError(f"engine_pages needs a page-mode ResidentSet, this one is "
                             f"mode={self.mode!r}")
        if self.page_size != C.PAGE_CHUNKS:
            raise ValueError(f"engine_pages maps pages of {C.PAGE_CHUNKS} chunks (the pool's "
                             f"page), this selection used page_size={self.page_size}")
        return engine_page_ids(self.pages, page_table)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return num.float() / den.clamp(min=1).float()


class ThresholdFallback:
    """Per-request state of the "threshold fallback" (design §6, off unless passed).

    Each :func:`select_resident` call adds the row's hits and real chunks to running totals;
    once ``total_hits / total_chunks > bound`` (strict) the row switches to full attention and
    stays there (a needle-style request that hits everything gains nothing from sparsity).
    The state is a pair of device tensors updated in place, so it survives graph capture.
    """

    def __init__(self, batch: int, bound: float, device="cpu"):
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
            raise ValueError(f"batch must be a non-negative int, got {batch!r}")
        if not isinstance(bound, (int, float)) or isinstance(bound, bool) or not 0.0 <= bound < 1.0:
            raise ValueError(f"bound must be a float in [0, 1), got {bound!r}")
        V.addressable("the per-row totals", (batch,), 8, batch=batch)
        self.bound = float(bound)
        self.total_hits = torch.zeros(batch, dtype=torch.int64, device=device)
        self.total_chunks = torch.zeros(batch, dtype=torch.int64, device=device)
        self.active = torch.zeros(batch, dtype=torch.bool, device=device)

    @property
    def ratio(self) -> torch.Tensor:
        """float32 ``[B]``: cumulative hit ratio so far."""
        return _ratio(self.total_hits, self.total_chunks)

    def update(self, n_hits: torch.Tensor, n_real: torch.Tensor) -> torch.Tensor:
        """Add one cycle's counts; returns (and stores) the bool ``[B]`` full-attention flags."""
        self.total_hits += n_hits
        self.total_chunks += n_real
        self.active |= self.ratio > self.bound
        return self.active

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Forget the history of ``rows`` (bool ``[B]``, a finished request), or of all rows."""
        if rows is None:
            keep = torch.zeros_like(self.active)
        else:
            keep = ~V.tensor("rows", rows, dtype=torch.bool, ndim=1).to(self.active.device)
        self.total_hits *= keep
        self.total_chunks *= keep
        self.active &= keep


def engine_page_ids(pages: torch.Tensor, page_table: torch.Tensor) -> torch.Tensor:
    """Logical page indices ``pages [B, K]`` (-1 padded, as ``ResidentSet.pages``) -> the
    engine's page ids through ``page_table [B, max_pages]`` (int32/int64), int64 ``[B, K]``,
    -1 where ``pages`` is -1. Pure tensor work (graph-safe); an index past the table is a
    ValueError when values are readable."""
    V.tensor("pages", pages, integer=True, ndim=2)
    V.tensor("page_table", page_table, dtypes=(torch.int32, torch.int64), ndim=2)
    if pages.shape[0] != page_table.shape[0]:
        raise ValueError(f"pages and page_table must have the same batch, got "
                         f"{V.describe(pages)} and {V.describe(page_table)}")
    if pages.device != page_table.device:
        raise ValueError(f"page_table is on {page_table.device} but pages are on {pages.device}")
    if V.values_readable(pages.device) and pages.numel() and \
            int(pages.max()) >= page_table.shape[1]:
        raise ValueError(f"pages hold index {int(pages.max())} but page_table has only "
                         f"{page_table.shape[1]} pages a row")
    if pages.shape[1] == 0 or page_table.shape[1] == 0:
        return torch.full(pages.shape, -1, dtype=torch.int64, device=pages.device)
    idx = pages.to(torch.int64).clamp(0, page_table.shape[1] - 1)
    ids = page_table.to(torch.int64).gather(1, idx)
    return torch.where(pages >= 0, ids, torch.full_like(ids, -1))


def pages_from_mask(mask: torch.Tensor, page_size: int = C.PAGE_CHUNKS) -> torch.Tensor:
    """bool ``[B, ceil(N / page_size)]``: True where the page holds a True chunk of ``mask``."""
    V.tensor("mask", mask, dtype=torch.bool, ndim=2)
    _positive_int("page_size", page_size)
    B, N = mask.shape
    P = -(-N // page_size)
    page_size = min(page_size, max(N, 1))  # a page past N: one page of every chunk, same P
    padded = torch.zeros(B, P * page_size, dtype=torch.bool, device=mask.device)
    padded[:, :N] = mask
    return padded.view(B, P, page_size).any(dim=2)


# --- argument checks --------------------------------------------------------------------------
_INT64_LIMIT = 2 ** 63  # counts are int64 tensors; larger Python ints cannot enter them


def _nonneg_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _INT64_LIMIT:
        raise ValueError(f"{name} must be a non-negative int below 2**63, got {value!r}")
    return value


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < _INT64_LIMIT:
        raise ValueError(f"{name} must be a positive int below 2**63, got {value!r}")
    return value


def _row_lengths(n_chunks, B: int, N: int, device: torch.device) -> torch.Tensor:
    """``n_chunks`` (None, int or int tensor ``[B]``) -> int64 ``[B]`` on ``device``."""
    if n_chunks is None:
        return torch.full((B,), N, dtype=torch.int64, device=device)
    if isinstance(n_chunks, int) and not isinstance(n_chunks, bool):
        if not 0 <= n_chunks <= N:
            raise ValueError(f"n_chunks must be in [0, N={N}], got {n_chunks}")
        return torch.full((B,), n_chunks, dtype=torch.int64, device=device)
    V.tensor("n_chunks", n_chunks, integer=True, ndim=1)
    if n_chunks.shape[0] != B:
        raise ValueError(f"n_chunks must have shape ({B},) to match scores' batch, "
                         f"got {V.describe(n_chunks)}")
    if n_chunks.device != device:
        raise ValueError(f"n_chunks is on {n_chunks.device} but scores are on {device}")
    n = n_chunks.to(torch.int64)
    if V.values_readable(device) and B:
        lo, hi = int(n.min()), int(n.max())
        if lo < 0 or hi > N:
            raise ValueError(f"n_chunks values must be in [0, N={N}] (N = scores.shape[1]), "
                             f"got min {lo}, max {hi}")
    return n


# --- selection --------------------------------------------------------------------------------
def select_resident(scores: torch.Tensor, *, mode: str, n_chunks=None,
                    threshold: float = C.DEFAULT_THRESHOLD,
                    recent: int = C.DEFAULT_RECENT_CHUNKS, sink: int = C.DEFAULT_SINK_CHUNKS,
                    page_size: int = C.PAGE_CHUNKS, max_pages: int = C.DEFAULT_MAX_PAGES,
                    max_resident: int | None = None, top_k: int | None = None,
                    fallback: ThresholdFallback | None = None) -> ResidentSet:
    """The resident set of each row of ensemble ``scores`` ``[B, N]`` (see the module doc).

    ``n_chunks``: real chunks per row (None = N; an int; or an int tensor ``[B]`` on the
    scores' device); chunks at or past a row's length are never selected and the recent tail
    is the last ``recent`` chunks of that length. ``recent`` and ``sink`` count CHUNKS.
    ``max_resident`` applies to chunk mode only, ``top_k`` (required) to topk mode only.
    ``fallback``: a :class:`ThresholdFallback` updated with this cycle's hits; its active rows
    get every real chunk.

    ``scores`` may also be the :class:`~flashmemory_triton.paged.BatchScores` of a paged or
    varlen batch (``score_paged`` / ``score_varlen``): its padded scores are used with its
    ``n_chunks`` (unless ``n_chunks`` is given).
    """
    if isinstance(scores, tuple) and getattr(scores, "_fields", None) == \
            ("scores", "logits", "n_chunks"):
        if n_chunks is None:
            n_chunks = scores.n_chunks
        scores = scores.scores
    V.tensor("scores", scores, floating=True, ndim=2)
    V.choice("mode", mode, SELECT_MODES)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a float, got {type(threshold).__name__}")
    if threshold != threshold:  # NaN: no score would ever be a hit, silently
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    # An int too large for a float is beyond every score: +-inf compares the same way.
    threshold = float(threshold) if abs(threshold) < 2.0 ** 1000 else \
        (math.inf if threshold > 0 else -math.inf)
    _nonneg_int("recent", recent)
    _nonneg_int("sink", sink)
    _positive_int("page_size", page_size)
    _nonneg_int("max_pages", max_pages)
    if max_resident is not None:
        if mode != "chunk":
            raise ValueError(f"max_resident applies to mode='chunk' only, got mode={mode!r}")
        _nonneg_int("max_resident", max_resident)
    if mode == "topk":
        if top_k is None:
            raise ValueError("mode='topk' needs top_k (a non-negative int), got None")
        _nonneg_int("top_k", top_k)
    elif top_k is not None:
        raise ValueError(f"top_k applies to mode='topk' only, got mode={mode!r}")
    B, N = scores.shape
    if mode == "page" and B * max_pages * 8 >= _INT64_LIMIT:  # pages: int64 [B, max_pages]
        raise ValueError(f"max_pages = {max_pages} is too large: the pages output "
                         f"[B={B}, max_pages] int64 would pass 2**63 bytes")
    device = scores.device
    page_size_arg = page_size
    if fallback is not None:
        if not isinstance(fallback, ThresholdFallback):
            raise TypeError(f"fallback must be a ThresholdFallback, got {type(fallback).__name__}")
        if fallback.active.shape != (B,) or fallback.active.device != device:
            raise ValueError(f"fallback state is for batch {tuple(fallback.active.shape)} on "
                             f"{fallback.active.device}; scores are [{B}, {N}] on {device}")
    n = _row_lengths(n_chunks, B, N, device)
    # Counts past N act as N (every chunk of a row): clamp so huge values stay int64 arithmetic.
    recent, sink, page_size = min(recent, N), min(sink, N), min(page_size, max(N, 1))
    if max_resident is not None:
        max_resident = min(max_resident, N)

    # Half-precision scores are compared in float32 so a threshold like 0.3 is not rounded.
    s = scores if scores.dtype in (torch.float32, torch.float64) else scores.float()
    idx = torch.arange(N, device=device, dtype=torch.int64)
    real = idx[None, :] < n[:, None]
    hit = (s > threshold) & real  # NaN > t is False: NaN is never a hit
    # Forced chunks: the last `recent` real chunks and the first `sink` real chunks.
    forced = real & ((idx[None, :] >= (n - recent)[:, None]) | (idx[None, :] < sink))

    pages = None
    if mode == "chunk":
        mask = hit | forced
        if max_resident is not None:
            mask = forced | _cap_hits(s, hit & ~forced, max_resident - forced.sum(dim=1))
    elif mode == "page":
        mask, pages = _select_pages(hit, forced, real, n, N, page_size, max_pages, sink)
    else:
        # Non-real chunks become NaN, which topk_mask never keeps: rows shorter than top_k keep
        # all their (non-NaN) chunks.
        mask = topk_mask(torch.where(real, s, torch.full_like(s, float("nan"))), top_k)

    n_hits = hit.sum(dim=1)
    if fallback is not None:
        full = fallback.update(n_hits, n)
        mask = mask | (real & full[:, None])
        flags = full.clone()
    else:
        flags = torch.zeros(B, dtype=torch.bool, device=device)
    return ResidentSet(mask=mask, pages=pages, n_selected=mask.sum(dim=1), n_real=n,
                       n_hits=n_hits, fallback=flags, mode=mode, page_size=page_size_arg)


def _rank_desc(key: torch.Tensor) -> torch.Tensor:
    """Rank of each element in its row under a stable descending sort (lower index wins ties)."""
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(key.shape[1], device=key.device).expand_as(order))
    return rank


def _cap_hits(s: torch.Tensor, candidates: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """The ``budget[b]`` best-scoring ``candidates`` of each row (budget may be negative)."""
    key = torch.where(candidates, s, torch.full_like(s, float("-inf")))
    return candidates & (_rank_desc(key) < budget[:, None])


def _select_pages(hit, forced, real, n, N, page_size, max_pages, sink):
    B = hit.shape[0]
    device = hit.device
    P = -(-N // page_size)
    pad = P * page_size - N

    def per_page(chunks):  # bool [B, N] -> [B, P, page_size]
        return torch.nn.functional.pad(chunks, (0, pad)).view(B, P, page_size)

    count = per_page(hit).sum(dim=2)  # int64 [B, P], 0..page_size
    p = torch.arange(P, device=device, dtype=torch.int64)
    n_pages = (n + page_size - 1) // page_size
    real_page = p[None, :] < n_pages[:, None]
    forced_page = per_page(forced).any(dim=2)
    sink_page = forced_page & (p[None, :] * page_size < sink)
    # One int64 key ranks everything: non-real pages -1, ordinary pages their hit count
    # (0..page_size), forced pages above page_size (design §6's infinite score): sink pages
    # first, then recent pages newest first, so a budget smaller than the forced set keeps the
    # newest tail.
    top = page_size + 1
    key = torch.where(real_page, count, torch.full_like(count, -1))
    key = torch.where(forced_page, top + p[None, :], key)
    key = torch.where(sink_page, top + P + (P - p)[None, :], key)
    k = min(max_pages, P)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]
    quota = torch.clamp(n_pages, max=k)  # min(max_pages, n_pages) per row (n_pages <= P)
    valid = torch.arange(k, device=device)[None, :] < quota[:, None]
    # Real pages outrank non-real ones, so the first `quota` entries of `order` are the choice.
    chosen = torch.zeros(B, P, dtype=torch.bool, device=device)
    chosen.scatter_(1, order, valid)
    mask = chosen.repeat_interleave(page_size, dim=1)[:, :N] & real
    # Ascending page list padded with -1: sort chosen indices with P standing in for "empty".
    listed = torch.sort(torch.where(valid, order, torch.full_like(order, P)), dim=1).values
    listed = torch.where(listed == P, torch.full_like(listed, -1), listed)
    pages = torch.full((B, max_pages), -1, dtype=torch.int64, device=device)
    pages[:, :k] = listed
    return mask, pages
