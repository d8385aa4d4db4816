"""Paged split-format and varlen batches (kernels/paged.py, flashmemory_triton/paged.py).

Every kernel result is checked per request against the float64 reference on that request's
OWN row-format keys (built before any conversion, so the converters are not part of the
oracle) and the same prepared q, with the fill past each request's length checked exactly.
Outputs are NaN-poisoned before every launch (conftest), and pages no request uses hold e4m3
NaN bytes, so an unwritten output or a stray read fails.
"""

from __future__ import annotations

import pytest
import torch

from flashmemory_triton import constants as C
from flashmemory_triton import ops
from flashmemory_triton import paged as P
from flashmemory_triton import reference as ref
from flashmemory_triton.kernels import PRECISIONS
from flashmemory_triton.selection import engine_page_ids, select_resident
from kernel_cases import assert_close, logits_f64, make_keys, retriever_states

pytestmark = pytest.mark.interpreter

# The kernel against float64 on the same prepared q: only fp32 accumulation error remains
# (D = 128 products, <= 16 heads here: sqrt(128 * 16) * 6e-8 = 2.7e-6 RMS), so 1e-5 relative
# RMS, as tests/test_kernels.py. tf32 on a GPU rounds q to 10 mantissa bits inside the dot
# (2^-11 / sqrt(3) per element, up to 2x from ReLU cancellation): 1e-3. The interpreter's
# tf32 dot is exact fp32.
FP32_RTOL = 1e-5
TF32_RTOL = 1e-3
# Retriever backends (fp32 weights, fp32 scoring mode): both compute in fp32 and differ only
# in summation order (batched vs per-layer GEMMs, dot tiling), the FP32_RTOL argument above;
# tests/test_kernels.py uses the same bound for this comparison.
RETRIEVER_RTOL = FP32_RTOL
LENGTHS = [0, 1, 63, 64, 65, 300]  # the empty, tiny, page-boundary and multi-tile requests
NAN_BYTE = 0x7F  # e4m3 NaN: poisons any chunk that is read from a page nobody should read


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rtol(precision, device):
    return TF32_RTOL if precision == "tf32" and device.type == "cuda" else FP32_RTOL


def _prepared(L, B, H, gen, device, precision):
    q = (torch.randn(L, B, H, C.HEAD_DIM, generator=gen)).to(device)
    w = (torch.randn(L, B, H, generator=gen) / 64).to(device)
    pos = torch.randint(0, 10 ** 6, (B,), generator=gen).to(device)
    return ops.prepare_queries(q, w, pos, precision=precision, backend="triton")


def _requests(lengths, gen, L=None):
    """Per-request row-format keys; requests 3, 4 and 5 share their first 64 chunks (a common
    prompt prefix) so the paged batch can share that page; request 5 holds NaN chunks."""
    lead = () if L is None else (L,)
    reqs = [make_keys((*lead, n), gen) for n in lengths]
    for j in (4, 5):
        reqs[j][..., :64, :] = reqs[3][..., :64, :]
    reqs[5][..., 70, 9] = NAN_BYTE
    reqs[5][..., 200, C.HEAD_DIM:] = torch.tensor([float("inf")]).view(torch.uint8)
    return reqs


