"""CUDA graphs (issue 7.6, GPU only: ``pytest --device cuda``; skipped elsewhere).

Scoring plus selection is captured once on static input buffers; new inputs are copied into
those buffers and the graph replayed. Every replay must equal eager calls on the same inputs,
bit for bit (same kernels, same launch configuration, no host round trip).

What makes the capture legal: ``_validate.positions`` and ``selection._row_lengths`` skip
their value checks (a host sync) while the stream is capturing (``docs/validation.md``), the
RoPE frequencies are passed as a device tensor (no host-to-device copy inside the graph), and
autotuning is off (it benchmarks, which cannot be captured).
"""

from __future__ import annotations

import pytest
import torch

from flashmemory_triton import constants as C
from flashmemory_triton import ops, select_resident
from flashmemory_triton import reference as ref
from flashmemory_triton.kernels import PRECISIONS
from kernel_cases import make_keys
from test_retriever_api import build, inputs

pytestmark = pytest.mark.gpu

L, B, H, N = 3, 4, 64, 3000


@pytest.fixture
def cuda(device, monkeypatch):
    if device.type != "cuda":
        pytest.skip("needs --device cuda")
    monkeypatch.delenv("FLASHMEMORY_AUTOTUNE", raising=False)
    return device


def _capture(fn):
    """Warm up on a side stream (compiles the kernels), then capture one call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _inputs(layout, seed, device):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(L, B, H, C.HEAD_DIM, generator=g)
    w = torch.randn(L, B, H, generator=g) / 64
    pos = torch.randint(0, 2 * C.MAX_POSITION_RELEASE, (B,), generator=g)
    keys = make_keys((L, B, N) if layout == "per_layer" else (B, N), g)
    n = torch.randint(0, N + 1, (B,), generator=g)
    n[0] = N
    return [t.to(device) for t in (q, w, pos, keys, n)]


@pytest.mark.parametrize("layout", ["shared", "per_layer"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_scoring_and_selection_replay_equals_eager(precision, layout, cuda):
    static = _inputs(layout, 0, cuda)
    rope = ref.rope_mixed_freqs().to(cuda)

    def step(q, w, pos, keys, n):
        prepared = ops.prepare_queries(q, w, pos, precision=precision, backend="triton",
                                       rope_freqs=rope)
        scores, logits = ops.score_prepared(prepared, keys, ensemble="max", return_logits=True)
        page = select_resident(scores, mode="page", n_chunks=n, recent=128, page_size=64,
                               max_pages=8)
        topk = select_resident(scores, mode="topk", n_chunks=n, top_k=100)
        chunk = select_resident(scores, mode="chunk", n_chunks=n, recent=64, max_resident=300)
        return scores, logits, page.mask, page.pages, topk.mask, chunk.mask

    graph, out = _capture(lambda: step(*static))
    for seed in (1, 2, 3):
        fresh = _inputs(layout, seed, cuda)
        for buf, new in zip(static, fresh):
            buf.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        want = step(*fresh)
        names = ("scores", "logits", "page mask", "pages", "topk mask", "chunk mask")
        for name, got, exp in zip(names, out, want):
            assert _same(got, exp), f"{precision}/{layout} replay {seed}: {name} differs from eager"


def test_retriever_call_captured(cuda):
    """The release API itself (projections, query kernel, scorer) plus selection, captured."""
    model, _ = build(cuda, backend="triton")
    static = list(inputs(cuda, 3, 700, seed=0))

    def step(hidden, keys, pos):
        scores = model.ensemble(hidden, keys, pos)
        return scores, select_resident(scores, mode="page", recent=64, page_size=64,
                                       max_pages=4).mask

    graph, out = _capture(lambda: step(*static))
    for seed in (1, 2):
        fresh = list(inputs(cuda, 3, 700, seed=seed))
        fresh[2] = fresh[2] + 64 * seed  # new decode positions too
        for buf, new in zip(static, fresh):
            buf.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        want = step(*fresh)
        assert _same(out[0], want[0]) and torch.equal(out[1], want[1]), f"replay {seed}"


def test_value_checks_are_skipped_while_capturing(cuda):
    """Documented: inside a captured graph nothing reads tensor values, so a negative position
    copied into the static buffer is not refused on replay; it is clamped to row 0 of the RoPE
    table, exactly as the eager path treats position 0. Eager calls still refuse it."""
    q, w, pos, keys, _ = _inputs("shared", 0, cuda)
    rope = ref.rope_mixed_freqs().to(cuda)

    def step():
        prepared = ops.prepare_queries(q, w, pos, precision="bf16", backend="triton",
                                       rope_freqs=rope)
        return ops.score_prepared(prepared, keys)[0]

    graph, out = _capture(step)
    pos.copy_(torch.tensor([-5, 0, 7, -1], device=cuda))
    graph.replay()
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="positions must be non-negative"):
        step()
    pos.clamp_(min=0)
    assert _same(out, step())


@pytest.mark.parametrize("kind", ["paged", "varlen"])
def test_paged_and_varlen_batches_captured(kind, cuda):
    """A serving batch (per-layer pools or row buffers held as a KeyBuffers built before
    capture, as the README requires) scored and page-selected in a graph; new tables, lengths
    and queries copied in; replays equal eager calls bit for bit."""
    from flashmemory_triton import paged as P
    g = torch.Generator().manual_seed(5)
    lengths = [0, 1, 65, 700]
    reqs = [make_keys((L, n), g) for n in lengths]
    rope = ref.rope_mixed_freqs().to(cuda)
    if kind == "paged":
        batch = P.pack_pool(reqs, num_pages=40, max_pages=12)
        keys = P.page_pools([batch.pool[i].clone().to(cuda) for i in range(L)])
        lens, table = batch.n_chunks.to(cuda), batch.page_table.to(torch.int64).to(cuda)
    else:
        vb = P.pack_varlen(reqs)
        keys = P.varlen_buffers([vb.keys[i].clone().to(cuda) for i in range(L)])
        lens, table = vb.cu_chunks.to(cuda), None
    q = torch.randn(L, len(lengths), H, C.HEAD_DIM, generator=g).to(cuda)
    w = (torch.randn(L, len(lengths), H, generator=g) / 64).to(cuda)
    pos = torch.tensor([3, 9, 300, 2800], device=cuda)
    M = 768

    def step():
        prepared = ops.prepare_queries(q, w, pos, precision="bf16", backend="triton",
                                       rope_freqs=rope)
        if kind == "paged":
            out = P.score_paged(prepared, keys, table, lens, max_chunks=M, return_logits=True)
        else:
            out = P.score_varlen(prepared, keys, lens, max_chunks=M, return_logits=True)
        rs = select_resident(out, mode="page", recent=64, max_pages=4)
        return out.scores, out.logits, rs.mask, rs.pages

    graph, out = _capture(step)
    for seed in (1, 2):
        g2 = torch.Generator().manual_seed(seed)
        q.copy_(torch.randn(q.shape, generator=g2))
        w.copy_(torch.randn(w.shape, generator=g2) / 64)
        if kind == "paged":  # shorter histories over the same pages
            lens.copy_(torch.tensor([0, 1, 64, 640]))
        else:
            lens.copy_(torch.tensor([0, 1, 1, 66, 700]))
        graph.replay()
        torch.cuda.synchronize()
        want = step()
        for name, got, exp in zip(("scores", "logits", "mask", "pages"), out, want):
            assert _same(got, exp), f"{kind} replay {seed}: {name} differs from eager"
