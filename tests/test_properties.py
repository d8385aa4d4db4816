"""Property-based equivalence (issue 7.3): random shapes, key layouts, precisions, ensembles,
offsets, positions and selection parameters; the Triton path (the interpreter on a CPU, the
real kernels with ``--device cuda``) equals the fp32 reference within DERIVED bounds, and
selections agree except at proven near-ties.

Bounds, per chunk (float64, never fitted):

* kernel alone, against float64 arithmetic on the very q/w it consumed: fp32 accumulation of
  the D products, the H weighted heads, the scale multiply and the offset add is at most
  ``(D + H + 4) u32 * A + 2 u32 |offset|`` with ``A = |s| sum_h |w_h| sum_d |fp8_d q_hd|`` (the
  ``gamma_n`` bound, derived in ``test_torch_fast.py``); tf32 on a GPU adds its q rounding
  (``|dq| <= 2^-10 |q|``, as in ``test_kernels.py``);
* query side, normwise per (layer, row, head) against the reference's fp32 q: the two paths
  may put a pre-Hadamard element on the other bf16 neighbour (one bf16 ulp, ``<= 2^-7 |x|``;
  the orthonormal Hadamard keeps 2-norms), bf16 mode rounds the output once more
  (``<= 2^-8``), fp8 mode rounds ``q / scale`` to e4m3 (``<= 2^-4`` relative, subnormals
  ``2^-10`` absolute in units of the scale);
* end to end, against float64 logits of the reference q: the kernel bound plus the exact
  effect of the q difference, ``dot_error_bound`` (``|relu(x) - relu(y)| <= |x - y|``);
* scores: sigmoid is 1/4-Lipschitz and max/mean do not grow the worst layer's error.

A threshold decision may differ only where the reference score is within that bound of the
threshold; a top-k membership only where the reference score is within twice the row's bound
of the k-th score. ``FLASHMEMORY_FUZZ_EXAMPLES`` raises the example count for a longer local
run; CI uses the default (seeded, derandomized, no example database written).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _helpers import U32, assert_within
from flashmemory_triton import constants as C
from flashmemory_triton import ops, select_resident
from flashmemory_triton import reference as ref
from flashmemory_triton.kernels import PRECISIONS
from flashmemory_triton.utils import _device
from kernel_cases import dot_error_bound, logits_f64, make_keys
from test_selection import oracle_chunk, oracle_page, oracle_topk
from test_torch_fast import SIGMOID_ULPS, U_BF16

EXAMPLES = int(os.environ.get("FLASHMEMORY_FUZZ_EXAMPLES", "0")) or None


def fuzz(default_examples: int):
    """CI-sized, reproducible hypothesis settings (derandomized: the same examples every run)."""
    return settings(max_examples=EXAMPLES or default_examples, deadline=None, derandomize=True,
                    database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


# Normwise relative q budget of each mode (module doc): one bf16 flip everywhere, plus the
# mode's own output rounding. 1e-6 covers the two fp32 Hadamard implementations.
BF16_FLIP = 2.0 ** -7
Q_BUDGET = {"fp32": BF16_FLIP + 1e-6, "tf32": BF16_FLIP + 1e-6,
            "bf16": BF16_FLIP + U_BF16 + 1e-6,
            "fp8": (BF16_FLIP + 2.0 ** -4
                    + 2.0 ** -10 * math.sqrt(C.HEAD_DIM) / C.FP8_E4M3_MAX + 1e-6)}
# fp8 subnormals when amax is clamped at 1e-4: half a subnormal step (2^-10) of the minimum
# scale per element, over D elements.
Q_FLOOR = 2.0 ** -10 * math.sqrt(C.HEAD_DIM) * C.FP8_QUANT_MIN_AMAX / C.FP8_E4M3_MAX
TF32_Q = 2.0 ** -10  # tf32 rounding of q inside the dot on a GPU (test_kernels.py)
# Hopper's fp8 tensor-core MMA adds its products with about 14 significant bits (DeepSeek-V3
# technical report, section 3.3.2), not fp32: relative to the absolute sum, 2^-12 with margin.
FP8_MMA_ACC = 2.0 ** -12


@st.composite
def scoring_cases(draw):
    B = draw(st.integers(1, 3))
    N = draw(st.integers(0, 150))
    return dict(
        L=draw(st.integers(1, 3)), B=B, H=draw(st.integers(1, 20)), N=N,
        layout=draw(st.sampled_from(["shared", "per_layer"])),
        view=draw(st.sampled_from(["contiguous", "every-other-chunk", "chunk-major"])),
        ensemble=draw(st.sampled_from(["max", "mean"])),
        offset=draw(st.sampled_from([0.0, 0.25]) | st.floats(-3, 3, width=32)),
        q_scale=draw(st.sampled_from([1.0, 1e-6, 40.0])),  # 1e-6: fp8 amax clamp, subnormals
        positions=draw(st.lists(st.integers(0, 2 * C.MAX_POSITION_RELEASE), min_size=B,
                                max_size=B)),
        bad_chunks=draw(st.integers(0, 2)) if N else 0,
        seed=draw(st.integers(0, 2 ** 31 - 1)),
        select=draw(selection_params(N)),
    )


@st.composite
def selection_params(draw, N):
    mode = draw(st.sampled_from(["chunk", "page", "topk"]))
    kw = dict(mode=mode, threshold=draw(st.sampled_from([0.5]) | st.floats(0.05, 0.95)),
              recent=draw(st.integers(0, N + 2)), sink=draw(st.integers(0, 5)),
              page_size=draw(st.sampled_from([1, 4, 16, 64])), max_pages=draw(st.integers(0, 6)))
    if mode == "topk":
        kw["top_k"] = draw(st.integers(0, N + 2))
    return kw, draw(st.lists(st.integers(0, N), min_size=3, max_size=3))


def _build(case, device):
    g = torch.Generator().manual_seed(case["seed"])
    L, B, H, N = case["L"], case["B"], case["H"], case["N"]
    q = torch.randn(L, B, H, C.HEAD_DIM, generator=g) * case["q_scale"]
    w = torch.randn(L, B, H, generator=g) / 64
    lead = (L, B, N) if case["layout"] == "per_layer" else (B, N)
    keys = make_keys(lead, g)  # positive, negative and zero scales
    flat = keys.view(-1, C.CHUNK_BYTES)
    for i in range(case["bad_chunks"]):  # an e4m3 NaN byte, or a non-finite scale
        row = int(torch.randint(flat.shape[0], (1,), generator=g))
        if i == 0:
            flat[row, int(torch.randint(C.HEAD_DIM, (1,), generator=g))] = 0x7F
        else:
            flat[row, C.HEAD_DIM:] = torch.tensor([float("inf")]).view(torch.uint8)
    keys = keys.to(device)
    if case["view"] == "every-other-chunk":
        other = make_keys(lead, g).to(device)
        view = torch.stack([keys, other], dim=-2).flatten(-3, -2)[..., ::2, :]
    elif case["view"] == "chunk-major":
        view = keys.transpose(-3, -2).contiguous().transpose(-3, -2)
    else:
        view = keys
    pos = torch.tensor(case["positions"], dtype=torch.int64)
    return q.to(device), w.to(device), pos.to(device), keys, view


def _check_q(prepared, ref_prep, precision):
    """Normwise q budget per (layer, row, head); w copied exactly except fp8's folded scale."""
    q_r = ref_prep.q.double().cpu()
    w_r = ref_prep.w.double().cpu()
    w_t = prepared.w.double().cpu()
    if precision == "fp8":
        ratio = torch.where(w_r != 0, w_t / w_r, torch.ones_like(w_r))  # the per-head scale
        q_t = prepared.q.double().cpu() * ratio[..., None]
        scale = q_r.abs().amax(-1).clamp_min(C.FP8_QUANT_MIN_AMAX) / C.FP8_E4M3_MAX
        # The folded scale is the reference's, from the amax of a q within BF16_FLIP * |q|_2
        # (|d amax| <= |dq|_inf <= |dq|_2), with fp32 rounding of the scale and of w * scale.
        slack = BF16_FLIP * q_r.norm(dim=-1) / C.FP8_E4M3_MAX + 4 * U32 * scale
        assert bool(((ratio - scale).abs() <= slack).all()), "fp8 per-head scale folded into w"
    else:
        q_t = prepared.q.double().cpu()
        assert torch.equal(w_t, w_r), "w must pass through unchanged"
    err = (q_t - q_r).norm(dim=-1)
    budget = Q_BUDGET[precision] * q_r.norm(dim=-1) + Q_FLOOR
    worst = float((err / budget).max()) if err.numel() else 0.0
    assert worst <= 1.0, f"{precision}: q differs from the reference by {worst:.2f}x its budget"
    return q_t, w_r


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN chunks
@pytest.mark.parametrize("precision", PRECISIONS)  # every mode gets its own examples
@fuzz(6)
@given(case=scoring_cases())
def test_triton_equals_reference(precision, case, device):
    q, w, pos, keys, view = _build(case, device)
    offset, H = case["offset"], case["H"]
    prepared = ops.prepare_queries(q, w, pos, precision=precision, backend="triton")
    scores, logits = ops.score_prepared(prepared, view, ensemble=case["ensemble"],
                                        logit_offset=offset, return_logits=True)
    scores, logits = scores.cpu().double(), logits.cpu().double()
    keys = keys.cpu()

    # 1. the kernel alone, against float64 on its own inputs
    q_k, w_k = prepared.q.double().cpu(), prepared.w.double().cpu()
    mag = dot_error_bound(q_k, torch.zeros_like(q_k), w_k, keys)  # A per (layer, row, chunk)
    bound = (C.HEAD_DIM + H + 4) * U32 * mag + 2 * U32 * abs(offset)
    if precision == "tf32" and device.type == "cuda":
        bound = bound + dot_error_bound(q_k * (1 + TF32_Q), q_k, w_k, keys)
    if precision == "fp8" and _device.has_hw_fp8(device):
        bound = bound + FP8_MMA_ACC * mag
    exact = logits_f64(q_k, w_k, keys, logit_offset=offset)
    assert_within(logits, exact, bound, f"{precision} kernel logits")
    want_scores = ref.ensemble_scores(torch.sigmoid(exact), case["ensemble"])
    assert_within(scores, want_scores, bound.amax(0) / 4 + SIGMOID_ULPS,
                  f"{precision} kernel scores")

    # 2. the query side against the reference's fp32 q (normwise budget of the mode)
    ref_prep = ops.prepare_queries(q, w, pos, precision="fp32", backend="torch")
    q_t, w_r = _check_q(prepared, ref_prep, precision)

    # 3. end to end against float64 logits of the reference q
    ref_logits = logits_f64(ref_prep.q.double().cpu(), w_r, keys, logit_offset=offset)
    e2e = bound + dot_error_bound(q_t, ref_prep.q.double().cpu(), w_r, keys) + 2 * U32 * mag
    assert_within(logits, ref_logits, e2e, f"{precision} logits vs the fp32 reference")

    # 4. selections: equal except at proven near-ties
    ref_scores = ref.ensemble_scores(torch.sigmoid(ref_logits), case["ensemble"])
    s_bound = e2e.amax(0) / 4 + SIGMOID_ULPS
    _check_selection(scores, ref_scores, s_bound, *case["select"])


