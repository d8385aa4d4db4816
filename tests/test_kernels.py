"""Triton kernels against the reference, on the CPU through the interpreter (or --device cuda).

Each kernel is checked two ways:
* against float64 arithmetic on the SAME inputs it consumed (isolates the kernel: only fp32
  accumulation error remains, whatever the precision mode), and
* end to end against the fp32 reference with the tolerance each precision mode implies.
Outputs are NaN-poisoned before every launch (FLASHMEMORY_POISON=1, set in conftest).
"""

from __future__ import annotations

import pytest
import torch

from flashmemory_triton import constants as C
from flashmemory_triton import ops
from flashmemory_triton import reference as ref
from flashmemory_triton.kernels import PRECISIONS
from flashmemory_triton.kernels.score import fused_score_launch
from flashmemory_triton.utils import _device
from kernel_cases import (
    assert_close,
    dot_error_bound,
    logit_of,
    logits_f64,
    make_keys,
    retriever_states,
)

pytestmark = pytest.mark.interpreter

# fp32 accumulation over D = 128 products and up to 128 heads, against float64: the error of a
# sum of n terms is below n * eps * sum|terms| in the worst case and ~sqrt(n) * eps in RMS;
# sqrt(128 * 128) * 6e-8 = 7.6e-6, so 1e-5 relative RMS.
FP32_RTOL = 1e-5
# The tf32 mode rounds q to a 10-bit mantissa inside the dot on a GPU (relative error <= 2^-11
# per element, RMS 2^-11/sqrt(3) = 2.8e-4 for a dot of independent terms; ReLU cancellation
# across heads can double it): 1e-3. Under the interpreter the dot is exact fp32.
TF32_RTOL = 1e-3
# End to end against the fp32 reference: the mode's rounding of q dominates.
# bf16: 8-bit mantissa, per-element relative error <= 2^-9, RMS 2^-9/sqrt(3) = 1.1e-3; the
# weighted head sum cancels partly (w has both signs), so allow ~9x: 1e-2.
# fp8 (e4m3, 3-bit mantissa): per-element RMS 2^-4/sqrt(3) = 3.6e-2 at worst (values near the
# top of a binade round less), so 5e-2, the serving stack's own budget.
MODE_RTOL = {"fp32": FP32_RTOL, "tf32": TF32_RTOL, "bf16": 1e-2, "fp8": 5e-2}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _queries(L, B, H, gen, device):
    # Projected q of realistic magnitude (O(1) per element) and head weights ~ 1/128 scale.
    q = torch.randn(L, B, H, C.HEAD_DIM, generator=gen)
    w = torch.randn(L, B, H, generator=gen) / 64
    return q.to(device), w.to(device)


def _positions(B, gen, device):
    return torch.randint(0, 2 * C.MAX_POSITION_RELEASE, (B,), generator=gen).to(device)


def _hw_fp8_options(device):
    # On the CPU both decode paths run in the interpreter; on a GPU the launcher's choice.
    return (False, True) if device.type == "cpu" else (_device.has_hw_fp8(device),)


# --- query side -----------------------------------------------------------------------------
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("H", [pytest.param(h, id=f"H{h}") for h in (1, 20, 128)])
def test_query_prep_matches_reference(precision, H, device):
    gen = _gen(H)
    L, B = 3, 3
    q, w = _queries(L, B, H, gen, device)
    pos = torch.tensor([0, 1, 10 ** 7], device=device)  # past the table: clamped
    got = ops.prepare_queries(q, w, pos, precision=precision, backend="triton")
    rows = ref.freqs_cis_at(pos, C.MAX_POSITION_RELEASE)
    want = torch.stack([ref.prepare_query(q[l], rows) for l in range(L)])
    want_w = w.clone()
    if precision == "fp8":
        want, want_w = ops.quantize_fp8_per_head(want, want_w)
    assert got.q.dtype == (torch.bfloat16 if precision in ("bf16", "fp8") else torch.float32)
    _assert_q_equivalent(got.q.float(), want, precision)
    # w: copied, or multiplied by the per-head fp8 scale computed from (nearly) the same amax
    assert_close(got.w, want_w, 1e-6 if precision != "fp8" else 1e-5, "w")


