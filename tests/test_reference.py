"""The pure-torch reference (``flashmemory_triton.reference``) against design §3-§5.

The oracle below is written from docs/design.md in float64 and shares no code with reference.py:
e4m3 decoding from the bits, bf16 rounding from its definition, RoPE with explicit cos/sin,
Hadamard through the Sylvester matrix, the per-head relu dot in float64.

How the bf16 rounding of q is compared honestly
-----------------------------------------------
design §3 step 5 rounds q to bf16 twice (all of q, then the rotated half after the complex64
multiply). Rounding is a step function: a value computed in fp32 and the same value computed
in float64 can sit on opposite sides of a bf16 rounding midpoint and then differ by a whole
bf16 ulp (2**-8 relative), far more than any fp32 error. So the end-to-end check is split:

* ``test_projection_matches_float64`` checks steps 1-4 and 7 (``project_query``, continuous
  math) against float64 with an elementwise first-order fp32 error bound.
* The end-to-end tests feed the float64 oracle the reference's own fp32 projection ``q`` (the
  exact numbers the reference rounds), so the first bf16 rounding is the same rounding on both
  sides. The second rounding (after the complex64 RoPE multiply) cannot be shared: for it the
  oracle knows an error bound ``e`` on the reference's pre-rounding value, rounds ``v - e`` and
  ``v + e`` as well, and where those differ (an ambiguous element, a few in a thousand) it
  carries the possible one-ulp deviation to the logits exactly: a change ``dq`` of q before the
  Hadamard moves the head's dot by ``(H k) . dq``, at most ``sum_d |(H k)_d| dq_d``, and relu is
  1-Lipschitz. Everywhere else the tolerance is the fp32 (or float64) error bound.
* ``test_prepared_query_is_on_the_bf16_grid`` checks directly that all 128 dims were rounded.
* ``test_oracle_check_detects`` proves the tolerance is tight enough to catch the classic
  mistakes (no bf16 rounding, rounding half of q, NeoX RoPE, rotating the first 64 dims).
"""

from __future__ import annotations

import math

import pytest
import torch

from _helpers import (
    U32,
    U64,
    assert_within,
    bf16_round,
    dequant_independent,
    describe_error,
    e4m3fn_decode,
    make_layer_states,
    pack_compressed_k,
    random_compressed_k,
    sylvester_hadamard,
)
from flashmemory_triton import reference as ref

D = 128
ROPE = 64
PARAMS = ("wq_a.weight", "wq_b.weight", "q_norm_weight", "weights_proj.weight")


# --- the float64 oracle, from docs/design.md -----------------------------------------------------
def spec_ramp_bounds():
    """YaRN ramp bounds from design §3, in float64 python math."""
    def corr(n):
        return 64 * math.log(65536 / (n * 2 * math.pi)) / (2 * math.log(160000))
    return max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), 31)


def spec_mixed_freqs(dtype):
    """design §3's mixed inverse frequencies. It defines the table in fp32, so the oracle's
    RoPE uses this formula evaluated in fp32 (``dtype=torch.float32``): at position 5e5 one
    fp32 ulp of a frequency moves the angle by ~0.03 rad, so only the exact fp32 numbers are
    comparable. ``torch.float64`` gives the exact-math values for a sanity bound."""
    low, high = spec_ramp_bounds()
    freqs = 1.0 / (160000.0 ** (torch.arange(0, 64, 2, dtype=dtype) / 64))
    i = torch.arange(32, dtype=dtype)
    ramp = torch.where(i < low, torch.zeros_like(i),
                       torch.where(i >= high, torch.ones_like(i), (i - low) / max(high - low, 1)))
    return freqs * (1 - ramp) + freqs / 16 * ramp


def spec_angles(positions, max_position):
    """fp32 angles ``float32(pos) * mixed`` rounded to fp32 (the product of two fp32 numbers is
    exact in float64, so rounding it once to fp32 IS the fp32 multiply), as float64."""
    pos = positions.cpu().to(torch.int64).clamp(0, max_position - 1).to(torch.float32).double()
    mixed = spec_mixed_freqs(torch.float32).double()
    return (pos[:, None] * mixed[None, :]).float().double()  # [B, 32]


