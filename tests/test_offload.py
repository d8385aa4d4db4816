"""OffloadEngine (design §7): byte checks of the reserve and lookup table after every cycle."""

from __future__ import annotations

import pytest
import torch

from flashmemory_triton import constants as C
from flashmemory_triton import select_resident
from flashmemory_triton.offload import ChunkHistory, OffloadEngine


def _payload(B, N, W=C.ATTN_KV_BYTES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, N, W), dtype=torch.uint8, generator=g)


def _check_cycle(engine, truth, mask, evicted_before=None):
    """The reserve holds exactly the set's bytes, addressed by a consistent lookup table.

    ``truth`` is the test's own copy of every row's chunks (list per row of uint8 [n, W]).
    """
    ps, W = engine.page_size, engine.row_bytes
    lookup = engine.lookup.cpu()
    mask = mask.cpu()
    B, N = mask.shape
    assert lookup.dtype == torch.int64
    # mapped exactly where the set is
    assert torch.equal(lookup[:, :N] >= 0, mask)
    assert not bool((lookup[:, N:] >= 0).any())
    slots = lookup[lookup >= 0]
    assert slots.unique().numel() == slots.numel()  # no two chunks share a slot
    flat = engine.reserve.cpu().view(-1, W)
    for b in range(B):
        idx = mask[b].nonzero().flatten()
        got = flat[lookup[b, idx]]
        assert torch.equal(got, truth[b][idx]), f"row {b}: reserve bytes differ from host"
        # whole pages: every resident chunk of a page sits in the same cell at its offset
        assert torch.equal(lookup[b, idx] % ps, idx % ps)
        cells = lookup[b, idx] // ps
        assert torch.equal(cells, engine.page_cell[b, idx // ps])
    assert int((engine.cell_row >= 0).sum()) <= engine.n_cells
    engine.check_consistency()


def _grow(truth, new):
    return [torch.cat([t, n]) for t, n in zip(truth, new)]


@pytest.mark.parametrize("retain", [pytest.param(True, id="retain"),
                                    pytest.param(False, id="evict-all")])
def test_cycles_with_appends_byte_exact(device, retain):
    B, N0, ps = 2, 150, 16
    hist = _payload(B, N0)
    truth = list(hist)
    eng = OffloadEngine.from_history(hist, reserve_pages=2 * 4, page_size=ps, device=device,
                                     retain_unselected=retain)
    assert eng.reserve.device.type == torch.device(device).type
    g = torch.Generator().manual_seed(1)
    moved = 0
    for cycle in range(8):
        n = eng.n_chunks
        scores = torch.rand(B, int(n.max()), generator=g).to(device)
        rs = select_resident(scores, mode="page", n_chunks=n.to(device), recent=20, page_size=ps,
                             max_pages=4)
        before = {c: (int(eng.cell_row[c]), int(eng.cell_page[c])) for c in range(eng.n_cells)}
        stats = eng.apply(rs)
        _check_cycle(eng, truth, rs.mask)
        need = int(rs.page_mask().sum())
        assert stats.pages_needed == need
        assert stats.page_hits + stats.page_misses == need
        assert stats.bytes_moved == stats.page_misses * ps * eng.row_bytes
        assert stats.chunks_resident == int(rs.mask.sum())
        assert stats.bytes_resident == stats.chunks_resident * eng.row_bytes
        if cycle == 0:
            assert stats.page_hits == 0
        # evicted pages are gone from the page table
        needed = rs.page_mask().cpu()
        gone = [bp for bp in before.values() if bp[0] >= 0 and not
                (bp[1] < needed.shape[1] and needed[bp])]
        if not retain:
            assert stats.pages_evicted == len(gone)
            assert all(int(eng.page_cell[b, p]) == -1 for b, p in gone)
        moved += stats.bytes_moved
        new = _payload(B, 7, seed=100 + cycle)
        eng.append(new)
        truth = _grow(truth, new)
    assert eng.totals["bytes_moved"] == moved
    assert int(eng.n_chunks[0]) == N0 + 8 * 7


def test_eviction_is_oldest_first_and_retained_pages_hit(device):
    ps, N = 4, 6 * 4
    truth = list(_payload(1, N))
    eng = OffloadEngine.from_history(torch.stack(truth), reserve_pages=3, page_size=ps,
                                     device=device)

    def pages(*ps_):
        m = torch.zeros(1, N, dtype=torch.bool)
        for p in ps_:
            m[0, p * ps:(p + 1) * ps] = True
        return m.to(device)

    s = eng.apply(pages(0, 1, 2))
    assert (s.page_misses, s.pages_evicted) == (3, 0)
    s = eng.apply(pages(0, 2))  # page 1 leaves the set but keeps its cell
    assert (s.page_hits, s.page_misses, s.pages_evicted) == (2, 0, 0)
    assert int(eng.page_cell[0, 1]) >= 0 and not bool((eng.lookup[0, 4:8] >= 0).any())
    s = eng.apply(pages(0, 2, 3))  # page 1 (last selected at cycle 0) is the oldest
    assert (s.page_hits, s.page_misses, s.pages_evicted) == (2, 1, 1)
    assert int(eng.page_cell[0, 1]) == -1
    _check_cycle(eng, truth, pages(0, 2, 3))
    s = eng.apply(pages(2, 3))
    s = eng.apply(pages(2, 3, 4))  # page 0 now the least recently selected
    assert int(eng.page_cell[0, 0]) == -1 and s.pages_evicted == 1
    s = eng.apply(pages(2, 3, 4))  # nothing moves between identical sets
    assert (s.page_hits, s.page_misses, s.bytes_moved) == (3, 0, 0)
    _check_cycle(eng, truth, pages(2, 3, 4))


def test_oldest_means_least_recently_selected_not_first_loaded(device):
    ps, N = 4, 5 * 4
    eng = OffloadEngine.from_history(_payload(1, N), reserve_pages=3, page_size=ps, device=device)

    def pages(*ps_):
        m = torch.zeros(1, N, dtype=torch.bool)
        for p in ps_:
            m[0, p * ps:(p + 1) * ps] = True
        return m.to(device)

    eng.apply(pages(0, 1, 2))  # loaded in order 0, 1, 2 (all last selected at cycle 0)
    eng.apply(pages(0))  # page 0 selected at cycle 1
    eng.apply(pages(1))  # page 1 selected at cycle 2; page 2 is now the stalest
    s = eng.apply(pages(3))
    assert s.pages_evicted == 1
    assert int(eng.page_cell[0, 2]) == -1  # least recently selected goes first ...
    assert int(eng.page_cell[0, 0]) >= 0  # ... not the first loaded
    s = eng.apply(pages(3, 4))
    assert int(eng.page_cell[0, 0]) == -1 and int(eng.page_cell[0, 1]) >= 0


def test_stale_partial_page_is_recopied(device):
    ps = 8
    truth = list(_payload(1, 10))
    eng = OffloadEngine.from_history(torch.stack(truth), reserve_pages=2, page_size=ps,
                                     device=device)
    full = torch.ones(1, 10, dtype=torch.bool, device=device)
    eng.apply(full)
    new = _payload(1, 3, seed=5)
    eng.append(new)
    truth = _grow(truth, new)
    s = eng.apply(torch.ones(1, 13, dtype=torch.bool, device=device))
    assert (s.page_hits, s.page_misses) == (1, 1)  # page 1 grew from 2 to 5 chunks
    _check_cycle(eng, truth, torch.ones(1, 13, dtype=torch.bool))


def test_chunk_mask_maps_only_selected_chunks(device):
    ps = 4
    truth = list(_payload(2, 12))
    eng = OffloadEngine.from_history(torch.stack(truth), reserve_pages=4, page_size=ps,
                                     device=device)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, [1, 9]] = True
    mask[1, [0, 1, 2, 3, 11]] = True
    s = eng.apply(mask.to(device))
    assert s.pages_needed == 4 and s.chunks_resident == 7
    _check_cycle(eng, truth, mask)
    rows, present = eng.read(torch.tensor([[9, 1, 2, -1], [11, 4, 0, 50]], device=device))
    assert present.cpu().tolist() == [[True, True, False, False], [True, False, True, False]]
    assert torch.equal(rows[0, 0].cpu(), truth[0][9]) and torch.equal(rows[1, 2].cpu(), truth[1][0])
    assert not bool(rows[~present].any())  # absent chunks read as zeros


def test_reserve_too_small_raises_before_touching_state(device):
    ps = 4
    eng = OffloadEngine.from_history(_payload(1, 16), reserve_pages=2, page_size=ps,
                                     device=device)
    eng.apply(torch.tensor([[True] * 4 + [False] * 12], device=device))
    snapshot = (eng.reserve.clone(), eng._lookup.clone(), eng.page_cell.clone(),
                eng.cell_row.clone(), eng.cycle)
    with pytest.raises(ValueError, match="reserve_pages=2"):
        eng.apply(torch.ones(1, 16, dtype=torch.bool, device=device))
    assert torch.equal(eng.reserve, snapshot[0]) and torch.equal(eng._lookup, snapshot[1])
    assert torch.equal(eng.page_cell, snapshot[2]) and torch.equal(eng.cell_row, snapshot[3])
    assert eng.cycle == snapshot[4]


def test_failed_copy_never_leaves_corrupt_mappings(device, monkeypatch):
    ps = 4
    truth = list(_payload(1, 16))
    eng = OffloadEngine.from_history(torch.stack(truth), reserve_pages=2, page_size=ps,
                                     device=device)
    first = torch.tensor([[True] * 8 + [False] * 8], device=device)
    eng.apply(first)

    def half_done(plan):  # scribble into the target cells, then fail like an OOM would
        eng.reserve[plan.load_cell] = 0xAB
        raise RuntimeError("simulated copy failure")

    monkeypatch.setattr(eng, "_copy_pages", half_done)
    with pytest.raises(RuntimeError, match="simulated"):
        eng.apply(torch.tensor([[True] * 4 + [False] * 8 + [True] * 4], device=device))
    eng.check_consistency()  # no cell claims bytes it does not hold
    lookup = eng.lookup.cpu()
    flat = eng.reserve.cpu().view(-1, eng.row_bytes)
    for n in (lookup[0] >= 0).nonzero().flatten().tolist():
        assert torch.equal(flat[lookup[0, n]], truth[0][n])
    monkeypatch.undo()
    eng.apply(first)
    _check_cycle(eng, truth, first)


@pytest.mark.parametrize("row_shape,dtype", [
    pytest.param((C.CHUNK_BYTES,), torch.uint8, id="key-132B"),
    pytest.param((3, 5), torch.float32, id="f32-3x5"),
    pytest.param((7,), torch.bfloat16, id="bf16-7"),
])
def test_any_payload(device, row_shape, dtype):
    g = torch.Generator().manual_seed(3)
    hist = (torch.randn(2, 20, *row_shape, generator=g) * 100).to(dtype)
    eng = OffloadEngine.from_history(hist, reserve_pages=10, page_size=4, device=device)
    assert eng.row_bytes == hist[0, 0].numel() * hist.element_size()
    mask = torch.rand(2, 20, generator=g) > 0.5
    eng.apply(mask.to(device))
    idx = torch.arange(20).expand(2, 20).contiguous()
    rows, present = eng.read(idx.to(device))
    assert rows.dtype == dtype and rows.shape == (2, 20, *row_shape)
    assert torch.equal(present.cpu(), mask)
    assert torch.equal(rows.cpu()[mask].view(torch.uint8), hist[mask].view(torch.uint8))
    assert eng.reserve_rows().shape == (10 * 4, *row_shape)


def test_ragged_rows_and_growth(device):
    eng = OffloadEngine(3, (8,), torch.uint8, reserve_pages=9, page_size=4, device=device)
    assert eng.history.capacity == 0 and eng.lookup.shape == (3, 0)
    truth = [torch.zeros(0, 8, dtype=torch.uint8) for _ in range(3)]
    for step in range(6):
        new = _payload(3, 5, W=8, seed=step)
        counts = [5, step % 3, 0]
        eng.append(new, counts=counts)
        truth = [torch.cat([t, new[b, :c]]) for b, (t, c) in enumerate(zip(truth, counts))]
        assert eng.n_chunks.tolist() == [t.shape[0] for t in truth]
        assert eng.history.capacity % 4 == 0
        n = eng.n_chunks
        rs = select_resident(torch.rand(3, int(n.max())).to(device), mode="page",
                             n_chunks=n.to(device), recent=2, page_size=4, max_pages=3)
        eng.apply(rs)
        _check_cycle(eng, truth, rs.mask)
    eng.append(torch.zeros(3, 0, 8, dtype=torch.uint8))  # appending nothing is fine
    assert eng.n_chunks.tolist() == [t.shape[0] for t in truth]
    assert eng.full_bytes == sum(t.shape[0] for t in truth) * 8
    assert eng.reserve_bytes == 9 * 4 * 8


def test_large_offsets_use_int64():
    h = ChunkHistory(1, 1, page_size=64, capacity=0)
    assert h.lengths.dtype == torch.int64
    eng = OffloadEngine(1, (1,), reserve_pages=1, page_size=64)
    assert eng.lookup.dtype == torch.int64 and eng.page_cell.dtype == torch.int64


@pytest.mark.parametrize("call,exc,match", [
    pytest.param(lambda e: e.apply(torch.ones(2, 30, dtype=torch.bool)), ValueError,
                 "past row", id="mask-beyond-history"),
    pytest.param(lambda e: e.apply(torch.ones(3, 10, dtype=torch.bool)), ValueError, r"\[2, N\]",
                 id="mask-batch"),
    pytest.param(lambda e: e.apply(torch.ones(2, 10)), TypeError, "bool", id="mask-float"),
    pytest.param(lambda e: e.append(torch.zeros(2, 3, 9, dtype=torch.uint8)), ValueError,
                 "payload", id="append-width"),
    pytest.param(lambda e: e.append(torch.zeros(2, 3, 8)), TypeError, "payload",
                 id="append-dtype"),
    pytest.param(lambda e: e.append(torch.zeros(2, 3, 8, dtype=torch.uint8), counts=[4, 0]),
                 ValueError, "counts", id="counts-too-big"),
    pytest.param(lambda e: e.read(torch.zeros(3, 2, dtype=torch.int64)), ValueError, "chunks",
                 id="read-batch"),
])
def test_bad_input(call, exc, match):
    eng = OffloadEngine.from_history(_payload(2, 20, W=8), reserve_pages=4, page_size=4)
    with pytest.raises(exc, match=match):
        call(eng)


def test_bad_construction():
    with pytest.raises(ValueError, match="reserve_pages"):
        OffloadEngine(1, (8,), reserve_pages=-1)
    with pytest.raises(ValueError, match="row_shape"):
        OffloadEngine(1, (0,), reserve_pages=1)
    with pytest.raises(TypeError, match="dtype"):
        OffloadEngine(1, (8,), "uint8", reserve_pages=1)


# --- all or nothing (issue 14): a refused or failed call leaves the engine as it was -------------
def _state(eng):
    """Everything an engine holds, cloned (host bookkeeping, device reserve and lookup)."""
    return dict(data=eng.history.data.clone(), lengths=eng.history.lengths.clone(),
                page_cell=eng.page_cell.clone(), lookup=eng._lookup.clone(),
                reserve=eng.reserve.clone(), cell_row=eng.cell_row.clone(),
                cell_page=eng.cell_page.clone(), cell_valid=eng.cell_valid.clone(),
                cell_loaded=eng.cell_loaded.clone(), cell_used=eng.cell_used.clone(),
                cycle=eng.cycle, totals=dict(eng.totals))


def assert_same_state(eng, before):
    after = _state(eng)
    for k, v in before.items():
        same = torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k]
        assert same, f"engine state {k!r} changed"