def _assert_q_equivalent(got, want, precision):
    """The kernel and torch may round a handful of elements to the OTHER neighbour: the RoPE
    product differs by an fp32 ulp (FMA contraction), and a bf16/e4m3 rounding boundary can
    fall in between. Everything else must agree to fp32 accuracy. Checked in the space where
    the rounding happens, with the fraction of neighbour flips bounded."""
    if precision in ("fp32", "tf32"):
        # Undo the (orthonormal, self-inverse) Hadamard to see the bf16-rounded rotated q.
        got_pre, want_pre = ref.hadamard_transform(got), ref.hadamard_transform(want)
        ulp = want_pre.abs() * 2.0 ** -8
    elif precision == "bf16":
        got_pre, want_pre = got, want.to(torch.bfloat16).float()
        ulp = want_pre.abs() * 2.0 ** -7  # the output rounding itself can flip too
    else:
        got_pre, want_pre = got, want
        ulp = want_pre.abs() * 2.0 ** -3 + 2.0 ** -9  # one e4m3 step (subnormal step 2^-9)
    diff = (got_pre - want_pre).abs()
    noise = 1e-5 * want_pre.abs() + 1e-6
    flips = diff > noise
    assert bool((diff <= ulp + noise).all()), (
        f"q differs by more than one rounding step: max abs {float(diff.max()):.3e}")
    assert float(flips.float().mean()) < 1e-3, (
        f"{int(flips.sum())} of {flips.numel()} q elements on the other rounding neighbour")


# --- scoring kernel alone -------------------------------------------------------------------
SHAPES = [pytest.param(B, N, id=f"B{B}-N{N}") for B, N in
          ((1, 1), (3, 63), (1, 65), (1, 1000))]