# Error model for the reference's continuous arithmetic (unit roundoff u). Rigorous worst-case
# bounds (n u sum|terms| per n-term sum) are ~1000x the errors actually seen here (the terms
# have random signs, so partial sums and rounding errors random-walk) and would be too loose
# to catch, e.g., a missing bf16 rounding (a ~1e-3 relative effect). So each stage gets the
# standard statistical estimate, sigma = u * sqrt(n) * ||terms||_2 for an n-term sum (plus one
# u per elementwise op), and the tests allow LAMBDA sigma: under the independent-rounding model
# an error past 10 sigma has probability < 1e-20 per element. Observed errors sit at ~0.1-1
# sigma. The bf16 roundings are not modelled statistically: see oracle_logits.
LAMBDA = 10.0


def oracle_projection(hidden, weights, u):
    """Steps 1-4 and 7 in float64: ``q [B, H, D]``, ``w [B, H]``, and the error scales
    ``sigma_q``, ``sigma_w`` of the same steps computed with unit roundoff ``u``.

    ``a = x @ wq_a.T``: ``u sqrt(hidden) ||x * wq_a[i]||``; the mean square and rsqrt add a
    relative error ``rel`` common to the whole row (it scales all of q); ``q_lora`` picks up
    ``|g| sigma_a / rms``; ``q`` sums ``rank`` terms: ``u sqrt(rank * (q_lora**2 @ wq_b**2))``
    plus the propagated ``sigma_qlora`` and ``|q| rel``.
    """
    x = hidden.detach().double().cpu()
    wa, wb, g, wp = (weights[k].detach().double().cpu() for k in PARAMS)
    B, hid = x.shape
    rank = wa.shape[0]
    H = wb.shape[0] // D
    a = x @ wa.T
    ms = a.pow(2).mean(-1, keepdim=True)
    rms = torch.sqrt(ms + 1e-6)
    qn = a / rms * g
    q = (qn @ wb.T).view(B, H, D)
    ws = D ** -0.5 * H ** -0.5
    w = (x @ wp.T) * ws

    sig_a = u * torch.sqrt(hid * (x.pow(2) @ wa.pow(2).T)) + u * a.abs()
    sig_ms = (2.0 / rank) * torch.sqrt((a.pow(2) * sig_a.pow(2)).sum(-1, keepdim=True)) \
        + u * math.sqrt(rank) * ms
    rel = sig_ms / (2 * (ms + 1e-6)) + 3 * u
    sig_qn = g.abs() * sig_a / rms + u * qn.abs()
    sig_q = (u * torch.sqrt(rank * (qn.pow(2) @ wb.pow(2).T))
             + torch.sqrt(sig_qn.pow(2) @ wb.pow(2).T)).view(B, H, D) + q.abs() * rel[..., None]
    sig_w = (u * torch.sqrt(hid * (x.pow(2) @ wp.pow(2).T)) + u * (x @ wp.T).abs()) * ws
    return q, w, sig_q, sig_w


def _round_with_slack(v, e):
    """bf16 rounding of ``v`` and the largest deviation a value within ``e`` of v can round to
    (rounding is monotone, so rounding ``v - e`` and ``v + e`` brackets it)."""
    r = bf16_round(v)
    return r, torch.maximum(bf16_round(v + e) - r, r - bf16_round(v - e))


