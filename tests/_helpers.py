"""Small, dependency-free builders and checks shared by the tests.

Everything here is written from ``docs/design.md`` directly (bit layouts, rounding rules) and never
calls into ``flashmemory_triton.reference``, so the tests that use it stay independent of the
code they check.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch

from flashmemory_triton import constants as C

U32 = 2.0 ** -24  # unit roundoff of float32 (half an ulp of 1.0)
U64 = 2.0 ** -53  # unit roundoff of float64


# --- bit-level formats ------------------------------------------------------------------------
def e4m3fn_decode(byte_values: torch.Tensor) -> torch.Tensor:
    """Decode float8 e4m3fn bytes to float64 from the bit layout, without torch's fp8 dtype.

    Bit 7 sign, bits 6..3 exponent (bias 7), bits 2..0 mantissa. Exponent 0 is subnormal
    (``m/8 * 2**-6``); there is no infinity; ``S.1111.111`` (0x7F, 0xFF) is NaN.
    """
    b = byte_values.to(torch.int64).cpu()
    sign = torch.where((b & 0x80) != 0, -1.0, 1.0).double()
    exp = ((b >> 3) & 0xF).double()
    man = (b & 0x7).double()
    normal = (1.0 + man / 8.0) * torch.exp2(exp - 7.0)
    subnormal = (man / 8.0) * 2.0 ** -6
    val = sign * torch.where(exp == 0, subnormal, normal)
    return torch.where(((b >> 3) & 0xF == 15) & (b & 0x7 == 7), float("nan"), val)


def bf16_round(x: torch.Tensor) -> torch.Tensor:
    """Round float64 values to the nearest bfloat16 value (ties to even), returned as float64.

    Written from the definition: keep 8 significant bits. Exact for every finite input in the
    normal bfloat16 range (the tests never leave it), with no intermediate float32 rounding.
    """
    x = x.double()
    m, e = torch.frexp(x)  # x = m * 2**e with 0.5 <= |m| < 1
    return torch.round(m * 256.0) * torch.exp2(e.double() - 8.0)  # torch.round: half to even


def sylvester_hadamard(n: int, dtype=torch.float64) -> torch.Tensor:
    """Unnormalized Sylvester Hadamard matrix by the Kronecker recursion
    H_2n = [[H, H], [H, -H]]."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"n must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


