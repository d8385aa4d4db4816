"""Inputs and comparisons shared by the kernel tests (kept apart from the reference tests)."""

from __future__ import annotations

import math

import torch

from flashmemory_triton import constants as C
from flashmemory_triton import reference as ref


def make_keys(shape, generator, *, scale_lo=0.05, scale_hi=0.2, special_scales=True):
    """Row-format keys ``uint8 [*shape, 132]`` as the release builds them (``randn * 0.5`` in
    e4m3, scales uniform), with zero and negative scales mixed in unless disabled."""
    fp8 = (torch.randn(*shape, C.HEAD_DIM, generator=generator) * 0.5).to(torch.float8_e4m3fn)
    scale = torch.empty(*shape, 1).uniform_(scale_lo, scale_hi, generator=generator)
    if special_scales:
        pick = torch.rand(*shape, 1, generator=generator)
        scale = torch.where(pick < 0.1, -scale, scale)  # negative scales: relu(s x) != s relu(x)
        scale = torch.where((pick > 0.1) & (pick < 0.15), torch.zeros_like(scale), scale)
    return torch.cat([fp8.view(torch.uint8), scale.view(torch.uint8)], dim=-1)


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def assert_close(actual, expected, rtol_rms, name, *, nan_equal=True):
    """Relative RMS error check that reports max-abs and relative error; NaN positions must
    match exactly (a NaN-poisoned output that was never written fails here)."""
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    an, en = torch.isnan(actual), torch.isnan(expected)
    if nan_equal:
        assert torch.equal(an, en), (f"{name}: NaN mismatch at {int((an != en).sum())} of "
                                     f"{an.numel()} elements (unwritten output or NaN policy)")
    keep = ~en
    if keep.sum() == 0:
        return
    a, e = actual[keep].double(), expected[keep].double()
    err = rel_rms(a, e)
    max_abs = float((a - e).abs().max())
    assert err <= rtol_rms, (f"{name}: relative RMS error {err:.3e} > {rtol_rms:.1e} "
                             f"(max abs error {max_abs:.3e}, max |expected| "
                             f"{float(e.abs().max()):.3e})")


def logits_f64(q: torch.Tensor, w: torch.Tensor, compressed_k: torch.Tensor,
               logit_offset: float = 0.0) -> torch.Tensor:
    """Float64 logits ``[L, B, N]`` of prepared queries (the oracle for the scoring kernel
    alone: same q, exact arithmetic), with the non-finite-chunk policy."""
    per_layer = compressed_k.dim() == 4
    out = [ref.keys_logits(q[l].double(), w[l].double(),
                           compressed_k[l] if per_layer else compressed_k,
                           logit_offset=logit_offset)
           for l in range(q.shape[0])]
    return torch.stack(out)


def dot_error_bound(q_a, q_b, w, compressed_k) -> torch.Tensor:
    """Proven bound ``[L, B, N]`` on ``|logit(q_a) - logit(q_b)|`` for the same keys and w:
    ``|relu(x) - relu(y)| <= |x - y|`` and ``|k . dq| <= |s| sum_d |fp8_d| |dq_d|``, so
    ``|dlogit| <= |s| * sum_h |w_h| * (|fp8| @ |dq_h|)``. Used to prove that a selection
    disagreement is a genuine near-tie."""
    per_layer = compressed_k.dim() == 4
    out = []
    for l in range(q_a.shape[0]):
        ck = compressed_k[l] if per_layer else compressed_k
        fp8 = ck[..., :C.HEAD_DIM].contiguous().view(torch.float8_e4m3fn).double().abs()
        s = ck[..., C.HEAD_DIM:].contiguous().view(torch.float32).double().abs()  # [B, N, 1]
        dq = (q_a[l].double() - q_b[l].double()).abs()  # [B, H, D]
        per_head = torch.einsum("bnd,bhd->bnh", fp8, dq)
        out.append((per_head * w[l].double().abs()[:, None, :]).sum(-1) * s[..., 0])
    return torch.stack(out)


def logit_of(threshold: float) -> float:
    return math.log(threshold / (1 - threshold))


def retriever_states(gen: torch.Generator, hidden: int = 64, rank: int = 32, heads: int = 8):
    """Small random retriever weights for every release layer, drawn from ``gen`` (scaled so
    the logits are O(1) and both signs of the ReLU inputs occur)."""
    return {name: {"wq_a.weight": torch.randn(rank, hidden, generator=gen) / 8,
                   "wq_b.weight": torch.randn(heads * C.HEAD_DIM, rank, generator=gen) / 6,
                   "q_norm_weight": 1 + 0.1 * torch.randn(rank, generator=gen),
                   "weights_proj.weight": torch.randn(heads, hidden, generator=gen)}
            for name in C.LAYER_NAMES}