def _check_selection(got, want, bound, kw, lengths):
    B, N = want.shape
    n = torch.tensor(lengths[:B], dtype=torch.int64)
    sel_t = select_resident(got, n_chunks=n, **kw)
    sel_r = select_resident(want, n_chunks=n, **kw)
    real = torch.arange(N)[None, :] < n[:, None]
    assert torch.equal(sel_t.mask & ~real, torch.zeros_like(real)), "selected past a row's length"
    if kw["mode"] == "topk":
        nan_t, nan_r = torch.isnan(got), torch.isnan(want)
        assert torch.equal(nan_t, nan_r)
        assert torch.equal(sel_t.n_selected, sel_r.n_selected)  # min(k, real non-NaN chunks)
        for b in range(B):
            diff = (sel_t.mask[b] ^ sel_r.mask[b]).nonzero().flatten()
            if not diff.numel():
                continue
            kth = want[b][sel_r.mask[b]].min()
            slack = 2 * float(bound[b][real[b] & ~nan_r[b]].max())
            assert bool(((want[b, diff] - kth).abs() <= slack).all()), (
                f"top-k row {b}: chunks {diff.tolist()} differ and are not near-ties of the k-th")
        return
    t = kw["threshold"]
    hit_t, hit_r = (got > t) & real, (want > t) & real
    flips = hit_t ^ hit_r
    near = (want - t).abs() <= bound
    assert bool((~flips | near).all()), (
        f"{int((flips & ~near).sum())} threshold decisions differ without a near-tie")
    same = ~flips.any(1)  # rows whose hits agree must select exactly the same chunks / pages
    assert torch.equal(sel_t.mask[same], sel_r.mask[same]), kw["mode"]
    if kw["mode"] == "page":
        assert torch.equal(sel_t.pages[same], sel_r.pages[same])