def oracle_logits(q_pre, e1, w, sig_w, k, positions, max_position, u):
    """design §3 steps 5-6 and §5 in float64, plus an elementwise tolerance for the reference.

    ``q_pre [B, H, D]``: the values the reference rounds to bf16; ``e1``: how far the
    reference's values may be from ``q_pre`` (0 when they are the same numbers);
    ``w``/``sig_w``: float64 head weights and the error scale of the reference's; ``k [B, N, D]``
    float64 keys; ``u``: unit roundoff of the reference's Hadamard/score arithmetic.
    Returns ``(logits [B, N], tolerance [B, N])``: ``LAMBDA`` sigma for the continuous
    arithmetic plus the exact worst-case effect of every ambiguous bf16 rounding.
    """
    B, H, _ = q_pre.shape
    q1, dev1 = _round_with_slack(q_pre, torch.as_tensor(e1, dtype=torch.float64))

    # RoPE on the LAST 64 dims, interleaved pairs (2i, 2i+1), angle from the fp32 table.
    theta = spec_angles(positions, max_position)[:, None, :]  # [B, 1, 32]
    c, s = torch.cos(theta), torch.sin(theta)
    a, b = q1[..., ROPE::2], q1[..., ROPE + 1::2]
    da, db = dev1[..., ROPE::2], dev1[..., ROPE + 1::2]
    ra, rb = a * c - b * s, a * s + b * c
    # The reference multiplies in complex64: fp32 cos/sin within 2 ulp (4u) of the exact
    # values of the same fp32 angle, two rounded products and a rounded sum (~2u): 8u on
    # |a| + |b| is a worst-case bound; plus the first rounding's deviation (|c|, |s| <= 1).
    e2 = 8 * U32 * (a.abs() + b.abs()) + da + db
    ra, dra = _round_with_slack(ra, e2)
    rb, drb = _round_with_slack(rb, e2)
    q2, dev = q1.clone(), dev1.clone()
    q2[..., ROPE::2], q2[..., ROPE + 1::2] = ra, rb
    dev[..., ROPE::2], dev[..., ROPE + 1::2] = dra, drb

    hmat = sylvester_hadamard(D) / math.sqrt(D)
    qh = q2 @ hmat  # the Sylvester matrix is symmetric
    dots = torch.einsum("bnd,bhd->bnh", k, qh)
    logits = (torch.relu(dots) * w[:, None, :]).sum(-1)

    # Continuous error scales (see LAMBDA): Hadamard, log2(D) butterfly stages whose partial
    # sums random-walk, plus the division: u sqrt(log2 D + 1) rms(q) + u |qh| per element;
    # the D-term dot: u sqrt(D) ||k * qh||; the fp32 keys (one rounding each): u ||k * qh||;
    # then relu (1-Lipschitz), the products with w (sig_w) and the H-term head sum.
    sig_qh = u * math.sqrt(math.log2(D) + 1) * q2.pow(2).mean(-1).sqrt()  # [B, H]
    kq2 = torch.einsum("bnd,bhd->bnh", k.pow(2), qh.pow(2))
    sig_s = (u * math.sqrt(D + 1) * kq2.sqrt() + u * kq2.sqrt()
             + k.pow(2).sum(-1).sqrt()[..., None] * sig_qh[:, None, :])
    terms = torch.relu(dots) * w[:, None, :]
    sig_logit = torch.sqrt((w.pow(2)[:, None, :] * sig_s.pow(2)).sum(-1)
                           + (torch.relu(dots).pow(2) * sig_w.pow(2)[:, None, :]).sum(-1)
                           + (H + 1) * u * u * terms.pow(2).sum(-1))
    # The ambiguous roundings, exactly: a change dq of q before the Hadamard moves the dot by
    # (H k) . dq, at most |H k| . dev; relu is 1-Lipschitz; |w| is known to sig_w.
    amb = torch.einsum("bnd,bhd->bnh", (k @ hmat).abs(), dev)
    amb_logit = ((w.abs() + LAMBDA * sig_w)[:, None, :] * amb).sum(-1)
    return logits, LAMBDA * sig_logit + 1.01 * amb_logit + 1e-300


def sample_inputs(B, N, H, seed, device, hidden_size=64, rank=32):
    g = torch.Generator().manual_seed(seed)
    states = make_layer_states(hidden=hidden_size, rank=rank, n_heads=H, layers=("l10",), seed=seed)
    weights = {k: v.to(device) for k, v in states["l10"].items()}
    hidden = torch.randn(B, hidden_size, generator=g).to(device)
    ck, _, _ = random_compressed_k(B, n=N, generator=g, device=device)
    return weights, hidden, ck


# B, N, H, max_position, positions: awkward N and B; positions at 0, 1, the last table row, one
# past it, far past it (clamped), with the cheap 4096-row table and the release/serving sizes
# (freqs_cis_at never builds the table, so big max_position costs nothing).
CASES = [
    pytest.param(1, 1, 4, 4096, [0], id="B1-N1-pos0"),
    pytest.param(3, 63, 4, 4096, [1, 4095, 4096], id="B3-N63-edge"),
    pytest.param(3, 65, 16, 4096, [40960, 0, 4094], id="B3-N65-H16-past"),
    pytest.param(1, 1000, 4, 524288, [524287], id="B1-N1000-release-last"),
    pytest.param(3, 0, 4, 4096, [5, 6, 7], id="B3-N0"),
    pytest.param(3, 1000, 64, 1048576, [1048575, 10485760, 123457], id="B3-N1000-H64-serving"),
]