@pytest.mark.parametrize("B,N", SHAPES)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("layout", ["shared", "per_layer"])
def test_fused_score_matches_f64(B, N, precision, layout, device):
    gen = _gen(1000 * B + N)
    L, H = 3, 16
    q, w = _queries(L, B, H, gen, device)
    pos = _positions(B, gen, device)
    prepared = ops.prepare_queries(q, w, pos, precision=precision, backend="triton")
    keys = make_keys((L, B, N) if layout == "per_layer" else (B, N), gen).to(device)
    want = logits_f64(prepared.q.float(), prepared.w, keys, logit_offset=0.25)
    rtol = TF32_RTOL if precision == "tf32" and device.type == "cuda" else FP32_RTOL
    # Both e4m3 decoders on every mode at one shape; elsewhere only where the decoder feeds
    # the tensor cores directly (bf16, fp8), to keep the interpreter run short.
    hw_options = _hw_fp8_options(device)
    if not (N == 63 or precision in ("bf16", "fp8")):
        hw_options = hw_options[:1]
    for hw_fp8 in hw_options:
        for ensemble in ("max", "mean"):
            scores, logits = fused_score_launch(prepared.q, prepared.w, keys, precision=precision,
                                                hw_fp8=hw_fp8, ensemble=ensemble,
                                                logit_offset=0.25, return_logits=True)
            tag = f"{precision}/{layout}/{ensemble}/hw_fp8={hw_fp8}"
            assert_close(logits.cpu(), want, rtol, f"logits {tag}")
            want_scores = ref.ensemble_scores(torch.sigmoid(want), ensemble)
            assert_close(scores.cpu(), want_scores, rtol, f"scores {tag}")
            alone, none = fused_score_launch(prepared.q, prepared.w, keys, precision=precision,
                                             hw_fp8=hw_fp8, ensemble=ensemble, logit_offset=0.25)
            assert none is None
            assert torch.equal(alone, scores), f"scores change when logits are written ({tag})"


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_dense_v2_both_load_paths_and_v1(precision, device):
    """The v2 scorer with and without the register prefetch (the launch table picks per Triton
    version) against float64 on the inputs it consumed, and equal to v1 within fp32
    accumulation: several tiles per program (the round-robin walk), a partial last tile, two
    rows, negative and special scales, 20 heads (padded to 32)."""
    from flashmemory_triton.kernels.dense import dense_score_launch
    if device.type == "cuda" and _device.capability(device) < (9, 0):
        pytest.skip("v2 runs on sm_90+ (before Hopper the launcher keeps v1)")
    gen = _gen(77)
    L, B, N, H = 3, 2, 1000, 20
    q, w = _queries(L, B, H, gen, device)
    prepared = ops.prepare_queries(q, w, _positions(B, gen, device), precision=precision,
                                   backend="triton")
    keys = make_keys((B, N), gen).to(device)
    want = logits_f64(prepared.q.float(), prepared.w, keys, logit_offset=-0.5)
    hw = _device.has_hw_fp8(device) if device.type == "cuda" else True
    v1_scores, v1_logits = fused_score_launch(prepared.q, prepared.w, keys, precision=precision,
                                              hw_fp8=hw, logit_offset=-0.5, return_logits=True,
                                              kernel="v1")
    for prefetch in (True, False):
        for ensemble in ("max", "mean"):
            scores, logits = dense_score_launch(prepared.q, prepared.w, keys,
                                                precision=precision, hw_fp8=hw,
                                                ensemble=ensemble, logit_offset=-0.5,
                                                return_logits=True, prefetch=prefetch)
            tag = f"{precision}/prefetch={prefetch}/{ensemble}"
            assert_close(logits.cpu(), want, FP32_RTOL, f"logits {tag}")
            assert_close(scores.cpu(), ref.ensemble_scores(torch.sigmoid(want), ensemble),
                         FP32_RTOL, f"scores {tag}")
            assert torch.equal(torch.isnan(logits), torch.isnan(v1_logits)), tag
            if ensemble == "max":
                assert_close(scores.cpu(), v1_scores.cpu(), FP32_RTOL, f"v1 vs v2 {tag}")


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_dense_v2_headline_epilogue_nan_policy(precision, device):
    """The headline epilogue (max ensemble, no logits) finds overflowed logits without a
    per-layer test: +inf in one layer, and -inf in one layer while the others stay finite
    (the max alone would hide it), both NaN; so are NaN bytes and a non-finite scale, in the
    steady-state loop (full tiles) and in the partial last tile. Everything else matches the
    logits-writing epilogue bit for bit (same sums, same order)."""
    from flashmemory_triton.kernels.dense import dense_score_launch
    if device.type == "cuda" and _device.capability(device) < (9, 0):
        pytest.skip("v2 runs on sm_90+ (before Hopper the launcher keeps v1)")
    gen = _gen(91)
    L, B, N, H = 3, 2, 300, 4
    q = torch.full((L, B, H, C.HEAD_DIM), 448.0).to(torch.bfloat16)  # e4m3 max: exact in fp8
    w = torch.full((L, B, H), 1e-30)
    w[0, 0] = 1.0  # row 0, layer 0: 448 * 448 * 128 * 4 * MAX_KEY_SCALE / 2 overflows to +inf
    w[0, 1] = -1.0  # row 1, layer 0: -inf; layers 1 and 2 stay finite
    keys = make_keys((B, N), gen)
    bad = torch.zeros(B, N, dtype=torch.bool)
    for n in (5, 140, 290):  # first tile, a full tile in the loop, the partial last tile
        keys[:, n, :C.HEAD_DIM] = 0x7E  # 448
        keys[:, n, C.HEAD_DIM:] = torch.tensor([C.MAX_KEY_SCALE / 2]).view(torch.uint8)
        bad[:, n] = True
    keys[0, 7, 3] = 0x7F
    keys[1, 200, 64] = 0xFF
    keys[0, 150, C.HEAD_DIM:] = torch.tensor([float("inf")]).view(torch.uint8)
    keys[1, 260, C.HEAD_DIM:] = torch.tensor([float("nan")]).view(torch.uint8)
    bad[0, 7] = bad[1, 200] = bad[0, 150] = bad[1, 260] = True
    hw = _device.has_hw_fp8(device) if device.type == "cuda" else True
    args = (q.to(device), w.to(device), keys.to(device))
    scores, none = dense_score_launch(*args, precision=precision, hw_fp8=hw)
    assert none is None
    with_logits, logits = dense_score_launch(*args, precision=precision, hw_fp8=hw,
                                             return_logits=True)
    assert torch.equal(torch.isnan(scores).cpu(), bad), precision
    assert bool(torch.isnan(logits[0]).cpu()[bad].all()), precision
    assert torch.equal(scores.nan_to_num(-1.0), with_logits.nan_to_num(-1.0)), precision


