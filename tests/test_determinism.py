"""Determinism (issue 7.4): the same inputs on the same device give bitwise-identical scores,
logits and selections, call after call, wherever the inputs live in memory, and in a fresh
process. The Triton kernels are built for it (one program per (chunk tile, row), no atomics,
a fixed reduction order per launch configuration); the torch reference is deterministic on
a given machine for fixed shapes.

Where it does NOT hold (``docs/validation.md``): FLASHMEMORY_AUTOTUNE=1 may pick another tile
configuration in another process (different fp32 summation order); projections are BLAS /
cuBLAS GEMMs whose rounding can change with the batch size, the library version and the GPU
model; the interpreter's tile size follows N, so a chunk's score may change in the last bits
when the history grows (on a GPU the tile is fixed: checked by the gpu-marked test below).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from _helpers import nan_padded
from flashmemory_triton import ThresholdFallback, ops, select_resident, topk_mask
from flashmemory_triton import constants as C
from flashmemory_triton.kernels import PRECISIONS
from kernel_cases import make_keys
from test_retriever_api import build, inputs

L, B, H, N = 3, 2, 16, 130  # N spans two 128-chunk tiles


def _case(layout, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(L, B, H, C.HEAD_DIM, generator=g)
    w = torch.randn(L, B, H, generator=g) / 64
    pos = torch.tensor([4095, 10 ** 7])  # the second past the RoPE table (clamped)
    keys = make_keys((L, B, N) if layout == "per_layer" else (B, N), g)
    keys.view(-1, C.CHUNK_BYTES)[7, 3] = 0x7F  # a NaN chunk: NaN must be stable too
    return q.to(device), w.to(device), pos.to(device), keys.to(device)


def _relocated(t: torch.Tensor) -> torch.Tensor:
    """Same values at another address: inside a larger poisoned buffer, at a 4-byte aligned
    offset (NaN around floats, 0xFF around keys, -7 around integers)."""
    if t.is_floating_point() or t.dtype == torch.uint8:
        return nan_padded(t, pad=256)
    buf = torch.full((t.numel() + 512,), -7, dtype=t.dtype, device=t.device)
    view = buf[256:256 + t.numel()].view(t.shape)
    view.copy_(t)
    return view


def _same(a, b) -> bool:
    """Bitwise equality, NaN payloads included."""
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


# The torch backend scores bf16/tf32-mode queries in fp32 (only fp8 changes its queries).
BACKEND_MODES = [("triton", p) for p in PRECISIONS] + [("torch", "fp32"), ("torch", "fp8")]


@pytest.mark.interpreter
@pytest.mark.parametrize("layout", ["shared", "per_layer"])
@pytest.mark.parametrize("backend,precision", BACKEND_MODES)
def test_repeated_calls_are_bitwise_identical(backend, precision, layout, device):
    q, w, pos, keys = _case(layout, device)
    first = ops.prepare_queries(q, w, pos, precision=precision, backend=backend)
    again = ops.prepare_queries(_relocated(q), _relocated(w), _relocated(pos),
                                precision=precision, backend=backend)
    assert _same(first.q, again.q) and _same(first.w, again.w), "prepared queries"
    moved = _relocated(keys)
    for ensemble, (k1, k2) in (("max", (keys, keys)), ("mean", (keys, moved))):
        s1, l1 = ops.score_prepared(first, k1, ensemble=ensemble, return_logits=True)
        s2, l2 = ops.score_prepared(again, k2, ensemble=ensemble, return_logits=True)
        assert _same(s1, s2) and _same(l1, l2), f"{ensemble} scores and logits"
        assert bool(torch.isnan(s1).any())  # the NaN chunk is part of what is compared
    # ... and so is every selection made from them
    scores = s1
    n = torch.tensor([N, 77], device=device)
    for mode, kw in (("page", dict(page_size=16, max_pages=3)), ("chunk", dict(max_resident=20)),
                     ("topk", dict(top_k=25))):
        a = select_resident(scores, mode=mode, n_chunks=n, recent=10, sink=2, **kw)
        b = select_resident(scores.clone(), mode=mode, n_chunks=n.clone(), recent=10, sink=2, **kw)
        assert torch.equal(a.mask, b.mask) and (a.pages is None or torch.equal(a.pages, b.pages))


@pytest.mark.interpreter
@pytest.mark.parametrize("precision", PRECISIONS)
def test_triton_rows_do_not_depend_on_the_batch(precision, device):
    """One program per (tile, row) and per-(layer, row) query programs: a row scored alone is
    bit for bit the row scored in a batch (serving batches change every step)."""
    q, w, pos, keys = _case("per_layer", device, seed=1)
    prepared = ops.prepare_queries(q, w, pos, precision=precision, backend="triton")
    scores, logits = ops.score_prepared(prepared, keys, return_logits=True)
    for b in range(B):
        alone = ops.prepare_queries(q[:, b:b + 1], w[:, b:b + 1], pos[b:b + 1],
                                    precision=precision, backend="triton")
        assert _same(alone.q, prepared.q[:, b:b + 1].contiguous())
        s, lg = ops.score_prepared(alone, keys[:, b:b + 1], return_logits=True)
        assert _same(lg, logits[:, b:b + 1].contiguous()) and _same(s, scores[b:b + 1]), f"row {b}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_retriever_and_selection_repeatable(backend, device):
    model, _ = build(device, backend=backend)
    hidden, ck, pos = inputs(device, 3, 40, L=3, per_layer_hidden=True)
    runs = [model.ensemble(hidden, ck, pos),
            model.ensemble(_relocated(hidden), _relocated(ck), _relocated(pos))]
    assert _same(runs[0], runs[1])
    assert torch.equal(model.select_topk(hidden, ck, pos, top_k=11), topk_mask(runs[0], 11))
    picks = []
    for _ in range(2):  # the stateful fallback too, from a fresh state each time
        fallback = ThresholdFallback(3, 0.2, device=device)
        picks.append([select_resident(runs[0], mode="page", page_size=8, max_pages=2, recent=4,
                                      fallback=fallback) for _ in range(3)])
    for a, b in zip(*picks):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.fallback, b.fallback)


def _scores_digest(device):
    """sha256 of the bf16 scores and logits of the torch and triton backends on one case, and
    the last backend's (scores, prepared queries, keys)."""
    digest = hashlib.sha256()
    for backend in ("torch", "triton"):
        q, w, pos, keys = _case("shared", device)
        p = ops.prepare_queries(q, w, pos, precision="bf16", backend=backend)
        s, lg = ops.score_prepared(p, keys, return_logits=True)
        digest.update(s.cpu().numpy().tobytes() + lg.cpu().numpy().tobytes())
    return digest.hexdigest(), (s, p, keys)


_CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_determinism import _scores_digest
    print(_scores_digest(torch.device({device!r}))[0])
""")


@pytest.mark.interpreter
def test_same_bits_in_a_fresh_process(device):
    """No hidden state (caches, first-call paths, import order) changes the result: a new
    Python process computes the same bytes (autotune off, the default)."""
    hexdigest, (s, p, keys) = _scores_digest(device)
    assert not torch.equal(s, ops.score_prepared(p, keys, ensemble="mean")[0])  # non-trivial
    env = {k: v for k, v in os.environ.items() if k != "FLASHMEMORY_AUTOTUNE"}
    code = _CHILD.format(tests=os.path.dirname(__file__), device=str(device))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == hexdigest


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_gpu_scores_do_not_change_when_history_grows(precision, device, monkeypatch):
    """On a GPU the tile size is fixed (autotune off), so a chunk's score is the same bits
    whatever N is: scores of old chunks do not move between retrieval cycles."""
    monkeypatch.delenv("FLASHMEMORY_AUTOTUNE", raising=False)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(L, B, 128, C.HEAD_DIM, generator=g).to(device)
    w = (torch.randn(L, B, 128, generator=g) / 64).to(device)
    keys = make_keys((B, 5000), g).to(device)
    prepared = ops.prepare_queries(q, w, torch.tensor([1, 2, 3], device=device),
                                   precision=precision, backend="triton")
    _, full = ops.score_prepared(prepared, keys, return_logits=True)
    for n in (1, 127, 129, 4097):
        _, part = ops.score_prepared(prepared, keys[:, :n], return_logits=True)
        assert _same(part, full[..., :n].contiguous()), f"N={n}"