def _paged(reqs, gen, *, extra_pages=7, index_dtype=torch.int32, share=None):
    """A shuffled, non-contiguous pool: random page ids, requests 3-5 sharing page 0's id,
    unused pages full of NaN bytes, table entries past each request's pages set to garbage,
    and a table that is a strided view (row stride != max_pages)."""
    need = [-(-r.shape[-2] // C.PAGE_CHUNKS) for r in reqs]
    total = sum(need) + extra_pages
    perm = torch.randperm(total, generator=gen).tolist()
    ids, i = [], 0
    for k in need:
        ids.append(perm[i:i + k])
        i += k
    share = len(reqs) == len(LENGTHS) if share is None else share
    for j in ((4, 5) if share else ()):  # prefix sharing: request 3's first page, shared
        ids[j][0] = ids[3][0]
    batch = P.pack_pool(reqs, page_ids=ids, num_pages=total, index_dtype=index_dtype)
    used = {p for row in ids for p in row}
    unused = torch.tensor(sorted(set(range(total)) - used), dtype=torch.int64)
    batch.pool[..., unused, :] = NAN_BYTE
    width = batch.page_table.shape[1]
    wide = torch.full((len(reqs), width + 3), 2 ** 30, dtype=index_dtype)
    wide[:, :width] = batch.page_table
    table = wide[:, :width]
    table[table < 0] = 2 ** 30  # never a page of this pool: must never be read
    return batch.pool, table, batch.n_chunks, ids


def _close_filled(got, want, rtol, name):
    """Padded outputs of two backends: the same fill (-inf / 0) and NaN positions, and the
    finite values within ``rtol``."""
    got, want = got.cpu(), want.cpu()
    assert torch.equal(torch.isinf(got), torch.isinf(want)), f"{name}: fill differs"
    fin = ~torch.isinf(want)
    assert_close(got[fin], want[fin], rtol, name)


def _check_batch(out, prep, reqs, ensemble, rtol, tag, logit_offset):
    """Per-request comparison against the float64 reference, plus the exact fill."""
    L = prep.q.shape[0]
    scores, logits = out.scores.cpu(), out.logits.cpu()
    M = scores.shape[1]
    for b, r in enumerate(reqs):
        n = r.shape[-2]
        assert int(out.n_chunks[b]) == n, tag
        keys = r[:, None] if r.dim() == 3 else r[None]
        want = logits_f64(prep.q[:, b:b + 1].float().cpu(), prep.w[:, b:b + 1].cpu(), keys,
                          logit_offset=logit_offset)[:, 0]
        assert_close(logits[:, b, :n], want, rtol, f"{tag} logits request {b} (n={n})")
        want_s = ref.ensemble_scores(torch.sigmoid(want), ensemble)
        assert_close(scores[b, :n], want_s, rtol, f"{tag} scores request {b} (n={n})")
        assert bool((logits[:, b, n:] == float("-inf")).all()), f"{tag}: logit fill, request {b}"
        assert bool((scores[b, n:] == 0).all()), f"{tag}: score fill, request {b}"
    assert logits.shape == (L, len(reqs), M)


@pytest.mark.parametrize("layout", ["shared", "stacked", "list"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_paged_and_varlen_match_reference(precision, layout, device):
    """Every precision x key layout: one pool (or key buffer) for all layers, a stacked
    per-layer tensor, and a list of separately allocated per-layer buffers of different sizes
    (read in place through the layer-offset table)."""
    gen = _gen(PRECISIONS.index(precision) * 10 + len(layout))
    L, H = 3, 16
    B = len(LENGTHS)
    reqs = _requests(LENGTHS, gen, None if layout == "shared" else L)
    prep = _prepared(L, B, H, gen, device, precision)
    ensemble = "mean" if precision in ("tf32", "fp8") else "max"
    rtol = _rtol(precision, device)
    offset = 0.25

    pool, table, n_chunks, _ = _paged(reqs, gen, index_dtype=torch.int64 if precision == "bf16"
                                      else torch.int32)
    if layout == "list":  # separate allocations, layer 1 with extra (NaN) pages at the end
        pool = [pool[l].clone() for l in range(L)]
        pool[1] = torch.cat([pool[1], torch.full((5, C.PAGE_BYTES), NAN_BYTE, dtype=torch.uint8)])
        pool = [p.to(device) for p in pool]
    else:
        pool = pool.to(device)
    out = P.score_paged(prep, pool, table.to(device), n_chunks.to(device), ensemble=ensemble,
                        logit_offset=offset, return_logits=True)
    assert out.scores.shape == (B, table.shape[1] * C.PAGE_CHUNKS)
    _check_batch(out, prep, reqs, ensemble, rtol, f"paged {precision}/{layout}", offset)

    vb = P.pack_varlen(reqs)
    keys = vb.keys
    if layout == "list":
        keys = [keys[l].clone() for l in range(L)]
        keys[2] = torch.cat([keys[2], make_keys((9,), gen)])
        keys = [k.to(device) for k in keys]
    else:
        keys = keys.to(device)
    cu = vb.cu_chunks.to(torch.int32 if precision == "fp32" else torch.int64).to(device)
    out_v = P.score_varlen(prep, keys, cu, ensemble=ensemble, logit_offset=offset,
                           return_logits=True)
    assert out_v.scores.shape == (B, max(LENGTHS))
    _check_batch(out_v, prep, reqs, ensemble, rtol, f"varlen {precision}/{layout}", offset)
    if precision != "bf16" or layout != "shared":
        return
    alone = P.score_varlen(prep, keys, cu, ensemble=ensemble, logit_offset=offset)
    assert alone.logits is None
    assert torch.allclose(alone.scores, out_v.scores, rtol=0, atol=0, equal_nan=True), (
        "scores change when logits are written")


def test_hardware_e4m3_decode_path(device):
    """The sm_89+ decode (hardware e4m3 conversion) through the batched kernel: the
    interpreter emulates it; NaN bytes are still flagged by the kernel itself."""
    if device.type == "cuda":
        pytest.skip("the GPU run takes the device's own decode path in every test")
    from flashmemory_triton.kernels.paged import batched_score_launch
    gen = _gen(3)
    L, H = 3, 16
    reqs = _requests(LENGTHS, gen)
    prep = _prepared(L, len(reqs), H, gen, device, "bf16")
    pool, table, n_chunks, _ = _paged(reqs, gen)
    scores, logits = batched_score_launch(prep.q, prep.w, P.page_pools(pool), n_chunks, table,
                                          max_chunks=table.shape[1] * 64, precision="bf16",
                                          hw_fp8=True, return_logits=True)
    _check_batch(P.BatchScores(scores, logits, n_chunks), prep, reqs, "max", FP32_RTOL,
                 "hw_fp8", 0.0)


def test_selection_and_engine_pages_match_per_request(device):
    """Page-mode selection from the batched scores equals per-request selection on the
    reference scores; ``engine_pages`` maps the chosen logical pages through the table."""
    gen = _gen(21)
    L, H = 3, 16
    lengths = [0, 65, 300, 130]
    reqs = [make_keys((n,), gen, special_scales=False) for n in lengths]
    prep = _prepared(L, len(lengths), H, gen, device, "fp32")
    want = [logits_f64(prep.q[:, b:b + 1].float().cpu(), prep.w[:, b:b + 1].cpu(), r[None])[:, 0]
            for b, r in enumerate(reqs)]
    # An offset in the middle of the widest gap near the 80th percentile of the ensemble
    # logits: no decision is within fp32 error of the threshold, so decisions must agree.
    ens = torch.sort(torch.cat([w.max(0).values for w in want if w.numel()])).values
    k = int(0.8 * len(ens))
    gaps = ens[k - 20:k + 20].diff()
    j = int(gaps.argmax())
    offset = -float((ens[k - 20 + j] + ens[k - 20 + j + 1]) / 2)
    assert float(gaps.max()) > 1e-4 * float(ens.abs().max())
    pool, table, n_chunks, ids = _paged(reqs, gen)
    out = P.score_paged(prep, pool.to(device), table.to(device), n_chunks.to(device),
                        logit_offset=offset)
    kw = dict(mode="page", recent=64, max_pages=3)
    got = select_resident(out, **kw)  # BatchScores straight in: its n_chunks are used
    for b, r in enumerate(reqs):
        s = torch.sigmoid(want[b] + offset).max(0).values.float()[None]
        per_req = select_resident(s, **kw)
        n = r.shape[0]
        assert torch.equal(got.mask[b, :n].cpu(), per_req.mask[0]), f"request {b}"
        assert not bool(got.mask[b, n:].any())
        k = per_req.pages.shape[1]
        assert torch.equal(got.pages[b, :k].cpu(), per_req.pages[0]), f"request {b}"
    engine = got.engine_pages(table.to(device)).cpu()
    for b in range(len(reqs)):
        for slot, p in enumerate(got.pages[b].tolist()):
            assert int(engine[b, slot]) == (ids[b][p] if p >= 0 else -1)
    with pytest.raises(ValueError, match="page-mode"):
        select_resident(out, mode="chunk").engine_pages(table)
    assert torch.equal(engine_page_ids(got.pages.cpu(), table), engine)


def test_pool_larger_than_2_31_bytes(device):
    """int64 addressing: one pool of more than 2**31 bytes (torch.empty: only the pages
    written are ever touched), requests on its LAST pages, and a per-layer pair of views
    whose layer offset is itself more than 2**31 bytes."""
    gen = _gen(31)
    num_pages = 2 ** 31 // C.PAGE_BYTES + 64
    assert num_pages * C.PAGE_BYTES > 2 ** 31
    big = torch.empty(num_pages, C.PAGE_BYTES, dtype=torch.uint8, device=device)
    L, H = 2, 16
    lengths = [100, 64]
    reqs = [make_keys((L, n), gen) for n in lengths]
    top = num_pages - 1
    ids = [[top, top - 3], [top - 1]]  # shuffled, on the pool's last pages
    for r, p in zip(reqs, ids):
        pages = P.rows_to_pages(r[0])
        for j, page in enumerate(p):
            big[page] = pages[j].to(device)
    table = torch.tensor([ids[0], ids[1] + [-1]], dtype=torch.int64, device=device)
    n_chunks = torch.tensor(lengths, device=device)
    prep = _prepared(L, len(lengths), H, gen, device, "fp32")
    shared = [r[0] for r in reqs]  # the shared-pool request keys (layer 0's)
    out = P.score_paged(prep, big, table, n_chunks, return_logits=True)
    _check_batch(out, prep, shared, "max", FP32_RTOL, "big pool", 0.0)

    # Two layers: layer 0 at the pool's start, layer 1 at its end (> 2**31 bytes apart).
    low = big[:8]
    high = big[num_pages - 8:]
    local = [[1, 5], [0]]
    for r, p in zip(reqs, local):
        for l, layer in enumerate((low, high)):
            pages = P.rows_to_pages(r[l])
            for j, page in enumerate(p):
                layer[page] = pages[j].to(device)
    table2 = torch.tensor([local[0], local[1] + [-1]], dtype=torch.int32, device=device)
    keys = P.page_pools([low, high])
    assert int(keys.layer_offsets[1]) * 16 > 2 ** 31
    out2 = P.score_paged(prep, keys, table2, n_chunks, return_logits=True)
    _check_batch(out2, prep, reqs, "max", FP32_RTOL, "big per-layer offset", 0.0)
    del big, low, high, keys


def test_batches_split_over_launches_and_empty(device, monkeypatch):
    """More requests than one launch takes (MAX_ROWS patched down to 2), all-empty and
    zero-request batches, and an explicit max_chunks narrower than the table."""
    import flashmemory_triton.kernels.paged as KP
    monkeypatch.setattr(KP, "MAX_ROWS", 2)
    gen = _gen(41)
    L, H = 2, 16
    lengths = [5, 0, 64, 17, 1]
    reqs = [make_keys((n,), gen) for n in lengths]
    prep = _prepared(L, len(lengths), H, gen, device, "bf16")
    pool, table, n_chunks, _ = _paged(reqs, gen, extra_pages=2)
    out = P.score_paged(prep, pool.to(device), table.to(device), n_chunks.to(device),
                        max_chunks=70, return_logits=True, ensemble="mean")
    assert out.scores.shape == (len(lengths), 70)
    _check_batch(out, prep, reqs, "mean", FP32_RTOL, "split", 0.0)
    vb = P.pack_varlen(reqs)
    out_v = P.score_varlen(prep, vb.keys.to(device), vb.cu_chunks.to(device), max_chunks=66,
                           return_logits=True, ensemble="mean")
    _check_batch(out_v, prep, reqs, "mean", FP32_RTOL, "split varlen", 0.0)

    empty = [make_keys((0,), gen) for _ in lengths]
    eb = P.pack_pool(empty, max_pages=2)
    out_e = P.score_paged(prep, torch.zeros(1, C.PAGE_BYTES, dtype=torch.uint8, device=device),
                          eb.page_table.to(device), eb.n_chunks.to(device), return_logits=True)
    assert bool((out_e.scores == 0).all()) and bool((out_e.logits == float("-inf")).all())
    prep0 = _prepared(L, 0, H, gen, device, "bf16")
    out0 = P.score_varlen(prep0, vb.keys.to(device), torch.zeros(1, dtype=torch.int64,
                                                                 device=device))
    assert out0.scores.shape == (0, 0)


def test_torch_backend_paged_and_varlen():
    """Queries prepared on the torch backend take the reference path (gathered rows), with
    the same outputs and fill; no kernel involved."""
    gen = _gen(45)
    L, H = 3, 16
    reqs = _requests(LENGTHS, gen, L)
    q = torch.randn(L, len(reqs), H, C.HEAD_DIM, generator=gen)
    w = torch.randn(L, len(reqs), H, generator=gen) / 64
    prep = ops.prepare_queries(q, w, torch.arange(len(reqs)), precision="fp32", backend="torch")
    pool, table, n_chunks, _ = _paged(reqs, gen)
    out = P.score_paged(prep, list(pool), table, n_chunks, return_logits=True, ensemble="mean",
                        logit_offset=-0.5)
    _check_batch(out, prep, reqs, "mean", FP32_RTOL, "torch paged", -0.5)
    vb = P.pack_varlen(reqs)
    out_v = P.score_varlen(prep, vb.keys, vb.cu_chunks, return_logits=True, logit_offset=-0.5)
    _check_batch(out_v, prep, reqs, "max", FP32_RTOL, "torch varlen", -0.5)


def test_unvalidated_bad_page_ids_read_nothing(device):
    """Without host validation (as under CUDA-graph capture) an out-of-range page id is
    never dereferenced: that page's chunks score NaN, the other pages are exact."""
    from flashmemory_triton.kernels.paged import batched_score_launch
    gen = _gen(51)
    L, H = 2, 16
    reqs = [make_keys((130,), gen)]
    prep = _prepared(L, 1, H, gen, device, "fp32")
    pool, table, n_chunks, _ = _paged(reqs, gen, extra_pages=0)
    table[0, 1] = 10 ** 9
    scores, logits = batched_score_launch(prep.q, prep.w, P.page_pools(pool.to(device)),
                                          n_chunks.to(device), table.to(device), max_chunks=192,
                                          precision="fp32", hw_fp8=False, return_logits=True)
    logits = logits.cpu()
    assert bool(torch.isnan(logits[:, 0, 64:128]).all())
    assert not bool(torch.isnan(logits[:, 0, :64]).any())
    assert not bool(torch.isnan(logits[:, 0, 128:130]).any())
    with pytest.raises(ValueError, match=r"page_table\[0, 1\] = 1000000000"):
        P.score_paged(prep, pool.to(device), table.to(device), n_chunks.to(device))


# --- conversions (no kernels) --------------------------------------------------------------------
def test_split_page_layout_and_round_trips():
    gen = _gen(61)
    rows = make_keys((3, 130), gen)  # e.g. three layers
    pages = P.rows_to_pages(rows)
    assert pages.shape == (3, 3, C.PAGE_BYTES)
    # design §4 byte layout: chunk i of page p: fp8 at [128 i, 128 i + 128), scale at 8192 + 4 i.
    for n in (0, 63, 64, 129):
        p, i = divmod(n, C.PAGE_CHUNKS)
        assert torch.equal(pages[1, p, 128 * i:128 * (i + 1)], rows[1, n, :128])
        assert torch.equal(pages[1, p, 8192 + 4 * i:8192 + 4 * (i + 1)], rows[1, n, 128:])
    assert not bool(pages[:, 2, 2 * 128:8192].any()) and not bool(pages[:, 2, 8192 + 8:].any())
    assert torch.equal(P.pages_to_rows(pages, 130), rows)
    assert torch.equal(P.rows_to_pages(P.pages_to_rows(pages)), pages)

    reqs = [make_keys((n,), gen) for n in (0, 1, 64, 65, 200)]
    for dtype in (torch.int32, torch.int64):
        b = P.pack_pool(reqs, page_ids=[[], [4], [0], [2, 9], [1, 3, 5, 6]], index_dtype=dtype)
        assert b.page_table.dtype == dtype and b.pool.shape == (10, C.PAGE_BYTES)
        assert b.page_table[1].tolist() == [4, -1, -1, -1]
        for got, want in zip(P.unpack_pool(b.pool, b.page_table, b.n_chunks), reqs):
            assert torch.equal(got, want)
        padded = P.pool_to_rows(b.pool, b.page_table, b.n_chunks)
        assert padded.shape == (5, 256, C.CHUNK_BYTES) and not bool(padded[1, 1:].any())
    vb = P.pack_varlen(reqs)
    assert vb.cu_chunks.tolist() == [0, 0, 1, 65, 130, 330]
    for got, want in zip(P.unpack_varlen(vb.keys, vb.cu_chunks), reqs):
        assert torch.equal(got, want)
    assert torch.equal(P.varlen_to_rows(vb.keys, vb.cu_chunks), padded[:, :200])
    back = P.varlen_to_pool(vb.keys, vb.cu_chunks)
    for got, want in zip(P.unpack_pool(*back), reqs):
        assert torch.equal(got, want)
    per_layer = [make_keys((2, n), gen) for n in (3, 70)]
    pb = P.pack_pool(per_layer)
    assert pb.pool.shape == (2, 3, C.PAGE_BYTES)
    assert P.pool_to_rows(pb.pool, pb.page_table, pb.n_chunks).shape == (2, 2, 128, 132)
    for got, want in zip(P.unpack_pool(list(pb.pool), pb.page_table, pb.n_chunks), per_layer):
        assert torch.equal(got, want)


def test_conversion_and_scoring_errors(device):
    gen = _gen(71)
    reqs = [make_keys((n,), gen) for n in (10, 70)]
    with pytest.raises(ValueError, match="shared pages must hold equal bytes"):
        P.pack_pool(reqs, page_ids=[[0], [0, 1]])
    with pytest.raises(ValueError, match="page_ids\\[1\\] has 1 pages"):
        P.pack_pool(reqs, page_ids=[[0], [1]])
    with pytest.raises(ValueError, match="num_pages"):
        P.pack_pool(reqs, num_pages=2)
    with pytest.raises(ValueError, match="ROW layout"):
        P.pages_to_rows(torch.zeros(2, 64, 132, dtype=torch.uint8))
    b = P.pack_pool(reqs)
    prep = _prepared(2, 2, 16, gen, device, "bf16")
    pool, table, n = b.pool.to(device), b.page_table.to(device), b.n_chunks.to(device)
    with pytest.raises(ValueError, match="ROW layout"):
        P.score_paged(prep, pool.view(-1, 64, 132), table, n)
    with pytest.raises(TypeError, match="page_table"):
        P.score_paged(prep, pool, table.float(), n)
    with pytest.raises(ValueError, match="n_chunks must be in"):
        P.score_paged(prep, pool, table, n + 100)
    with pytest.raises(ValueError, match="n_chunks must be in"):
        P.score_paged(prep, pool, table, n, max_chunks=20)
    with pytest.raises(ValueError, match="queries have B=2"):
        P.score_paged(prep, pool, table[:1], n[:1])
    with pytest.raises(ValueError, match="2 layers but the queries have L=2|hold 3 layers"):
        P.score_paged(prep, [pool, pool, pool], table, n)
    # (strided pools are read, not refused: tests/test_deepgemm.py, engine shapes)
    vb = P.pack_varlen(reqs)
    keys, cu = vb.keys.to(device), vb.cu_chunks.to(device)
    with pytest.raises(ValueError, match="non-decreasing"):
        P.score_varlen(prep, keys, cu.flip(0))
    with pytest.raises(ValueError, match="exceeds"):
        P.score_varlen(prep, keys[:50], cu)
    with pytest.raises(ValueError, match="shorter than the longest"):
        P.score_varlen(prep, keys, cu, max_chunks=20)
    with pytest.raises(TypeError, match="varlen_buffers"):
        P.score_varlen(prep, P.page_pools(pool), cu)


def test_retriever_paged_and_varlen_api(device):
    """``FlashMemoryRetriever.score_paged`` / ``score_varlen`` (per-layer hidden states and
    per-layer pools, as serving) on the Triton backend equal the torch backend, which runs the
    release's row-format path on the gathered rows."""
    from flashmemory_triton import FlashMemoryRetriever
    gen = _gen(81)
    hidden, rank, H = 64, 32, 8
    states = retriever_states(gen, hidden, rank, H)
    lengths = [65, 0, 3]
    reqs = [make_keys((3, n), gen) for n in lengths]
    pool, table, n_chunks, _ = _paged(reqs, gen)
    pools = [p.to(device) for p in pool.unbind(0)]
    table, n_chunks = table.to(device), n_chunks.to(device)
    vb = P.pack_varlen(reqs)
    h = torch.randn(3, len(lengths), hidden, generator=gen).to(device)
    pos = torch.tensor([0, 7, 10 ** 6], device=device)
    mt = FlashMemoryRetriever(states, device=device, backend="triton", precision="fp32",
                              logit_offset=0.1)
    mr = FlashMemoryRetriever(states, device=device, backend="torch", logit_offset=0.1)
    for mode in ("max", "mean"):
        got = mt.score_paged(h, pools, table, n_chunks, pos, mode=mode, return_logits=True)
        want = mr.score_paged(h, pools, table, n_chunks, pos, mode=mode, return_logits=True)
        _close_filled(got.logits, want.logits, RETRIEVER_RTOL, f"paged logits {mode}")
        _close_filled(got.scores, want.scores, RETRIEVER_RTOL, f"paged scores {mode}")
    # varlen on the same requests, and the release path on the padded rows
    got_v = mt.score_varlen(h, vb.keys.to(device), vb.cu_chunks.to(device), pos,
                            return_logits=True)
    _close_filled(got_v.logits, got.logits[..., :65], FP32_RTOL, "varlen vs paged")
    want_v = mr.score_varlen(h, vb.keys.to(device), vb.cu_chunks.to(device), pos)
    _close_filled(got_v.scores, want_v.scores, RETRIEVER_RTOL, "varlen scores")
    res = select_resident(got, mode="page", recent=2, max_pages=1)
    assert res.n_real.tolist() == lengths
    assert res.engine_pages(table)[:, 0].tolist()[1] == -1
    with pytest.raises(ValueError, match="hidden states have B=2"):
        mt.score_paged(h[:, :2], pools, table, n_chunks, pos[:2])


# --- review follow-ups: strided lengths, partial shared pages, wide fills, capture ---------------
def test_strided_lengths_are_read_as_given(device):
    """n_chunks / cu_chunks as strided views (e.g. a column of an engine's metadata table):
    the kernel must read the values the view shows, not the memory next to them."""
    gen = _gen(11)
    lengths = [70, 3, 0, 129]
    reqs = [make_keys((n,), gen) for n in lengths]
    prep = _prepared(3, len(reqs), 16, gen, device, "fp32")
    pool, table, n_chunks, _ = _paged(reqs, gen, share=False)
    junk = torch.full_like(n_chunks, 9999)
    strided = torch.stack([n_chunks, junk], 1)[:, 0]
    assert strided.stride(0) == 2
    out = P.score_paged(prep, pool.to(device), table.to(device), strided.to(device),
                        return_logits=True)
    _check_batch(out, prep, reqs, "max", FP32_RTOL, "paged strided n_chunks", 0.0)
    vb = P.pack_varlen(reqs)
    cu = torch.stack([vb.cu_chunks, torch.full_like(vb.cu_chunks, 10 ** 6)], 1)[:, 0]
    out = P.score_varlen(prep, vb.keys.to(device), cu.to(device), return_logits=True)
    _check_batch(out, prep, reqs, "max", FP32_RTOL, "varlen strided cu_chunks", 0.0)


@pytest.mark.parametrize("order", ["short_first", "long_first"])
def test_shared_partial_page_in_either_order(order):
    """Prefix sharing of a partial page: a 10-chunk request whose chunks are the first 10 of a
    64-chunk request's page. Packing must not let the short one zero the long one's slots."""
    gen = _gen(12)
    long = make_keys((64,), gen)
    short = long[:10].clone()
    reqs = [short, long] if order == "short_first" else [long, short]
    batch = P.pack_pool(reqs, page_ids=[[0], [0]])
    back = P.unpack_pool(batch.pool, batch.page_table, batch.n_chunks)
    assert all(torch.equal(a, b) for a, b in zip(back, reqs))
    # A partial page that disagrees with its sharer on a real chunk is still refused.
    other = short.clone()
    other[3, 0] ^= 1
    with pytest.raises(ValueError, match="shared pages must hold equal bytes"):
        P.pack_pool([long, other], page_ids=[[0], [0]])


def test_wide_output_and_many_requests_in_one_launch(device):
    """20 requests in one launch (a 32-row request block) and an output wider than one fill
    block (2100 > FILL_N = 1024 columns): every element past a length gets the fill."""
    gen = _gen(13)
    lengths = [(7 * b) % 23 for b in range(20)]
    reqs = [make_keys((n,), gen) for n in lengths]
    prep = _prepared(2, len(reqs), 16, gen, device, "bf16")
    pool, table, n_chunks, _ = _paged(reqs, gen, share=False)
    out = P.score_paged(prep, pool.to(device), table.to(device), n_chunks.to(device),
                        max_chunks=2100, return_logits=True)
    assert out.scores.shape == (20, 2100)
    scores, logits = out.scores.cpu(), out.logits.cpu()
    for b, n in enumerate(lengths):
        assert bool((scores[b, n:] == 0).all()) and bool((logits[:, b, n:] == float("-inf")).all())
        assert bool(torch.isfinite(scores[b, :n]).all()), b


def test_returned_lengths_are_a_fresh_clamped_tensor(device):
    gen = _gen(14)
    reqs = [make_keys((n,), gen) for n in (5, 70)]
    prep = _prepared(1, 2, 16, gen, device, "fp32")
    pool, table, n_chunks, _ = _paged(reqs, gen, share=False)
    n64 = n_chunks.to(torch.int64).to(device)
    out = P.score_paged(prep, pool.to(device), table.to(device), n64)
    n64[0] = 0  # the caller reuses its buffer: the result must not change with it
    assert out.n_chunks.tolist() == [5, 70]


def test_varlen_torch_backend_refuses_short_max_chunks_like_triton(device):
    """A request longer than max_chunks is an error on both backends, never a truncation."""
    gen = _gen(15)
    reqs = [make_keys((n,), gen) for n in (30, 5)]
    vb = P.pack_varlen(reqs)
    for backend in ("torch", "triton"):
        q = torch.randn(1, 2, 16, C.HEAD_DIM, generator=gen).to(device)
        w = torch.randn(1, 2, 16, generator=gen).to(device)
        prep = ops.prepare_queries(q, w, torch.tensor([1, 2]).to(device), backend=backend)
        with pytest.raises(ValueError, match="max_chunks = 8 is shorter than the longest"):
            P.score_varlen(prep, vb.keys.to(device), vb.cu_chunks.to(device), max_chunks=8)
    with pytest.raises(ValueError, match="max_chunks = 8 is shorter than the longest"):
        P.varlen_to_rows(vb.keys, vb.cu_chunks, 8)


def test_per_layer_lists_refused_under_capture(device, monkeypatch):
    """Under CUDA graph capture (simulated here) raw per-layer lists are refused: the graph
    would keep reading a layer-offsets tensor that only a per-call object held. A held
    page_pools / varlen_buffers object, or a single shared buffer, is accepted."""
    gen = _gen(16)
    reqs = [make_keys((2, n), gen) for n in (5, 70)]
    prep = _prepared(2, 2, 16, gen, device, "fp32")
    batch = P.pack_pool(reqs)
    pools = [batch.pool[0].clone().to(device), batch.pool[1].clone().to(device)]
    table, n = batch.page_table.to(device), batch.n_chunks.to(device)
    held = P.page_pools(pools)
    vb = P.pack_varlen(reqs)
    keys = [vb.keys[0].clone().to(device), vb.keys[1].clone().to(device)]
    held_keys = P.varlen_buffers(keys)
    cu = vb.cu_chunks.to(device)
    monkeypatch.setattr(P, "_capturing", lambda dev: True)
    with pytest.raises(ValueError, match="page_pools\\(...\\) object built before capture"):
        P.score_paged(prep, pools, table, n)
    with pytest.raises(ValueError, match="varlen_buffers\\(...\\) object built before capture"):
        P.score_varlen(prep, keys, cu, max_chunks=70)
    want = P.score_paged(prep, held, table, n, max_chunks=70).scores
    got = P.score_varlen(prep, held_keys, cu, max_chunks=70).scores
    assert_close(got.cpu(), want.cpu(), FP32_RTOL, "held buffers under capture, varlen vs paged")


# --- paged v2 (kernels/paged_v2.py): the persistent per-request page walk --------------------
# Lengths around every page boundary, empty requests first, in the middle and last, a long one:
# with 1, 2 or 5 programs the slices start and end inside requests, on their boundaries and
# inside a partial last page. Requests 3-5 share their first page; request 5 has a NaN byte
# and an infinite scale (``_requests``).
V2_LENGTHS = LENGTHS + [0, 129, 7 * 64 + 5, 0]


def _v2_launch(prep, keys, n_chunks, table, M, kernel="v2", **kw):
    from flashmemory_triton.kernels import paged_v2
    from flashmemory_triton.kernels.paged import batched_score_launch
    if kernel == "v2":
        return paged_v2.paged_v2_launch(prep.q, prep.w, keys, n_chunks, table, max_chunks=M,
                                        precision=prep.precision, hw_fp8=False, **kw)
    return batched_score_launch(prep.q, prep.w, keys, n_chunks, table, max_chunks=M,
                                precision=prep.precision, hw_fp8=False, kernel=kernel, **kw)


@pytest.mark.parametrize("precision,prefetch,programs", [
    ("bf16", True, 1), ("bf16", True, 5), ("bf16", False, 2), ("fp8", True, 2),
    ("fp8", False, 5)])
def test_paged_v2_matches_reference(precision, prefetch, programs, device, monkeypatch):
    """v2 against the float64 reference per request (FP32_RTOL: the same prepared q, only fp32
    accumulation error, as every kernel here), both ensembles, with and without logits (the
    scores must not change when logits are written), both loop variants, and program counts
    whose slices cut requests anywhere (interpreter; on a GPU one program per SM)."""
    from flashmemory_triton.kernels import paged_v2
    monkeypatch.setattr(paged_v2, "INTERPRETER_PROGRAMS", programs)
    gen = _gen(90 + 7 * programs + prefetch + 3 * (precision == "fp8"))
    L, H = 3, 16
    reqs = _requests(V2_LENGTHS, gen)
    prep = _prepared(L, len(reqs), H, gen, device, precision)
    pool, table, n_chunks, _ = _paged(reqs, gen, share=True)
    keys = P.page_pools(pool.to(device))
    table, n_chunks = table.to(device), n_chunks.to(device)
    M = table.shape[1] * C.PAGE_CHUNKS
    for ensemble in ("max", "mean"):
        scores, logits = _v2_launch(prep, keys, n_chunks, table, M, ensemble=ensemble,
                                    logit_offset=-0.125, return_logits=True, prefetch=prefetch)
        tag = f"v2 {precision} {ensemble} prefetch={prefetch} P={programs}"
        _check_batch(P.BatchScores(scores, logits, n_chunks), prep, reqs, ensemble, FP32_RTOL,
                     tag, -0.125)
        alone, none = _v2_launch(prep, keys, n_chunks, table, M, ensemble=ensemble,
                                 logit_offset=-0.125, prefetch=prefetch)
        assert none is None
        assert torch.equal(alone.isnan(), scores.isnan()), tag
        assert_close(alone.cpu(), scores.cpu(), FP32_RTOL, f"{tag}: without logits")


def test_paged_v2_padded_stride_int64_table_and_split_launches(device, monkeypatch):
    """An engine's padded page stride (8496 bytes, read in place), an int64 table and lengths,
    a max_chunks narrower than the table, and more requests than one launch takes (MAX_ROWS
    patched to 3): every launch's rows and fill land in their own output rows."""
    from flashmemory_triton.kernels import paged_v2
    monkeypatch.setattr(paged_v2, "MAX_ROWS", 3)
    gen = _gen(97)
    L, H = 2, 16
    lengths = [5, 0, 64, 17, 130, 1, 66]
    reqs = [make_keys((n,), gen) for n in lengths]
    prep = _prepared(L, len(reqs), H, gen, device, "bf16")
    pool, table, n_chunks, _ = _paged(reqs, gen, extra_pages=3, index_dtype=torch.int64,
                                      share=False)
    stride = C.PAGE_BYTES + 48
    padded = torch.full((pool.shape[0], stride), NAN_BYTE, dtype=torch.uint8)
    padded[:, :C.PAGE_BYTES] = pool
    keys = P.page_pools(padded.to(device)[:, :C.PAGE_BYTES])
    assert keys.page_stride == stride and keys.shared
    M = 140
    for ensemble in ("max", "mean"):
        scores, logits = _v2_launch(prep, keys, n_chunks.to(device), table.to(device), M,
                                    ensemble=ensemble, return_logits=True)
        assert scores.shape == (len(reqs), M)
        _check_batch(P.BatchScores(scores, logits, n_chunks), prep, reqs, ensemble, FP32_RTOL,
                     f"v2 padded stride {ensemble}", 0.0)


def test_paged_v2_bad_page_ids_read_nothing(device):
    """Without host validation an out-of-range page id (too big or negative) is never
    dereferenced by v2 either: that page's chunks score NaN, every other chunk is exact."""
    gen = _gen(98)
    L, H = 2, 16
    reqs = [make_keys((200,), gen, special_scales=False), make_keys((70,), gen)]
    prep = _prepared(L, 2, H, gen, device, "fp8")
    pool, table, n_chunks, _ = _paged(reqs, gen, extra_pages=0, share=False)
    table[0, 1] = 10 ** 9
    table[1, 1] = -5
    keys = P.page_pools(pool.to(device))
    scores, logits = _v2_launch(prep, keys, n_chunks.to(device), table.to(device), 256,
                                return_logits=True)
    logits = logits.cpu()
    bad = torch.zeros(2, 256, dtype=torch.bool)
    bad[0, 64:128] = True
    bad[1, 64:70] = True
    real = torch.arange(256)[None, :] < n_chunks[:, None]
    for l in range(L):
        assert torch.equal(torch.isnan(logits[l]) & real, bad), l
    want = logits_f64(prep.q[:, :1].float().cpu(), prep.w[:, :1].cpu(), reqs[0][None])[:, 0]
    assert_close(logits[:, 0, :64], want[:, :64], FP32_RTOL, "page before the bad one")
    assert_close(logits[:, 0, 128:200], want[:, 128:], FP32_RTOL, "page after the bad one")


def test_paged_v1_still_selectable_and_v2_scope(device):
    """``kernel="v1"`` runs the kernel v2 replaced (kept as a bench provider) with the same
    result; ``kernel="v2"`` refuses what v2 does not serve (varlen rows, per-layer pools) by
    name before any launch; ``auto`` keeps v1 for tf32/fp32 and per-layer pools."""
    from flashmemory_triton.kernels import paged_v2
    from flashmemory_triton.kernels.paged import batched_score_launch
    gen = _gen(99)
    L, H = 3, 16
    reqs = _requests(LENGTHS, gen)
    prep = _prepared(L, len(reqs), H, gen, device, "bf16")
    pool, table, n_chunks, _ = _paged(reqs, gen)
    keys = P.page_pools(pool.to(device))
    table, n_chunks = table.to(device), n_chunks.to(device)
    M = table.shape[1] * C.PAGE_CHUNKS
    s1, g1 = _v2_launch(prep, keys, n_chunks, table, M, kernel="v1", return_logits=True)
    _check_batch(P.BatchScores(s1, g1, n_chunks), prep, reqs, "max", FP32_RTOL, "v1", 0.0)
    s2, g2 = _v2_launch(prep, keys, n_chunks, table, M, kernel="auto", return_logits=True)
    _close_filled(g2, g1, FP32_RTOL, "auto vs v1 logits")
    with pytest.raises(ValueError, match="kernel must be"):
        _v2_launch(prep, keys, n_chunks, table, M, kernel="v3")
    vb = P.pack_varlen(reqs)
    vkeys = P.varlen_buffers([vb.keys.to(device)] * L)  # per-layer varlen buffers
    with pytest.raises(ValueError, match="paged v2 takes one shared pool"):
        batched_score_launch(prep.q, prep.w, vkeys, vb.cu_chunks.to(device), None,
                             max_chunks=M, precision="bf16", hw_fp8=False, kernel="v2")
    layered = P.page_pools([pool.to(device)] * L)
    with pytest.raises(ValueError, match="paged v2 takes one shared pool"):
        _v2_launch(prep, layered, n_chunks, table, M)
    with pytest.raises(ValueError, match="paged v2 takes one shared pool"):  # table: pages
        _v2_launch(prep, P.varlen_buffers(vb.keys.to(device)), n_chunks, table, M)
    assert not paged_v2.uses_v2(layered, True, "bf16", "max", False, device)
    assert not paged_v2.uses_v2(vkeys, False, "bf16", "max", False, device)
    assert not paged_v2.uses_v2(keys, True, "tf32", "max", False, device)
    shared_rows = P.varlen_buffers(vb.keys.to(device))
    assert paged_v2.uses_v2(shared_rows, False, "fp8", "max", False, device) == (
        device.type != "cuda" or paged_v2.serves("fp8", False, False, paged=False))
    assert paged_v2.uses_v2(keys, True, "fp8", "max", False, device) == (
        device.type != "cuda" or paged_v2.serves("fp8", False, False))


@pytest.mark.parametrize("precision,prefetch,programs", [("bf16", True, 2), ("fp8", False, 5)])
def test_varlen_v2_matches_reference_and_reads_nothing_past_the_buffer(precision, prefetch,
                                                                        programs, device,
                                                                        monkeypatch):
    """v2 on varlen rows (one shared buffer): both ensembles and loop variants against the
    float64 reference (FP32_RTOL, as above), program slices cutting requests anywhere; then,
    without host validation, a last request running 100 rows past the buffer: those rows score
    NaN (never read), every other chunk is unchanged."""
    from flashmemory_triton.kernels import paged_v2
    monkeypatch.setattr(paged_v2, "INTERPRETER_PROGRAMS", programs)
    gen = _gen(110 + programs)
    L, H = 3, 16
    reqs = _requests(V2_LENGTHS, gen)
    prep = _prepared(L, len(reqs), H, gen, device, precision)
    vb = P.pack_varlen(reqs)
    keys = P.varlen_buffers(vb.keys.to(device))
    cu = vb.cu_chunks.to(device)
    M = max(V2_LENGTHS) + 3
    n_chunks = cu.diff().cpu()
    for ensemble in ("max", "mean"):
        scores, logits = paged_v2.paged_v2_launch(
            prep.q, prep.w, keys, cu, None, max_chunks=M, precision=precision, hw_fp8=False,
            ensemble=ensemble, logit_offset=0.5, return_logits=True, prefetch=prefetch)
        _check_batch(P.BatchScores(scores, logits, n_chunks), prep, reqs, ensemble, FP32_RTOL,
                     f"varlen v2 {precision} {ensemble} prefetch={prefetch} P={programs}", 0.5)
    over = cu.clone()
    over[-1] += 100  # the last request (empty) now claims 100 rows past the buffer's end
    s2, g2 = paged_v2.paged_v2_launch(prep.q, prep.w, keys, over, None, max_chunks=M + 100,
                                      precision=precision, hw_fp8=False, return_logits=True,
                                      prefetch=prefetch)
    g2 = g2.cpu()
    assert bool(torch.isnan(g2[:, -1, :100]).all())
    assert bool((g2[:, -1, 100:] == float("-inf")).all())
    assert torch.equal(g2[:, :-1, :M].isnan(), logits.cpu()[:, :-1].isnan())