@pytest.mark.parametrize("L", [1, 2, 4])
def test_layer_counts_and_odd_heads(L, device):
    gen = _gen(L)
    B, N, H = 2, 40, 7  # 7 heads: padded to the dot's 16 rows, padding must contribute 0
    q, w = _queries(L, B, H, gen, device)
    prepared = ops.prepare_queries(q, w, _positions(B, gen, device), backend="triton",
                                   precision="fp32")
    keys = make_keys((B, N), gen).to(device)
    scores, logits = ops.score_prepared(prepared, keys, return_logits=True)
    want = logits_f64(prepared.q.float(), prepared.w, keys)
    assert_close(logits.cpu(), want, FP32_RTOL, "logits")


def test_zero_chunks_and_strided_keys(device):
    gen = _gen(7)
    L, B, H = 3, 2, 16
    q, w = _queries(L, B, H, gen, device)
    prepared = ops.prepare_queries(q, w, _positions(B, gen, device), backend="triton",
                                   precision="bf16")
    empty = torch.empty(B, 0, C.CHUNK_BYTES, dtype=torch.uint8, device=device)
    scores, logits = ops.score_prepared(prepared, empty, return_logits=True)
    assert scores.shape == (B, 0) and logits.shape == (L, B, 0)
    # A strided view (every other chunk of a bigger buffer) is read in place, correctly.
    big = make_keys((B, 130), gen).to(device)
    view = big[:, ::2]
    scores_v, logits_v = ops.score_prepared(prepared, view, return_logits=True)
    scores_c, logits_c = ops.score_prepared(prepared, view.contiguous(), return_logits=True)
    assert torch.equal(logits_v, logits_c) and torch.equal(scores_v, scores_c)


def test_nonfinite_chunks_score_nan_in_both_backends(device):
    gen = _gen(11)
    L, B, N, H = 3, 2, 20, 16
    q, w = _queries(L, B, H, gen, device)
    pos = _positions(B, gen, device)
    keys = make_keys((B, N), gen)
    keys[0, 1, 5] = 0x7F  # e4m3 NaN
    keys[0, 2, 100] = 0xFF  # e4m3 -NaN
    for n, value in ((3, float("nan")), (4, float("inf")), (5, float("-inf"))):
        keys[1, n, C.HEAD_DIM:] = torch.tensor([value]).view(torch.uint8)
    keys = keys.to(device)
    bad = torch.zeros(B, N, dtype=torch.bool)
    bad[0, 1] = bad[0, 2] = bad[1, 3] = bad[1, 4] = bad[1, 5] = True
    for backend in ("triton", "torch"):
        for precision in PRECISIONS:
            scores, logits = ops.score_chunks(q, w, pos, keys, precision=precision,
                                              backend=backend, return_logits=True)
            assert torch.equal(torch.isnan(scores).cpu(), bad), f"{backend}/{precision} scores"
            assert torch.equal(torch.isnan(logits).cpu(), bad.expand(L, B, N)), (
                f"{backend}/{precision}")
    # NaN in q (a NaN hidden state) propagates to the whole row instead of being ReLU'd away.
    q_nan = q.clone()
    q_nan[:, 1, 0, 0] = float("nan")
    scores, _ = ops.score_chunks(q_nan, w, pos, keys, backend="triton", precision="fp32")
    assert bool(torch.isnan(scores[1]).all()) and not bool(torch.isnan(scores[0, 3:]).any())