def _check_layer(weights, hidden, ck, positions, max_position, name):
    """reference.layer_logits (fp32) against the oracle fed the reference's fp32 projection."""
    got = ref.layer_logits(hidden, ck, positions, weights, max_position)
    q32, _ = ref.project_query(hidden, weights["wq_a.weight"], weights["q_norm_weight"],
                               weights["wq_b.weight"], weights["weights_proj.weight"])
    _, w64, _, sig_w = oracle_projection(hidden, weights, U32)
    want, bound = oracle_logits(q32.double().cpu(), 0.0, w64, sig_w, dequant_independent(ck),
                                positions, max_position, U32)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert_within(got, want, bound, name)
    return got, want, bound


# --- tests: end to end --------------------------------------------------------------------------
@pytest.mark.parametrize("B,N,H,max_position,positions", CASES)
def test_projection_matches_float64(B, N, H, max_position, positions, device):
    weights, hidden, _ = sample_inputs(B, N, H, seed=N + H, device=device)
    q, w = ref.project_query(hidden, weights["wq_a.weight"], weights["q_norm_weight"],
                             weights["wq_b.weight"], weights["weights_proj.weight"])
    q64, w64, sig_q, sig_w = oracle_projection(hidden, weights, U32)
    assert q.shape == (B, H, D) and w.shape == (B, H)
    assert_within(q, q64, LAMBDA * sig_q, "project_query q (fp32 vs float64)")
    assert_within(w, w64, LAMBDA * sig_w, "project_query w (fp32 vs float64)")


@pytest.mark.parametrize("B,N,H,max_position,positions", CASES)
def test_layer_logits_match_float64_oracle(B, N, H, max_position, positions, device):
    weights, hidden, ck = sample_inputs(B, N, H, seed=N + H, device=device)
    pos = torch.tensor(positions, dtype=torch.int64, device=device)
    got, want, bound = _check_layer(weights, hidden, ck, pos, max_position, "layer_logits fp32")
    if N:
        # Not vacuous: apart from the rare ambiguous roundings the tolerance is at fp32 level
        # (its median is ~1e-5 of the logits' RMS; the mutation test shows what it catches).
        rms = float(want.pow(2).mean().sqrt())
        assert float(bound.median()) < 2e-4 * rms, \
            f"tolerance too loose: median {float(bound.median()):.3e}, logit RMS {rms:.3e}"


@pytest.mark.parametrize("B,N,H,max_position,positions", CASES)
def test_layer_logits_fully_independent_oracle(B, N, H, max_position, positions, device):
    """No reference function on the oracle side at all: the oracle's own float64 projection,
    with the fp32 projection's error bound carried through both bf16 roundings."""
    weights, hidden, ck = sample_inputs(B, N, H, seed=5 * N + H, device=device)
    pos = torch.tensor(positions, dtype=torch.int64, device=device)
    got = ref.layer_logits(hidden, ck, pos, weights, max_position)
    q64, w64, sig_q, sig_w = oracle_projection(hidden, weights, U32)
    want, bound = oracle_logits(q64, LAMBDA * sig_q, w64, sig_w, dequant_independent(ck), pos,
                                max_position, U32)
    assert_within(got, want, bound, "layer_logits fp32 vs independent oracle")


