"""flashmemory_triton.torch_fast against float64 arithmetic on the same prepared queries.

Every comparison uses a bound proven from the algorithm, per chunk, not a fitted tolerance:

* per head, the dot product ``fp8 . q_h`` (keys decoded exactly) is computed from q rounded to
  the compute dtype (``|dq_d| <= u |q_d|``) and, in bf16, rounded once more on output
  (``<= u |dot| <= u sum_d |fp8_d q_hd|``): at most ``c * A_h`` with ``A_h = sum_d |fp8_d q_hd|``,
  ``c = 2 u_bf16`` for bf16 and 0 for fp32;
* fp32 accumulation over the D products and the H weighted heads, then the scale multiply and
  the offset add, add at most ``(D + H + 4) u32`` of the same absolute sums (the classic
  ``gamma_n`` bound, ``n u`` to first order);
* relu is 1-Lipschitz, so the logit error is at most ``|s| sum_h |w_h| A_h (c + (D + H + 4) u32)``
  plus ``2 u32 |offset|``; the scores (sigmoid: 1/4-Lipschitz; max/mean over layers do not
  grow the largest error) at most a quarter of the worst layer's bound plus a few fp32 ulps.
"""

from __future__ import annotations

import pytest
import torch

from _helpers import U32, assert_within
from flashmemory_triton import constants as C
from flashmemory_triton import ops
from flashmemory_triton import reference as ref
from flashmemory_triton.torch_fast import PRECISIONS, score_chunks_fast, score_prepared_fast
from kernel_cases import logits_f64, make_keys

U_BF16 = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits)
ROUNDING = {"bf16": 2 * U_BF16, "fp32": 0.0}
SIGMOID_ULPS = 4 * U32  # sigmoid and the mean of three values, each a few fp32 ulps of <= 1

L, B, H = 3, 2, 4


def _inputs(layout: str, n: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(L, B, H, C.HEAD_DIM, generator=g)
    w = torch.randn(L, B, H, generator=g) / 8
    keys = make_keys((L, B, n) if layout == "per_layer" else (B, n), g)  # +, -, 0 scales
    return q.to(device), w.to(device), keys.to(device)


def _logit_bound(q, w, keys, precision: str, logit_offset: float) -> torch.Tensor:
    """The module doc's bound, float64 ``[L, B, N]``."""
    per_layer = keys.dim() == 4
    out = []
    for layer in range(L):
        k = keys[layer] if per_layer else keys
        fp8 = k[..., :C.HEAD_DIM].contiguous().view(torch.float8_e4m3fn).double().abs().cpu()
        scale = k[..., C.HEAD_DIM:].contiguous().view(torch.float32).double().abs().cpu()[..., 0]
        a = torch.einsum("bnd,bhd->bnh", fp8, q[layer].double().abs().cpu())  # A_h per chunk
        weighted = (a * w[layer].double().abs().cpu()[:, None, :]).sum(-1) * scale
        out.append(weighted * (ROUNDING[precision] + (C.HEAD_DIM + H + 4) * U32)
                   + 2 * U32 * abs(logit_offset))
    return torch.stack(out)


@pytest.mark.parametrize("layout", ["shared", "per_layer"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("block_bytes", [1, 50_000, 1 << 28])
def test_logits_and_scores_within_bound(device, layout, precision, block_bytes):
    q, w, keys = _inputs(layout, n=37, device=device)
    for ensemble, offset in (("max", 0.0), ("mean", 0.75)):
        scores, logits = score_prepared_fast(q, w, keys, precision=precision, ensemble=ensemble,
                                             logit_offset=offset, return_logits=True,
                                             block_bytes=block_bytes)
        assert scores.dtype == logits.dtype == torch.float32
        want_logits = logits_f64(q, w, keys, logit_offset=offset)
        bound = _logit_bound(q, w, keys, precision, offset)
        assert_within(logits, want_logits, bound, f"{precision} {layout} logits")
        want_scores = ref.ensemble_scores(torch.sigmoid(want_logits), ensemble)
        assert_within(scores, want_scores, bound.amax(0) / 4 + SIGMOID_ULPS,
                      f"{precision} {layout} {ensemble} scores")


@pytest.mark.parametrize("layout", ["shared", "per_layer"])
def test_nonfinite_chunks_are_nan_in_every_layer(device, layout):
    q, w, keys = _inputs(layout, n=8, device=device)
    keys = keys.clone()
    keys[..., 2, 5] = 0x7F  # an e4m3 NaN byte
    keys[..., 4, C.HEAD_DIM:] = torch.tensor([float("inf")]).view(torch.uint8).to(device)
    _, logits = score_prepared_fast(q, w, keys, return_logits=True)
    assert bool(logits[..., [2, 4]].isnan().all())
    assert not bool(logits[..., [0, 1, 3, 5, 6, 7]].isnan().any())


def test_score_chunks_fast_is_prepare_then_score(device):
    q_proj, w, keys = _inputs("shared", n=16, device=device)
    positions = torch.tensor([5, 300_000], device=device)
    got = score_chunks_fast(q_proj, w, positions, keys, precision="fp32", return_logits=True)
    prepared = ops.prepare_queries(q_proj, w, positions, precision="fp32", backend="torch")
    want = score_prepared_fast(prepared.q, prepared.w, keys, precision="fp32", return_logits=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_empty_history(device):
    q, w, keys = _inputs("shared", n=0, device=device)
    scores, logits = score_prepared_fast(q, w, keys, return_logits=True)
    assert scores.shape == (B, 0) and logits.shape == (L, B, 0)


def test_bad_arguments(device):
    q, w, keys = _inputs("shared", n=4, device=device)
    with pytest.raises(ValueError, match="precision"):
        score_prepared_fast(q, w, keys, precision="fp8")
    with pytest.raises(ValueError, match="block_bytes"):
        score_prepared_fast(q, w, keys, block_bytes=0)
    with pytest.raises(ValueError, match="ensemble"):
        score_prepared_fast(q, w, keys, ensemble="min")
    with pytest.raises(TypeError, match="uint8"):
        score_prepared_fast(q, w, keys.float())
    with pytest.raises(ValueError, match="w must be"):
        score_prepared_fast(q, w[:, :, :2], keys)
    with pytest.raises(ValueError, match="per-layer"):
        score_prepared_fast(q, w, keys.unsqueeze(0).expand(2, -1, -1, -1))