# --- end to end fidelity and selections -----------------------------------------------------
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("layout", ["shared", "per_layer"])
def test_mode_fidelity_and_selection_near_ties(precision, layout, device):
    """Each mode against the fp32 reference: logits within the mode's tolerance, and every
    threshold or top-k disagreement a PROVEN near-tie (the reference logit lies within the
    rigorous error bound of the decision boundary). Reports the measured agreement."""
    gen = _gen(99)
    L, B, N, H = 3, 2, 600, 32
    q, w = _queries(L, B, H, gen, device)
    pos = _positions(B, gen, device)
    keys = make_keys((L, B, N) if layout == "per_layer" else (B, N), gen,
                     special_scales=False).to(device)
    ref_prep = ops.prepare_queries(q, w, pos, precision="fp32", backend="torch")
    ref_logits = logits_f64(ref_prep.q, ref_prep.w, keys)
    # Centre the decisions: an offset that puts ~15% of chunks above the threshold.
    offset = -float(torch.quantile(ref_logits.max(0).values.flatten(), 0.85))
    ref_logits = ref_logits + offset
    prepared = ops.prepare_queries(q, w, pos, precision=precision, backend="triton")
    scores, logits = ops.score_prepared(prepared, keys, logit_offset=offset, return_logits=True)
    logits = logits.cpu().double()
    rtol = MODE_RTOL[precision] if not (precision == "tf32" and device.type == "cpu") else FP32_RTOL
    assert_close(logits, ref_logits, rtol, f"{precision} logits vs fp32 reference")

    # Bound on |logit - ref_logit|: the q rounding of the mode (proven, see dot_error_bound;
    # fp8 compares the dequantized per-head q, i.e. q8 * scale, with w unscaled) plus fp32
    # accumulation slack, plus tf32's in-dot rounding on a GPU.
    q_mode = prepared.q.float().cpu().double()
    w_ref = ref_prep.w.double()
    if precision == "fp8":
        scale = (prepared.w.double().cpu() / w_ref)
        q_mode = q_mode * scale[..., None]
    bound = dot_error_bound(q_mode, ref_prep.q, w_ref, keys.cpu())
    if precision == "tf32" and device.type == "cuda":
        bound = bound + dot_error_bound(ref_prep.q * (1 + 2.0 ** -10), ref_prep.q, w_ref,
                                        keys.cpu())
    bound = bound + 1e-5 * ref_logits.abs().max()

    t = 0.5
    got_hit = scores.cpu() > t
    want_hit = torch.sigmoid(ref_logits).max(0).values > t
    disagree = got_hit != want_hit
    near = ((ref_logits - logit_of(t)).abs() <= bound).any(0)
    assert bool((~disagree | near).all()), (
        f"{int((disagree & ~near).sum())} threshold decisions differ without a near-tie")
    agreement = 1 - float(disagree.float().mean())
    print(f"{precision}/{layout}: threshold agreement {agreement:.4f}, "
          f"{int(disagree.sum())} near-tie flips of {disagree.numel()}")

    k = 60
    want_ens = torch.sigmoid(ref_logits).max(0).values
    for b in range(B):
        got_set = set(torch.topk(scores[b].cpu(), k).indices.tolist())
        want_set = set(torch.topk(want_ens[b], k).indices.tolist())
        kth = torch.topk(ref_logits.max(0).values[b], k).values[-1]
        for n in got_set ^ want_set:
            gap = float((ref_logits.max(0).values[b, n] - kth).abs())
            assert gap <= 2 * float(bound[:, b, n].max()), (
                f"top-{k} row {b}: chunk {n} differs and is not a near-tie of the k-th score")


@pytest.mark.parametrize("precision,dtype", [
    pytest.param(p, torch.float32, id=f"{p}-fp32w") for p in PRECISIONS] + [
    pytest.param("bf16", torch.bfloat16, id="bf16-bf16w")])
