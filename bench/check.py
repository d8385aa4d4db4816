"""Correctness pre-check: a provider is timed only if its output matches the fp32 reference.

Two conditions, both on the same inputs as the timing:

1. the provider's per-layer logits ``[L, B, N]`` (from its check call) are within the relative
   RMS tolerance of its precision of the reference logits;
2. the ensemble scores of the TIMED call are as close to the reference scores as those logits
   allow. ``sigmoid`` is 1/4-Lipschitz and ``max``/``mean`` over layers do not increase the
   largest difference, so ``|ds| <= max|dlogit| / 4``; the timed call may launch another
   configuration (autotuned tiles, no logits written) than the check call, so it is allowed
   one tolerance's worth of extra logit error, ``tol * rms(logit)``, plus fp32 rounding.
"""

from __future__ import annotations

import dataclasses

import torch

# Relative RMS error of the logits against the fp32 reference, by precision of the dot
# product. Each is a few times the rounding the mode adds (unit roundoff u, RMS of a uniform
# rounding error u / sqrt(3), errors of the D-term dot products add in quadrature so their
# relative RMS stays near the per-element one):
#   fp32: u = 6e-8, accumulation over D = 128 and H = 128 terms -> ~1e-6; 1e-5 leaves 10x.
#   tf32: u = 2**-11 = 4.9e-4 on q (keys are exact) -> ~3e-4; 1e-3.
#   bf16: u = 2**-8 = 3.9e-3 on q and, in torch paths, on the matmul output -> ~2e-3
#         measured (torch_fast); 1e-2.
#   fp8:  e4m3 has 3 mantissa bits, half an ulp is 2**-4 relative -> ~2.5e-2 for per-head
#         scaled q; 5e-2. (The serving stack runs this mode; design §5.)
TOLERANCE = {"fp32": 1e-5, "tf32": 1e-3, "bf16": 1e-2, "fp8": 5e-2}
FP32_SCORE_ROUNDING = 1e-6  # a few ulps of a sigmoid output near 1


@dataclasses.dataclass
class CheckResult:
    ok: bool
    logit_rel_rms: float  # relative RMS error of the check call's logits
    score_max_err: float  # largest score error of the timed call
    tolerance: float
    reason: str = ""  # why it failed, empty when ok


def _nonfinite_mismatch(out: torch.Tensor, expected: torch.Tensor) -> bool:
    return bool((torch.isfinite(out) != torch.isfinite(expected)).any())


def check_output(run_scores: torch.Tensor, check_scores: torch.Tensor,
                 check_logits: torch.Tensor, expected_scores: torch.Tensor,
                 expected_logits: torch.Tensor, precision: str) -> CheckResult:
    """Compare one provider's outputs with the reference outputs (see the module doc)."""
    tol = TOLERANCE[precision]
    for name, out, exp in (("scores", run_scores, expected_scores),
                           ("check scores", check_scores, expected_scores),
                           ("logits", check_logits, expected_logits)):
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(exp.shape):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            return CheckResult(False, float("nan"), float("nan"), tol,
                               f"{name} shape {got}, expected {tuple(exp.shape)}")
        if _nonfinite_mismatch(out.float(), exp):
            return CheckResult(False, float("nan"), float("nan"), tol,
                               f"{name} non-finite where the reference is finite (or vice versa)")
    finite = torch.isfinite(expected_logits)
    diff = (check_logits.double() - expected_logits.double())[finite]
    if diff.numel() == 0:  # N = 0, or no finite reference logit: nothing left to compare
        return CheckResult(True, 0.0, 0.0, tol)
    ref_rms = expected_logits.double()[finite].pow(2).mean().sqrt().item()
    err_rms = diff.pow(2).mean().sqrt().item()
    rel = err_rms / ref_rms if ref_rms > 0 else err_rms
    logit_max = diff.abs().max().item()
    sfinite = torch.isfinite(expected_scores)
    score_err = (run_scores.double() - expected_scores.double())[sfinite].abs().max().item()
    score_bound = (logit_max + tol * ref_rms) / 4 + FP32_SCORE_ROUNDING
    if not rel <= tol:
        return CheckResult(False, rel, score_err, tol,
                           f"logit relative RMS error {rel:.2e} > {precision} tolerance {tol:.0e}")
    if not score_err <= score_bound:
        return CheckResult(False, rel, score_err, tol,
                           f"score error {score_err:.2e} > {score_bound:.2e} allowed by its logits")
    return CheckResult(True, rel, score_err, tol)