# --- selection against the pure-Python oracle of test_selection.py (cheap: many examples) -------
@st.composite
def selection_cases(draw):
    B, N = draw(st.integers(1, 3)), draw(st.integers(0, 80))
    grid = st.one_of(st.integers(0, 8).map(lambda i: i / 8), st.just(float("nan")))  # exact ties
    scores = draw(st.lists(st.lists(grid, min_size=N, max_size=N), min_size=B, max_size=B))
    lengths = draw(st.lists(st.integers(0, N), min_size=B, max_size=B))
    return dict(scores=scores, lengths=lengths, threshold=draw(st.sampled_from([0.5, 0.25, 0.3])),
                recent=draw(st.integers(0, N + 3)), sink=draw(st.integers(0, 6)),
                page_size=draw(st.integers(1, 20)), max_pages=draw(st.integers(0, 8)),
                cap=draw(st.none() | st.integers(0, N + 3)), top_k=draw(st.integers(0, N + 3)))


@fuzz(60)
@given(case=selection_cases())
def test_select_resident_matches_oracle(case, device):
    scores = torch.tensor(case["scores"], dtype=torch.float32).view(len(case["lengths"]), -1)
    n = torch.tensor(case["lengths"], dtype=torch.int64)
    sd, nd = scores.to(device), n.to(device)
    t, recent, sink, ps, mp = (case[k] for k in ("threshold", "recent", "sink", "page_size",
                                                 "max_pages"))
    page = select_resident(sd, mode="page", n_chunks=nd, threshold=t, recent=recent, sink=sink,
                           page_size=ps, max_pages=mp)
    chunk = select_resident(sd, mode="chunk", n_chunks=nd, threshold=t, recent=recent, sink=sink,
                            max_resident=case["cap"])
    topk = select_resident(sd, mode="topk", n_chunks=nd, top_k=case["top_k"])
    for b, row in enumerate(scores.tolist()):
        mask, pages = oracle_page(row, case["lengths"][b], t, recent, sink, ps, mp)
        assert page.mask[b].tolist() == mask and page.pages[b].tolist() == pages
        assert chunk.mask[b].tolist() == oracle_chunk(row, case["lengths"][b], t, recent, sink,
                                                      case["cap"])
        assert topk.mask[b].tolist() == oracle_topk(row, case["lengths"][b], case["top_k"])