def test_retriever_triton_backend_matches_torch(precision, dtype, device):
    """Every release API call routed through the kernels equals the torch backend within the
    mode's tolerance; per-layer inputs, bf16-stored weights and logit_offset included."""
    from flashmemory_triton import FlashMemoryRetriever
    gen = _gen(5)
    hidden, rank, H = 64, 32, 8
    states = retriever_states(gen, hidden, rank, H)
    B, N = 3, 65
    keys = make_keys((3, B, N), gen).to(device)
    h_shared = torch.randn(B, hidden, generator=gen).to(device)
    h_layers = torch.randn(3, B, hidden, generator=gen).to(device)
    pos = torch.tensor([0, 63, 10 ** 6], device=device)
    kw = dict(device=device, dtype=dtype, logit_offset=0.3)
    mt = FlashMemoryRetriever(states, backend="triton", precision=precision, **kw)
    mr = FlashMemoryRetriever(states, backend="torch", **kw)
    assert mt.resolved_backend() == "triton" and mr.resolved_backend() == "torch"
    # bf16 weights: the triton path's projections run as bf16 GEMMs (x rounded to bf16),
    # the torch path upcasts; both are bf16-operand products: the bf16 budget.
    rtol = max(MODE_RTOL[precision], 1e-2 if dtype == torch.bfloat16 else 0)
    if precision == "tf32" and device.type == "cpu" and dtype == torch.float32:
        rtol = FP32_RTOL
    for h, k in ((h_shared, keys[0]), (h_layers, keys)):
        got = mt(h, k, pos, apply_sigmoid=False)
        want = mr(h, k, pos, apply_sigmoid=False)
        assert list(got) == list(C.LAYER_NAMES)
        for name in got:
            assert_close(got[name].cpu(), want[name].cpu(), rtol, f"{precision} {name}")
        name = C.LAYER_NAMES[1]
        assert_close(mt.score_layer(name, h, k, pos).cpu(), torch.sigmoid(want[name]).cpu(),
                     rtol, f"score_layer {name}")
        for mode in ("max", "mean"):
            assert_close(mt.ensemble(h, k, pos, mode).cpu(), mr.ensemble(h, k, pos, mode).cpu(),
                         rtol, f"ensemble {mode}")
        mask = mt.select_topk(h, k, pos, top_k=9)
        assert mask.dtype == torch.bool and mask.shape == (B, N)
        assert mask.sum(1).tolist() == [9] * B


def test_backend_errors_are_clear(device):
    if device.type == "cpu":
        import os
        saved = os.environ.pop("TRITON_INTERPRET")
        try:
            q = torch.zeros(1, 1, 16, C.HEAD_DIM)
            with pytest.raises(ValueError, match="backend='triton'"):
                ops.prepare_queries(q, torch.zeros(1, 1, 16), torch.zeros(1, dtype=torch.long),
                                    backend="triton")
            assert ops.resolve_backend("auto", torch.device("cpu")) == "cpu"
        finally:
            os.environ["TRITON_INTERPRET"] = saved
    with pytest.raises(ValueError, match="precision"):
        ops.prepare_queries(torch.zeros(1, 1, 16, C.HEAD_DIM, device=device),
                            torch.zeros(1, 1, 16, device=device),
                            torch.zeros(1, dtype=torch.long, device=device), precision="int4")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_triton_backend_on_release_format_checkpoint(tmp_path, suffix, device):
    """A checkpoint written in the release's exact format (joint keys, a bf16-stored copy
    too), loaded through from_checkpoint: the Triton backend reproduces the torch backend's
    logits, threshold decisions (up to near-ties) and top-k sizes."""
    from flashmemory_triton import FlashMemoryRetriever, synthetic
    path = synthetic.write_checkpoint(tmp_path / f"ckpt{suffix}", hidden=128, rank=32,
                                      n_heads=16, seed=3,
                                      freqs_cis_max_position=64 if suffix == ".pt" else 0)
    gen = _gen(3)
    B, N = 2, 300
    hidden = synthetic.mock_hidden(B, hidden=128, generator=gen).to(device)
    keys = synthetic.mock_compressed_k(B, N, generator=gen).to(device)
    pos = torch.tensor([4 * N - 1, 3 * C.MAX_POSITION_RELEASE], device=device)
    mt = FlashMemoryRetriever.from_checkpoint(path, device=device, backend="triton")
    mr = FlashMemoryRetriever.from_checkpoint(path, device=device, backend="torch")
    got, want = mt.logits(hidden, keys, pos), mr.logits(hidden, keys, pos)
    assert_close(got.cpu(), want.cpu(), MODE_RTOL[mt.precision or "bf16"], "logits")
    got_hit = mt.select_topk(hidden, keys, pos, threshold=0.5)
    want_hit = mr.select_topk(hidden, keys, pos, threshold=0.5)
    # bf16 budget (1e-2 relative RMS) x 6: beyond that a flip is not a near-tie.
    margin = 6 * 1e-2 * float(want.pow(2).mean().sqrt())
    near = (want.abs() <= margin).any(0).cpu()
    flips = (got_hit != want_hit).cpu()
    assert bool((~flips | near).all()), (
        f"{int((flips & ~near).sum())} threshold flips not near-ties")
    assert 0 < int(want_hit.sum()) < B * N, "synthetic weights should keep a minority"