# --- compressed keys (row format, design §4) ----------------------------------------------------
def pack_compressed_k(fp8_bytes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Row format ``uint8 [..., N, D + 4]`` from e4m3 bytes ``[..., N, D]`` and scales ``[..., N]``.

    The scale goes in as explicit little-endian float32 bytes (numpy ``'<f4'``), not as a
    native-order view, so the test encodes the format design §4 states.
    """
    assert fp8_bytes.dtype == torch.uint8 and fp8_bytes.shape[:-1] == scales.shape
    le = np.ascontiguousarray(scales.detach().cpu().numpy().astype("<f4")).view(np.uint8)
    scale_bytes = torch.from_numpy(le.reshape(*scales.shape, 4).copy())
    return torch.cat([fp8_bytes.cpu(), scale_bytes], dim=-1).to(fp8_bytes.device)


def random_fp8_bytes(shape, generator: torch.Generator, std: float = 0.5) -> torch.Tensor:
    """e4m3fn bytes of ``randn * std`` (the release demo's keys)."""
    values = torch.randn(*shape, generator=generator) * std
    return values.to(torch.float8_e4m3fn).view(torch.uint8)


def random_compressed_k(*lead: int, n: int, generator: torch.Generator, head_dim: int = C.HEAD_DIM,
                        scale_range=(0.05, 0.2), device="cpu"):
    """Random keys ``uint8 [*lead, n, head_dim + 4]`` plus their fp8 bytes and float32 scales.

    Values as the release demo builds them: ``randn * 0.5`` cast to e4m3, scales uniform in
    ``scale_range``.
    """
    fp8 = random_fp8_bytes((*lead, n, head_dim), generator)
    lo, hi = scale_range
    scales = (lo + (hi - lo) * torch.rand(*lead, n, generator=generator)).float()
    return pack_compressed_k(fp8, scales).to(device), fp8, scales


def dequant_independent(compressed_k: torch.Tensor, head_dim: int = C.HEAD_DIM) -> torch.Tensor:
    """float64 keys from the row format, decoding the e4m3 bits and little-endian scale bytes."""
    ck = compressed_k.cpu()
    vals = e4m3fn_decode(ck[..., :head_dim])
    raw = np.ascontiguousarray(ck[..., head_dim:head_dim + 4].numpy())
    scales = torch.from_numpy(raw.view("<f4").astype(np.float64))  # [..., N, 1]
    return vals * scales


# --- weights and inputs -------------------------------------------------------------------------
def make_layer_states(hidden: int = 64, rank: int = 32, n_heads: int = 4,
                      head_dim: int = C.HEAD_DIM, layers=C.LAYER_NAMES, seed: int = 0,
                      dtype=torch.float32) -> OrderedDict[str, dict]:
    """Tiny random ``{layer: {param: tensor}}`` with the release's relative scales.

    ``wq_a``/``wq_b``/``weights_proj`` are ``randn / sqrt(fan_in)`` so q has O(1) entries (as
    after the real RMSNorm) and ``q_norm_weight`` is ``1 + 0.1 * randn``.
    """
    g = torch.Generator().manual_seed(seed)
    states = OrderedDict()
    for name in layers:
        states[name] = {
            "wq_a.weight": torch.randn(rank, hidden, generator=g) / math.sqrt(hidden),
            "wq_b.weight": torch.randn(n_heads * head_dim, rank, generator=g) / math.sqrt(rank),
            "q_norm_weight": 1.0 + 0.1 * torch.randn(rank, generator=g),
            "weights_proj.weight": torch.randn(n_heads, hidden, generator=g) / math.sqrt(hidden),
        }
        states[name] = {k: v.to(dtype) for k, v in states[name].items()}
    return states


def joint_state_dict(states) -> OrderedDict[str, torch.Tensor]:
    """``{layer: {param: t}}`` -> the flat ``retrievers.<layer>.<param>`` checkpoint layout."""
    return OrderedDict((f"{C.JOINT_PREFIX}{layer}.{k}", v)
                       for layer, params in states.items() for k, v in params.items())


# --- comparisons --------------------------------------------------------------------------------
def error_stats(actual: torch.Tensor, expected: torch.Tensor) -> dict:
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    finite = torch.isfinite(e) & torch.isfinite(a)
    diff = (a - e)[finite].abs()
    ef = e[finite].abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    nz = ef > 0
    max_rel = float((diff[nz] / ef[nz]).max()) if bool(nz.any()) else 0.0
    norm_e = float(ef.pow(2).sum().sqrt())
    rms_rel = float(diff.pow(2).sum().sqrt()) / norm_e if norm_e > 0 else (
        0.0 if max_abs == 0 else math.inf)
    return {"max_abs": max_abs, "max_rel": max_rel, "rms_rel": rms_rel}


def describe_error(actual, expected) -> str:
    s = error_stats(actual, expected)
    return (f"max-abs {s['max_abs']:.3e}, max-rel {s['max_rel']:.3e}, "
            f"rms-rel {s['rms_rel']:.3e}, shape {tuple(expected.shape)}")


def _check_nonfinite(actual, expected, name):
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), (f"{name}: NaN pattern differs ({int(nan_a.sum())} NaN in "
                                       f"actual, {int(nan_e.sum())} expected)")
    inf_e = torch.isinf(e)
    assert torch.equal(torch.isinf(a), inf_e) and torch.equal(a[inf_e], e[inf_e]), \
        f"{name}: infinities differ"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol_rms: float, name: str):
    """Relative RMS error ``||a - e|| / ||e||`` (over finite entries) at most ``rtol_rms``.

    NaN and inf must sit at the same places. The message reports max-abs, max-rel and rms-rel.
    """
    _check_nonfinite(actual, expected, name)
    s = error_stats(actual, expected)
    assert s["rms_rel"] <= rtol_rms, (f"{name}: relative RMS error {s['rms_rel']:.3e} > "
                                      f"{rtol_rms:.1e} ({describe_error(actual, expected)})")


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, name: str):
    """Elementwise ``|a - e| <= bound`` (a derived error bound); reports the worst offender."""
    _check_nonfinite(actual, expected, name)
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    b = torch.as_tensor(bound).double().cpu().expand_as(e)
    if e.numel() == 0:
        return
    diff = (a - e).abs()
    ratio = torch.where(torch.isfinite(e), diff / b.clamp_min(1e-300), torch.zeros_like(diff))
    worst = int(ratio.argmax())
    assert float(ratio.max()) <= 1.0, (
        f"{name}: |actual - expected| exceeds its bound at flat index {worst}: "
        f"{float(diff.flatten()[worst]):.3e} > {float(b.flatten()[worst]):.3e} "
        f"({int((ratio > 1).sum())} of {ratio.numel()} entries; {describe_error(a, e)})")


# --- NaN poisoning ------------------------------------------------------------------------------
def poison_value(dtype: torch.dtype):
    """The fill that decodes as NaN: NaN for floats, 0xFF for uint8 keys (e4m3 NaN byte, and
    0xFFFFFFFF is a NaN float32 scale)."""
    return 0xFF if dtype == torch.uint8 else float("nan")


def nan_padded(t: torch.Tensor, pad: int = 257) -> torch.Tensor:
    """A copy of ``t`` living inside a larger buffer whose other elements are NaN-poison.

    Any out-of-bounds read by a kernel picks up NaN (or 0xFF bytes) and shows in its output.
    The result is contiguous and has ``t``'s shape, but its storage offset is ``pad``.
    """
    buf = torch.full((t.numel() + 2 * pad,), poison_value(t.dtype), dtype=t.dtype, device=t.device)
    view = buf[pad:pad + t.numel()].view(t.shape)
    view.copy_(t)
    return view


def poisoned_empty(shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """An output buffer pre-filled with NaN-poison, so unwritten entries are detectable."""
    return torch.full(shape, poison_value(dtype), dtype=dtype, device=device)