@pytest.mark.parametrize("B,N,H,max_position,positions", CASES[1:4])
def test_float64_reference_matches_oracle_and_fp32(B, N, H, max_position, positions, device):
    weights, hidden, ck = sample_inputs(B, N, H, seed=7 * N + H, device=device)
    pos = torch.tensor(positions, dtype=torch.int64, device=device)
    k = dequant_independent(ck)
    got64 = ref.layer_logits(hidden, ck, pos, weights, max_position, dtype=torch.float64)
    got32 = ref.layer_logits(hidden, ck, pos, weights, max_position)
    assert got64.dtype == torch.float64 and got32.dtype == torch.float32
    q64, w64, sig_q64, sig_w64 = oracle_projection(hidden, weights, U64)
    _, _, sig_q32, sig_w32 = oracle_projection(hidden, weights, U32)
    # The float64 reference rounds its float64 q to bf16; torch may convert through float32
    # (double rounding), so the value it rounds is within U32 |q| (+ its float64 error) of q64.
    want, bound64 = oracle_logits(q64, U32 * q64.abs() + LAMBDA * sig_q64, w64, sig_w64, k, pos,
                                  max_position, U64)
    assert_within(got64, want, bound64, "layer_logits float64 vs oracle")
    want32, bound32 = oracle_logits(q64, LAMBDA * sig_q32, w64, sig_w32, k, pos, max_position, U32)
    assert torch.equal(want32, want)  # same nominal roundings; only the bounds differ
    # fp32 against float64 reference: both within their bounds of the same oracle value.
    assert_within(got32, got64, bound32 + bound64, "layer_logits fp32 vs float64 reference")


def _neox_rope(q, freqs_cis, positions=None, rope_dim=ROPE):
    freqs = (freqs_cis if positions is None
             else freqs_cis[positions.clamp(0, freqs_cis.shape[0] - 1)])
    q_pass, q_rot = q[..., :-rope_dim], q[..., -rope_dim:].float()
    half = rope_dim // 2
    z = torch.complex(q_rot[..., :half], q_rot[..., half:]) * freqs[:, None, :]
    return torch.cat([q_pass, torch.cat([z.real, z.imag], -1).to(q.dtype)], -1)


def _first64_rope(q, freqs_cis, positions=None, rope_dim=ROPE):
    freqs = freqs_cis if positions is None else freqs_cis[positions]
    z = torch.view_as_complex(q[..., :rope_dim].float().reshape(*q.shape[:-1], -1, 2).contiguous())
    rot = torch.view_as_real(z * freqs[:, None, :]).flatten(-2).to(q.dtype)
    return torch.cat([rot, q[..., rope_dim:]], -1)


def _no_bf16(q, rows, dtype=torch.float32):
    return ref.hadamard_transform(ref.apply_rope(q.to(dtype), rows))


def _half_bf16(q, rows, dtype=torch.float32):
    qr = torch.cat([q[..., :-ROPE].to(dtype), q[..., -ROPE:].to(torch.bfloat16).to(dtype)], -1)
    return ref.hadamard_transform(ref.apply_rope(qr, rows).to(dtype))


@pytest.mark.parametrize("target,mutant", [
    pytest.param("prepare_query", _no_bf16, id="no-bf16-rounding"),
    pytest.param("prepare_query", _half_bf16, id="bf16-rounding-rope-half-only"),
    pytest.param("apply_rope", _neox_rope, id="neox-rope"),
    pytest.param("apply_rope", _first64_rope, id="rope-first-64-dims"),
])
def test_oracle_check_detects(target, mutant, monkeypatch, device):
    """The end-to-end tolerance is tight enough to catch each classic mistake of design §10."""
    weights, hidden, ck = sample_inputs(3, 65, 4, seed=3, device=device)
    pos = torch.tensor([1, 4095, 40960], device=device)
    _check_layer(weights, hidden, ck, pos, 4096, "unmutated")  # passes as is
    monkeypatch.setattr(ref, target, mutant)
    with pytest.raises(AssertionError, match="exceeds its bound"):
        _check_layer(weights, hidden, ck, pos, 4096, f"mutant {target}")


def test_prepared_query_is_on_the_bf16_grid(device):
    """All 128 dims of q pass through bf16 (design §3 step 5: the WHOLE q, then the rotated half
    again); the un-rotated half is exactly bf16(q)."""
    g = torch.Generator().manual_seed(11)
    q = (torch.randn(3, 8, D, generator=g) * 3).to(device)
    pos = torch.tensor([3, 777, 4095], device=device)
    rows = ref.freqs_cis_at(pos, 4096)
    out = ref.prepare_query(q, rows)
    hmat = sylvester_hadamard(D) / math.sqrt(D)
    back = out.double().cpu() @ hmat  # the normalized Hadamard is its own inverse
    # fp32 Hadamard error per output <= 9 u ||q||_1 / sqrt(D); through the float64 inverse
    # (orthonormal, entries 1/sqrt(D)) at most 9 u ||q||_1 per element.
    err = 9 * U32 * back.abs().sum(-1, keepdim=True)
    assert_within(back[..., :ROPE], bf16_round(q.double().cpu()[..., :ROPE]),
                  err.expand(-1, -1, ROPE),
                  "unrotated half == bf16(q)")
    # Elements of size >= 0.5 have bf16 spacing >= 2**-9, far above err (~1e-4): each must be
    # a bf16 value within err.
    big = back.abs() >= 0.5
    assert int(big.sum()) > 1000
    dist = (back - bf16_round(back)).abs()
    assert bool((dist[big] <= err.expand_as(back)[big]).all()), \
        f"q before the Hadamard is off the bf16 grid: max distance {float(dist[big].max()):.3e}"


