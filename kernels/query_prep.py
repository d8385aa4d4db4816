"""Query-side kernel: bf16 rounding, interleaved RoPE, normalized Hadamard, fp8 quantization.

Input is the projected q (design §3 step 4) of every layer and row, ``[L*B, H, D]`` float32, and
the head weights ``[L*B, H]``. One program handles one (layer, row) and a block of heads:

1. round all of q to bf16 (design §3 step 5);
2. rotate the last ``ROPE_DIM`` dims as interleaved complex pairs by the row's
   ``cos + i sin`` (the RoPE table row, gathered on the host side), rounding the result to
   bf16 again as the release does after its complex64 product;
3. Hadamard: ``q @ H_D / sqrt(D)`` with the Sylvester matrix built in registers from
   ``(-1) ** popcount(i & j)``, as three exact-fp32 dots over the untouched, even and odd dims;
4. store q in the scoring dtype; in ``fp8`` mode quantize each head to e4m3 with scale
   ``max(amax, 1e-4) / 448`` and fold that scale into the head weight (design §5).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashmemory_triton import constants as C

from ._alloc import alloc_output
from .numerics import round_to_bf16, round_to_e4m3


@triton.jit
def _sylvester(rows, cols):
    """``H[rows, cols]`` of the Sylvester Hadamard matrix: ``(-1) ** popcount(rows & cols)``."""
    x = rows[:, None] & cols[None, :]
    x = x ^ (x >> 16)
    x = x ^ (x >> 8)
    x = x ^ (x >> 4)
    x = x ^ (x >> 2)
    x = x ^ (x >> 1)
    return tl.where((x & 1) == 0, 1.0, -1.0)


@triton.jit
def query_prep_kernel(
    q_ptr, w_ptr, cos_ptr, sin_ptr, q_out_ptr, w_out_ptr,
    B, H,
    D: tl.constexpr, ROPE: tl.constexpr, BLOCK_H: tl.constexpr,
    FP8: tl.constexpr, OUT_BF16: tl.constexpr, FP8_MIN_AMAX: tl.constexpr, FP8_MAX: tl.constexpr,
):
    lb = tl.program_id(0).to(tl.int64)  # (layer, row) flattened: l * B + b
    hb = tl.program_id(1)
    b = lb % B
    PASS: tl.constexpr = D - ROPE
    HALF: tl.constexpr = ROPE // 2

    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    base = q_ptr + lb * H * D + heads.to(tl.int64)[:, None] * D  # [BLOCK_H, 1]

    i_pass = tl.arange(0, PASS)
    i_half = tl.arange(0, HALF)
    q_pass = tl.load(base + i_pass[None, :], mask=hmask[:, None], other=0.0)
    q_even = tl.load(base + PASS + 2 * i_half[None, :], mask=hmask[:, None], other=0.0)
    q_odd = tl.load(base + PASS + 2 * i_half[None, :] + 1, mask=hmask[:, None], other=0.0)
    # design §3 step 5: the WHOLE q is rounded to bf16 before RoPE.
    q_pass = round_to_bf16(q_pass)
    q_even = round_to_bf16(q_even)
    q_odd = round_to_bf16(q_odd)

    c = tl.load(cos_ptr + b * HALF + i_half)[None, :]
    s = tl.load(sin_ptr + b * HALF + i_half)[None, :]
    # complex64 product (a + ib)(c + is), then back to bf16 like the release's .to(q.dtype)
    r_even = round_to_bf16(q_even * c - q_odd * s)
    r_odd = round_to_bf16(q_even * s + q_odd * c)

    cols = tl.arange(0, D)
    h_pass = _sylvester(i_pass, cols)
    h_even = _sylvester(PASS + 2 * i_half, cols)
    h_odd = _sylvester(PASS + 2 * i_half + 1, cols)
    # Exact fp32 products (entries are +-1); "ieee" keeps fp32 sums off tf32 tensor cores.
    qh = tl.dot(q_pass, h_pass, input_precision="ieee")
    qh += tl.dot(r_even, h_even, input_precision="ieee")
    qh += tl.dot(r_odd, h_odd, input_precision="ieee")
    qh = qh * (1.0 / tl.sqrt(D * 1.0))

    w = tl.load(w_ptr + lb * H + heads, mask=hmask, other=0.0)
    if FP8:
        amax = tl.max(tl.abs(qh), axis=1)
        scale = tl.maximum(amax, FP8_MIN_AMAX) / FP8_MAX
        qh = round_to_e4m3(qh / scale[:, None])
        w = w * scale
    elif OUT_BF16:
        qh = round_to_bf16(qh)  # so the store's own conversion is exact on every target
    out = q_out_ptr + lb * H * D + heads.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(out, qh.to(q_out_ptr.dtype.element_ty), mask=hmask[:, None])
    tl.store(w_out_ptr + lb * H + heads, w, mask=hmask)


# Heads per program: with 16 the three fp32 Hadamard dots fit in registers (32 spill 0.5-0.8 KB
# a thread on sm_80 and sm_90, see kernels/aot.py), and tl.dot needs at least 16 rows.
QUERY_BLOCK_H = 16


def query_out_dtype(precision: str) -> torch.dtype:
    """Storage dtype of prepared q: bf16 for the bf16 and fp8 modes (fp8 values are exact in
    bf16, and the scoring kernel casts them to e4m3 where the hardware has it)."""
    return torch.bfloat16 if precision in ("bf16", "fp8") else torch.float32


def prepare_query_launch(q: torch.Tensor, w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [L, B, H, D]`` fp32, ``w [L, B, H]`` fp32, ``cos``/``sin`` ``[B, ROPE/2]`` fp32 ->
    prepared ``(q [L, B, H, D], w [L, B, H] fp32)``. Inputs are assumed validated."""
    L, B, H, D = q.shape
    q = q.contiguous().float()
    w = w.contiguous().float()
    q_out = alloc_output(q.shape, query_out_dtype(precision), q.device)
    w_out = alloc_output(w.shape, torch.float32, w.device)
    if q.numel() == 0:
        return q_out, w_out
    grid = (L * B, triton.cdiv(H, QUERY_BLOCK_H))
    query_prep_kernel[grid](
        q, w, cos.contiguous().float(), sin.contiguous().float(), q_out, w_out, B, H,
        D=D, ROPE=C.ROPE_DIM, BLOCK_H=QUERY_BLOCK_H, FP8=precision == "fp8",
        OUT_BF16=q_out.dtype == torch.bfloat16, FP8_MIN_AMAX=C.FP8_QUANT_MIN_AMAX,
        FP8_MAX=C.FP8_E4M3_MAX, num_warps=4,
    )
    return q_out, w_out