def _engine_16(device, capacity=0):
    eng = OffloadEngine(2, (8,), reserve_pages=4, page_size=4, device=device, capacity=capacity)
    eng.append(_payload(2, 16, W=8))
    eng.apply(torch.tensor([[True] * 4 + [False] * 12, [False] * 12 + [True] * 4], device=device))
    return eng


def test_refused_meta_append_changes_nothing_and_later_calls_work(device):
    eng = _engine_16(device)
    before = _state(eng)
    with pytest.raises(ValueError, match="payload is on the meta device"):
        eng.append(torch.zeros(2, 20, 8, dtype=torch.uint8, device="meta"))
    with pytest.raises(ValueError, match="rows is on the meta device"):
        eng.history.append(torch.zeros(2, 20, 8, dtype=torch.uint8, device="meta"))
    assert_same_state(eng, before)
    truth = _grow(list(_payload(2, 16, W=8)), list(_payload(2, 20, W=8, seed=1)))
    eng.append(_payload(2, 20, W=8, seed=1))  # grows 16 -> 36 chunks, tables with it
    mask = torch.zeros(2, 36, dtype=torch.bool)
    mask[:, 30:] = True
    eng.apply(mask.to(device))
    _check_cycle(eng, truth, mask)


def test_failed_history_copy_changes_nothing(device, monkeypatch):
    """The copy into the history fails midway (after a growth and after a first row): the
    engine, its history bytes and its tables are exactly as before, and it keeps working."""
    for grow in (False, True):
        # No growth: room for the append, so the copy writes into the live buffer.
        eng = _engine_16(device, capacity=16 if grow else 64)
        eng2 = _engine_16(device)
        before = _state(eng)
        calls = {"n": 0}
        real = torch.Tensor.__setitem__

        def flaky(self, key, value, calls=calls, real=real):  # bound now: B023
            calls["n"] += 1
            if calls["n"] == 2:  # the second row's copy
                raise RuntimeError("simulated copy failure")
            return real(self, key, value)

        n = 60 if grow else 8
        monkeypatch.setattr(torch.Tensor, "__setitem__", flaky)
        with pytest.raises(RuntimeError, match="simulated"):
            eng.append(_payload(2, n, W=8, seed=2))
        monkeypatch.undo()
        assert_same_state(eng, before)
        eng.check_consistency()
        eng.append(_payload(2, n, W=8, seed=2))
        eng2.append(_payload(2, n, W=8, seed=2))
        assert torch.equal(eng.history.data[:, :16 + n], eng2.history.data[:, :16 + n])
        mask = torch.ones(2, 16 + n, dtype=torch.bool)
        mask[:, :16 + n - 8] = False
        eng.apply(mask.to(device))
        truth = _grow(list(_payload(2, 16, W=8)), list(_payload(2, n, W=8, seed=2)))
        _check_cycle(eng, truth, mask)