# --- RoPE table (design §3) ---------------------------------------------------------------------
def test_yarn_ramp_bounds():
    assert spec_ramp_bounds() == (15, 25)
    assert ref.yarn_ramp_bounds() == (15, 25)


def test_mixed_freqs():
    got = ref.rope_mixed_freqs()
    assert got.dtype == torch.float32 and got.shape == (32,)
    # Same fp32 formula, same fp32 operations: bit-identical.
    want = spec_mixed_freqs(torch.float32)
    assert torch.equal(got, want), describe_error(got, want)
    # Against exact math: fp32 pow (<= 1 ulp), reciprocal and ramp arithmetic (a few 0.5-ulp
    # roundings): 4 ulp relative (4 * 2**-23) is ample.
    exact = spec_mixed_freqs(torch.float64)
    assert_within(got, exact, 4 * 2.0 ** -23 * exact.abs(), "mixed freqs vs float64")
    assert got[0] == 1.0  # i = 0: base**0, ramp 0
    # Below the ramp: unscaled freqs; at and above `high`: divided by the factor 16.
    base = 1.0 / 160000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    assert_within(got[:15], base[:15], 4 * 2.0 ** -23 * base[:15], "mixed[i < 15]")
    assert_within(got[25:], base[25:] / 16, 4 * 2.0 ** -23 * base[25:] / 16, "mixed[i >= 25]")


# fp32 cos/sin of the same fp32 angle are within ~1-2 ulp of the exact values; an ulp of a
# number of size <= 1 is <= 2**-23, so 2 ulp = 2.4e-7 absolute (the values are unit phasors).
TRIG_ATOL = 2 * 2.0 ** -23


def _phasor64(angles):
    return torch.complex(torch.cos(angles), torch.sin(angles))


def test_precompute_freqs_cis_values():
    table = ref.precompute_freqs_cis(max_position=4096)
    assert table.dtype == torch.complex64 and table.shape == (4096, 32)
    pos = torch.tensor([0, 1, 2, 1000, 4095])
    want = _phasor64(spec_angles(pos, 4096))
    got = table[pos].to(torch.complex128)
    diff = (got - want).abs()
    assert float(diff.max()) <= TRIG_ATOL, (
        f"table vs fp32-angle phasors: max-abs {float(diff.max()):.3e}")
    assert torch.equal(table[0], torch.ones(32, dtype=torch.complex64))
    # The angles are fp32 (design §10: not float64). At position 4095 the fp32 rounding of the
    # angle (ulp 2.4e-4) is visible: float64 angles would be off by far more than TRIG_ATOL.
    exact_angles = pos.double()[:, None] * spec_mixed_freqs(torch.float64)[None, :]
    assert float((got[-1] - _phasor64(exact_angles)[-1]).abs().max()) > 1e-5


def test_freqs_cis_at_equals_table_rows():
    table = ref.precompute_freqs_cis(max_position=4096)
    pos = torch.arange(4096)
    rows = ref.freqs_cis_at(pos, 4096)
    assert rows.dtype == torch.complex64 and rows.shape == (4096, 32)
    # Same fp32 angles; only the sin/cos evaluation path (vectorized body vs. tail) may
    # differ, by <= 1 ulp each side: TRIG_ATOL.
    diff = (rows - table).abs()
    assert float(diff.max()) <= TRIG_ATOL, f"freqs_cis_at vs table: max-abs {float(diff.max()):.3e}"


