"""select_resident (design §6): hand-built, an independent pure-Python oracle, edge cases."""

from __future__ import annotations

import math
import random

import pytest
import torch

from flashmemory_triton import ResidentSet, ThresholdFallback, select_resident
from flashmemory_triton.selection import pages_from_mask
from flashmemory_triton.utils import _device


# --- an independent oracle: plain Python, one row at a time ----------------------------------
def _hits(row, n, t):
    return [i < n and not math.isnan(row[i]) and row[i] > t for i in range(len(row))]


def _forced(N, n, recent, sink):
    return [i < n and (i >= n - recent or i < sink) for i in range(N)]


def oracle_chunk(row, n, t, recent, sink, max_resident=None):
    N = len(row)
    hit, forced = _hits(row, n, t), _forced(N, n, recent, sink)
    if max_resident is None:
        return [h or f for h, f in zip(hit, forced)]
    extra = sorted((i for i in range(N) if hit[i] and not forced[i]), key=lambda i: (-row[i], i))
    keep = set(i for i in range(N) if forced[i])
    keep |= set(extra[:max(0, max_resident - len(keep))])
    return [i in keep for i in range(N)]


def oracle_page(row, n, t, recent, sink, ps, max_pages):
    N = len(row)
    hit, forced = _hits(row, n, t), _forced(N, n, recent, sink)
    n_pages = -(-n // ps)
    count = [sum(hit[p * ps:(p + 1) * ps]) for p in range(n_pages)]
    f_pages = [p for p in range(n_pages) if any(forced[p * ps:(p + 1) * ps])]
    sink_pages = [p for p in f_pages if p * ps < sink]
    recent_pages = sorted((p for p in f_pages if p not in sink_pages), reverse=True)
    others = sorted((p for p in range(n_pages) if p not in f_pages), key=lambda p: (-count[p], p))
    chosen = sorted((sink_pages + recent_pages + others)[:min(max_pages, n_pages)])
    mask = [i < n and i // ps in chosen for i in range(N)]
    return mask, chosen + [-1] * (max_pages - len(chosen))


def oracle_topk(row, n, k):
    real = sorted((i for i in range(n) if not math.isnan(row[i])), key=lambda i: (-row[i], i))
    keep = set(real[:k])
    return [i in keep for i in range(len(row))]


def _rows(t):
    return t.cpu().tolist()


def _tied_scores(B, N, seed, nan_frac=0.05):
    """Scores on a coarse grid (many exact ties, some exactly at 0.5) with a few NaNs."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 9, (B, N), generator=g).float() / 8
    s[torch.rand(B, N, generator=g) < nan_frac] = float("nan")
    return s


# --- hand-built cases -------------------------------------------------------------------------
def test_chunk_mode_hit_recent_sink_strict(device):
    s = torch.tensor([[0.9, 0.5, 0.1, 0.51, 0.2, 0.3, 0.1, 0.0]], device=device)
    r = select_resident(s, mode="chunk", recent=2, sink=1)
    # 0.5 is not a hit (strict >); chunk 0 is both hit and sink; 6, 7 are the recent tail
    assert _rows(r.mask) == [[True, False, False, True, False, False, True, True]]
    assert r.pages is None
    assert _rows(r.n_selected) == [4] and _rows(r.n_hits) == [2]
    assert r.keep_ratio.tolist() == [0.5]


def test_chunk_mode_max_resident_keeps_forced_and_best_hits(device):
    s = torch.tensor([[0.9, 0.6, 0.95, 0.7, 0.7, 0.99, 0.1, 0.2]], device=device)
    r = select_resident(s, mode="chunk", recent=2, sink=0, max_resident=4)
    # forced: 6, 7 (low scores, still kept); best two hits: 5 (0.99), 2 (0.95)
    assert _rows(r.mask) == [[False, False, True, False, False, True, True, True]]
    r = select_resident(s, mode="chunk", recent=2, max_resident=5)
    # next best is 0.9 at index 0
    assert _rows(r.mask)[0] == [True, False, True, False, False, True, True, True]
    r = select_resident(s, mode="chunk", recent=2, max_resident=6)
    # 0.7 tie between 3 and 4: the lower index wins
    assert _rows(r.mask)[0] == [True, False, True, True, False, True, True, True]
    r = select_resident(s, mode="chunk", recent=3, max_resident=1)
    # forced chunks exceed the cap: all of them stay, no hit is added
    assert _rows(r.mask)[0] == [False] * 5 + [True] * 3


def test_page_mode_counts_forced_and_quota(device):
    ps = 4
    # 5 pages of 4 chunks; hits per page: p0 1, p1 3, p2 0, p3 2, p4 (recent) 0
    s = torch.tensor([[0.9, 0, 0, 0, .9, .9, .9, 0, 0, 0, 0, 0, .9, .9, 0, 0, 0, 0, 0, 0]],
                     device=device)
    r = select_resident(s, mode="page", recent=1, page_size=ps, max_pages=3)
    assert _rows(r.pages) == [[1, 3, 4]]  # forced p4, then the counts 3 and 2
    assert _rows(r.mask)[0] == [i // ps in (1, 3, 4) for i in range(20)]
    r = select_resident(s, mode="page", recent=1, page_size=ps, max_pages=5)
    assert _rows(r.pages) == [[0, 1, 2, 3, 4]]  # zero-count p2 fills the quota
    r = select_resident(s, mode="page", recent=1, page_size=ps, max_pages=8)
    assert _rows(r.pages) == [[0, 1, 2, 3, 4, -1, -1, -1]]  # more budget than pages
    assert bool(r.mask.all())


def test_page_mode_partial_last_page_and_recent_spanning_pages(device):
    ps = 4
    s = torch.zeros(1, 10, device=device)  # pages 0, 1 full, page 2 holds chunks 8, 9
    r = select_resident(s, mode="page", recent=3, page_size=ps, max_pages=2)
    # the tail 7, 8, 9 touches pages 1 and 2; the resident set stops at the real chunks
    assert _rows(r.pages) == [[1, 2]]
    assert _rows(r.mask)[0] == [False] * 4 + [True] * 6
    assert _rows(r.n_selected) == [6]


def test_page_mode_forced_overflow_keeps_sink_then_newest(device):
    ps = 2
    s = torch.ones(1, 12, device=device)
    r = select_resident(s, mode="page", recent=8, sink=1, page_size=ps, max_pages=3)
    # forced pages: 0 (sink), 2..5 (recent); budget 3 -> sink, then the two newest
    assert _rows(r.pages) == [[0, 4, 5]]


def test_topk_mode_ties_and_nan(device):
    nan = float("nan")
    s = torch.tensor([[0.3, nan, 0.7, 0.3, 0.7, 0.1]], device=device)
    r = select_resident(s, mode="topk", top_k=3)
    assert _rows(r.mask) == [[True, False, True, False, True, False]]  # 0.3 tie -> index 0
    r = select_resident(s, mode="topk", top_k=10)
    assert _rows(r.mask) == [[True, False, True, True, True, True]]  # NaN never kept
    r = select_resident(s, mode="topk", top_k=10, recent=2, sink=1)  # no forcing in topk
    assert _rows(r.n_selected) == [5]


def test_nan_is_never_a_hit_and_ranks_last(device):
    nan = float("nan")
    s = torch.tensor([[nan, 0.9, nan, 0.6, 0.2, 0.1]], device=device)
    r = select_resident(s, mode="chunk", recent=0, max_resident=1)
    assert _rows(r.mask) == [[False, True, False, False, False, False]]
    assert _rows(r.n_hits) == [2]


# --- the oracle on random tied scores ---------------------------------------------------------
CASES = [
    pytest.param(3, 37, 5, 2, 4, 3, id="partial-pages"),
    pytest.param(4, 64, 16, 0, 8, 2, id="recent-spans-pages"),
    pytest.param(2, 10, 40, 0, 4, 2, id="N-smaller-than-recent"),
    pytest.param(3, 50, 3, 7, 5, 100, id="max_pages-above-pages"),
    pytest.param(2, 33, 0, 0, 1, 5, id="page_size-1"),
    pytest.param(2, 29, 12, 3, 3, 1, id="forced-overflow"),
]


@pytest.mark.parametrize("B,N,recent,sink,ps,max_pages", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_oracle_with_ragged_rows(device, B, N, recent, sink, ps, max_pages, seed):
    s = _tied_scores(B, N, seed)
    rng = random.Random(seed)
    lengths = [N] + [rng.randint(0, N) for _ in range(B - 1)]
    n = torch.tensor(lengths, device=device)
    sd = s.to(device)
    rows = s.tolist()
    t = 0.5
    page = select_resident(sd, mode="page", n_chunks=n, threshold=t, recent=recent, sink=sink,
                           page_size=ps, max_pages=max_pages)
    cap = N // 3
    chunk = select_resident(sd, mode="chunk", n_chunks=n, threshold=t, recent=recent, sink=sink)
    capped = select_resident(sd, mode="chunk", n_chunks=n, threshold=t, recent=recent, sink=sink,
                             max_resident=cap)
    topk = select_resident(sd, mode="topk", n_chunks=n, top_k=cap)
    for b in range(B):
        want_mask, want_pages = oracle_page(rows[b], lengths[b], t, recent, sink, ps, max_pages)
        assert _rows(page.mask)[b] == want_mask
        assert _rows(page.pages)[b] == want_pages
        assert _rows(chunk.mask)[b] == oracle_chunk(rows[b], lengths[b], t, recent, sink)
        assert _rows(capped.mask)[b] == oracle_chunk(rows[b], lengths[b], t, recent, sink, cap)
        assert _rows(topk.mask)[b] == oracle_topk(rows[b], lengths[b], cap)
        for r in (page, chunk, capped, topk):
            assert not any(_rows(r.mask)[b][lengths[b]:])
            assert _rows(r.n_real)[b] == lengths[b]
    # exactly min(max_pages, n_pages) pages per row
    n_pages = [-(-x // ps) for x in lengths]
    assert [sum(p >= 0 for p in row) for row in _rows(page.pages)] == \
        [min(max_pages, x) for x in n_pages]


def test_batched_rows_equal_single_rows(device):
    s = _tied_scores(3, 40, 7).to(device)
    n = torch.tensor([40, 17, 3], device=device)
    kw = dict(mode="page", recent=6, sink=2, page_size=4, max_pages=3)
    batched = select_resident(s, n_chunks=n, **kw)
    for b in range(3):
        single = select_resident(s[b:b + 1, :int(n[b])], **kw)
        assert torch.equal(batched.mask[b, :int(n[b])], single.mask[0])
        assert torch.equal(batched.pages[b], single.pages[0])


def test_deterministic(device):
    s = _tied_scores(4, 200, 3).to(device)
    for mode, kw in (("page", dict(page_size=8, max_pages=5)), ("chunk", dict(max_resident=30)),
                     ("topk", dict(top_k=25))):
        a = select_resident(s, mode=mode, recent=10, **kw)
        b = select_resident(s.clone(), mode=mode, recent=10, **kw)
        assert torch.equal(a.mask, b.mask)


# --- edge cases -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,kw", [pytest.param("page", {}, id="page"),
                                     pytest.param("chunk", {"max_resident": 3}, id="chunk"),
                                     pytest.param("topk", {"top_k": 3}, id="topk")])
def test_empty_history(device, mode, kw):
    r = select_resident(torch.zeros(2, 0, device=device), mode=mode, max_pages=4, **kw)
    assert r.mask.shape == (2, 0) and r.mask.dtype == torch.bool
    assert _rows(r.n_selected) == [0, 0] and r.keep_ratio.tolist() == [0.0, 0.0]
    if mode == "page":
        assert _rows(r.pages) == [[-1] * 4] * 2
    r = select_resident(torch.rand(2, 5, device=device), mode=mode, max_pages=4,
                        n_chunks=torch.tensor([0, 5], device=device), **kw)
    assert not r.mask[0].any()


def test_output_shapes_and_dtypes(device):
    s = torch.rand(3, 100, device=device, dtype=torch.bfloat16)
    r = select_resident(s, mode="page", page_size=8, max_pages=6, recent=4)
    assert isinstance(r, ResidentSet)
    assert r.mask.shape == (3, 100) and r.mask.dtype == torch.bool and r.mask.device == s.device
    assert r.pages.shape == (3, 6) and r.pages.dtype == torch.int64
    assert bool((r.pages[:, 1:] > r.pages[:, :-1]).all())  # ascending, distinct
    assert torch.equal(r.page_mask(), pages_from_mask(r.mask, 8))
    assert r.n_selected.dtype == torch.int64


def test_bf16_threshold_is_compared_in_float32(device):
    s = torch.tensor([[0.30078125]], dtype=torch.bfloat16, device=device)  # bf16(0.3)
    assert _rows(select_resident(s, mode="chunk", threshold=0.3, recent=0).mask) == [[True]]


def test_no_value_reads_runs_on_meta():
    """No .item()/boolean indexing/value branching: the meta device has no values to read."""
    s = torch.empty(3, 300, device="meta")
    n = torch.empty(3, dtype=torch.int64, device="meta")
    fb = ThresholdFallback(3, 0.5, device="meta")
    for mode, kw in (("page", {}), ("chunk", {"max_resident": 9}), ("topk", {"top_k": 4})):
        r = select_resident(s, mode=mode, n_chunks=n, fallback=fb, **kw)
        assert r.mask.shape == (3, 300) and r.mask.device.type == "meta"


@pytest.mark.gpu
def test_captures_in_cuda_graph(device):
    if not _device.cuda_available() or device.type != "cuda":
        pytest.skip("needs --device cuda")
    s = torch.rand(4, 5000, device=device)
    n = torch.tensor([5000, 3000, 17, 0], device=device)
    kw = dict(mode="page", n_chunks=n, recent=128, page_size=64, max_pages=8)
    want = select_resident(s, **kw)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        select_resident(s, **kw)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = select_resident(s, **kw)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.mask, want.mask) and torch.equal(out.pages, want.pages)


# --- threshold fallback -----------------------------------------------------------------------
def test_threshold_fallback_switches_and_sticks(device):
    fb = ThresholdFallback(2, 0.5, device=device)
    kw = dict(mode="page", recent=0, page_size=2, max_pages=1, fallback=fb)
    hot = torch.tensor([[0.9] * 6 + [0.1] * 2, [0.1] * 8], device=device)  # row 0: 6/8 hits
    r = select_resident(hot, **kw)
    assert _rows(r.fallback) == [True, False]
    assert _rows(r.mask)[0] == [True] * 8  # full attention
    assert _rows(r.n_selected) == [8, 2]
    assert fb.ratio.tolist() == [0.75, 0.0]
    cold = torch.full((2, 8), 0.1, device=device)
    r = select_resident(cold, **kw)  # cumulative 6/16 < 0.5, but the switch is sticky
    assert _rows(r.fallback) == [True, False] and _rows(r.n_selected) == [8, 2]
    fb.reset(torch.tensor([True, False], device=device))
    assert _rows(fb.active) == [False, False] and _rows(fb.total_chunks) == [0, 16]


def test_fallback_ratio_is_strict(device):
    fb = ThresholdFallback(1, 0.5, device=device)
    s = torch.tensor([[0.9, 0.1]], device=device)  # ratio exactly 0.5: not above the bound
    r = select_resident(s, mode="chunk", recent=0, fallback=fb)
    assert _rows(r.fallback) == [False] and _rows(r.mask) == [[True, False]]


# --- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,exc,match", [
    pytest.param(dict(scores=torch.zeros(4), mode="page"), ValueError, "scores", id="1d"),
    pytest.param(dict(scores=torch.zeros(2, 4, dtype=torch.int32), mode="page"), TypeError,
                 "floating", id="int-scores"),
    pytest.param(dict(mode="pages"), ValueError, "mode", id="bad-mode"),
    pytest.param(dict(mode="topk"), ValueError, "top_k", id="topk-without-k"),
    pytest.param(dict(mode="page", top_k=3), ValueError, "top_k", id="k-in-page-mode"),
    pytest.param(dict(mode="page", max_resident=3), ValueError, "max_resident", id="cap-page"),
    pytest.param(dict(mode="page", n_chunks=torch.tensor([1, 2, 3])), ValueError, r"\(2,\)",
                 id="n-shape"),
    pytest.param(dict(mode="page", n_chunks=torch.tensor([1, 5])), ValueError, "N=4",
                 id="n-too-big"),
    pytest.param(dict(mode="page", n_chunks=torch.tensor([1.0, 2.0])), TypeError, "integer",
                 id="n-float"),
    pytest.param(dict(mode="page", n_chunks=-1), ValueError, "n_chunks", id="n-negative-int"),
    pytest.param(dict(mode="page", page_size=0), ValueError, "page_size", id="page-size-0"),
    pytest.param(dict(mode="page", recent=-1), ValueError, "recent", id="recent-negative"),
    pytest.param(dict(mode="chunk", threshold="0.5"), TypeError, "threshold", id="str-threshold"),
    pytest.param(dict(mode="chunk", fallback=ThresholdFallback(3, 0.5)), ValueError, "batch",
                 id="fallback-batch"),
])
def test_bad_input(kwargs, exc, match):
    kwargs = dict(kwargs)
    scores = kwargs.pop("scores", torch.zeros(2, 4))
    with pytest.raises(exc, match=match):
        select_resident(scores, **kwargs)