def test_zero_reserve_engine_applies_an_empty_set(device):
    eng = OffloadEngine.from_history(_payload(2, 10, W=8), reserve_pages=0, page_size=4,
                                     device=device)
    stats = eng.apply(torch.zeros(2, 10, dtype=torch.bool, device=device))
    assert stats.pages_needed == 0 and stats.chunks_resident == 0
    assert not bool((eng.lookup >= 0).any())
    before = _state(eng)
    with pytest.raises(ValueError, match="reserve_pages=0"):
        eng.apply(torch.ones(2, 10, dtype=torch.bool, device=device))
    assert_same_state(eng, before)
    eng.check_consistency()


def test_retry_after_failed_apply_reads_as_a_never_failed_engine(device, monkeypatch):
    """docs/validation.md: after a failed ``apply`` the retry maps the same chunks to the same
    bytes as an engine that never failed; only which cell holds which page may differ."""
    truth = list(_payload(2, 24, W=8, seed=5))
    sets = [torch.zeros(2, 24, dtype=torch.bool) for _ in range(3)]
    sets[0][:, :8] = True
    sets[1][0, 4:16] = True
    sets[1][1, 20:] = True
    sets[2][:, 12:20] = True
    engines = [OffloadEngine.from_history(torch.stack(truth), reserve_pages=6, page_size=4,
                                          device=device) for _ in range(2)]
    failing, clean = engines
    for i, m in enumerate(sets):
        m = m.to(device)
        clean.apply(m)
        if i == 1:
            def half_done(plan):
                failing.reserve[plan.load_cell] = 0xAB
                raise RuntimeError("simulated copy failure")
            monkeypatch.setattr(failing, "_copy_pages", half_done)
            with pytest.raises(RuntimeError, match="simulated"):
                failing.apply(m)
            monkeypatch.undo()
            failing.check_consistency()
        failing.apply(m)
        idx = torch.arange(24).expand(2, 24).contiguous().to(device)
        rows_f, present_f = failing.read(idx)
        rows_c, present_c = clean.read(idx)
        assert torch.equal(present_f, present_c) and torch.equal(rows_f, rows_c), i
        _check_cycle(failing, truth, m)