def test_positions_past_the_table_are_clamped():
    table = ref.precompute_freqs_cis(max_position=4096)
    pos = torch.tensor([4096, 4097, 40960, 10 ** 12, -5, 0])
    rows = ref.freqs_cis_at(pos, 4096)
    for i in range(4):
        assert float((rows[i] - table[4095]).abs().max()) <= TRIG_ATOL
    assert torch.equal(rows[4], rows[5])
    # apply_rope with the full table clamps the same way.
    q = torch.randn(len(pos), 2, D, generator=torch.Generator().manual_seed(1))
    a = ref.apply_rope(q, table, pos)
    b = ref.apply_rope(q, table[pos.clamp(0, 4095)])
    assert torch.equal(a, b)


def test_apply_rope_is_interleaved_on_the_last_64_dims():
    """Would fail for NeoX half-split pairing (partner at +32) or for rotating dims 0..63."""
    table = ref.precompute_freqs_cis(max_position=64)
    p = 37
    q = torch.zeros(1, 1, D)
    q[0, 0, 0] = 1.0   # a non-rotary dim: must be untouched
    q[0, 0, 64] = 1.0  # real part of pair 0 -> (cos th0, sin th0) at dims 64, 65
    q[0, 0, 67] = 1.0  # imaginary part of pair 1 -> (-sin th1, cos th1) at dims 66, 67
    out = ref.apply_rope(q, table, torch.tensor([p]))[0, 0].double()
    th = spec_angles(torch.tensor([p]), 64)[0]
    want = torch.zeros(D, dtype=torch.float64)
    want[0] = 1.0
    want[64], want[65] = math.cos(th[0]), math.sin(th[0])
    want[66], want[67] = -math.sin(th[1]), math.cos(th[1])
    assert_within(out, want, torch.full((D,), TRIG_ATOL), "apply_rope unit vectors")
    assert abs(float(out[65])) > 0.5 and out[96] == 0  # the rotation partner is 65, not 96


def test_apply_rope_keeps_dtype_and_norm():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 5, D, generator=g).to(torch.bfloat16)
    pos = torch.tensor([0, 9, 100])
    out = ref.apply_rope(q, ref.freqs_cis_at(pos, 4096))
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert torch.equal(out[..., :ROPE], q[..., :ROPE])
    assert torch.equal(out[0], q[0])  # position 0: identity rotation, exact
    n_in = q[..., ROPE:].double().reshape(3, 5, 32, 2).norm(dim=-1)
    n_out = out[..., ROPE:].double().reshape(3, 5, 32, 2).norm(dim=-1)
    # bf16 output rounding: each component within 2**-9 relative of a unit-rotated pair.
    assert_within(n_out, n_in, 2.0 ** -8 * n_in + 1e-30, "pair norms preserved")


# --- Hadamard (design §3 step 6) ----------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 64, 128])
@pytest.mark.parametrize("shape", [(), (3,), (2, 5), (0,)], ids=["1d", "B3", "2x5", "empty"])
def test_hadamard_matches_sylvester(n, shape, device):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(*shape, n, generator=g).to(device)
    got = ref.hadamard_transform(x)
    assert got.shape == x.shape and got.dtype == torch.float32
    want = x.double().cpu() @ (sylvester_hadamard(n) / math.sqrt(n)).T
    # log2(n) butterfly stages and the division each round once: per element
    # (log2 n + 2) u ||x||_1 / sqrt(n).
    bound = (math.log2(n) + 2) * U32 * x.double().cpu().abs().sum(-1, keepdim=True) / math.sqrt(n)
    assert_within(got, want, bound.expand_as(want) + 1e-300, f"hadamard n={n}")


def test_hadamard_float64_and_integer_inputs():
    x = torch.randn(4, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = ref.hadamard_transform(x)
    assert got.dtype == torch.float64
    want = x @ sylvester_hadamard(128) / math.sqrt(128)
    bound = 9 * U64 * x.abs().sum(-1, keepdim=True) / math.sqrt(128)
    assert_within(got, want, bound.expand_as(want), "hadamard float64")
    xi = torch.arange(8)
    assert torch.allclose(ref.hadamard_transform(xi).double(),
                          xi.double() @ sylvester_hadamard(8) / math.sqrt(8), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [3, 6, 12, 100, 127])
def test_hadamard_rejects_non_power_of_two(n):
    with pytest.raises(ValueError, match="power-of-two"):
        ref.hadamard_transform(torch.zeros(2, n))


# --- dequantization (design §4) -----------------------------------------------------------------
SCALES = [1.0, 0.0, -0.0, -1.5, 2.0 ** -149, 1e-38, 3.0e38, -3.0e38, float("inf"), 0.1234567]


def _all_bytes_keys():
    """Two rows per scale; row 2j holds bytes 0..127, row 2j+1 bytes 128..255."""
    fp8 = torch.arange(256, dtype=torch.int64).to(torch.uint8).view(2, 128).repeat(len(SCALES), 1)
    scales = torch.tensor(SCALES, dtype=torch.float32).repeat_interleave(2)
    return pack_compressed_k(fp8, scales), fp8, scales


def test_dequant_every_byte_and_odd_scales(device):
    ck, fp8, scales = _all_bytes_keys()
    got = ref.dequant_compressed_k(ck.to(device))
    assert got.shape == (2 * len(SCALES), 128) and got.dtype == torch.float32
    exact = e4m3fn_decode(fp8) * scales.double()[:, None]  # exact: 4 x 24 significant bits
    # fp32 multiply is correctly rounded, so the result is exactly the float64 product rounded
    # to fp32, including subnormal results, overflow to +-inf, 0 * inf = NaN, and the NaN
    # bytes 0x7F / 0xFF, which give NaN for every scale.
    want = exact.float()
    g = got.cpu()
    assert torch.equal(torch.isnan(g), torch.isnan(want)), "NaN pattern"
    assert bool(torch.isnan(g[:, 127]).all()), "byte 0x7F must decode to NaN"
    fin = ~torch.isnan(want)
    assert torch.equal(g[fin], want[fin]), describe_error(g[fin], want[fin])
    assert torch.equal(got.double().cpu()[fin], dequant_independent(ck)[fin].float().double())
    # float64 output: exact product, no rounding at all.
    got64 = ref.dequant_compressed_k(ck.to(device), dtype=torch.float64).cpu()
    assert torch.equal(got64[fin], exact[fin])


@pytest.mark.parametrize("lead", [(), (3,), (2, 3)], ids=["N", "BN", "LBN"])
@pytest.mark.parametrize("N", [0, 1, 65])
def test_dequant_shapes(lead, N, device):
    g = torch.Generator().manual_seed(N)
    ck, fp8, scales = random_compressed_k(*lead, n=N, generator=g, device=device)
    got = ref.dequant_compressed_k(ck)
    assert got.shape == (*lead, N, 128)
    assert torch.equal(got.double().cpu(),
                       (e4m3fn_decode(fp8) * scales.double()[..., None]).float().double())


def test_dequant_other_head_dim_and_errors():
    g = torch.Generator().manual_seed(0)
    ck, fp8, scales = random_compressed_k(2, n=5, generator=g, head_dim=64)
    got = ref.dequant_compressed_k(ck, head_dim=64)
    assert torch.equal(got.double(),
                       (e4m3fn_decode(fp8) * scales.double()[..., None]).float().double())
    with pytest.raises(TypeError, match="uint8"):
        ref.dequant_compressed_k(ck.to(torch.int8), head_dim=64)
    with pytest.raises(ValueError, match="last dim"):
        ref.dequant_compressed_k(ck)  # 68 bytes with head_dim 128


# --- the helpers the tests rely on are right ------------------------------------------------
def test_helpers_agree_with_torch():
    b = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    mine, theirs = e4m3fn_decode(b), b.view(torch.float8_e4m3fn).double()
    assert torch.equal(torch.isnan(mine), torch.isnan(theirs))
    assert torch.equal(mine[~torch.isnan(mine)], theirs[~torch.isnan(theirs)])
    assert torch.isnan(mine).nonzero().flatten().tolist() == [0x7F, 0xFF]
    assert float(mine[0x7E]) == 448.0 and float(mine[0x01]) == 2.0 ** -9
    x = torch.randn(20000, generator=torch.Generator().manual_seed(0)) * torch.exp2(
        torch.randint(-40, 40, (20000,), generator=torch.Generator().manual_seed(1)).float())
    assert torch.equal(bf16_round(x.double()), x.to(torch.bfloat16).double())
    h = sylvester_hadamard(8)
    assert torch.equal(h @ h.T, 8 * torch.eye(8, dtype=torch.float64))
