"""Exact number-format helpers shared by the kernels: e4m3fn decode and rounding, bf16 rounding.

Two decoders: the hardware conversion (sm_89+, where Triton has ``tl.float8e4nv``) and a bit
decoder built from integer ops that runs on any target, sm_80 included, and in the
interpreter. Both are exact: every finite e4m3 value is representable in bf16 and fp32.
NaN bytes (0x7F, 0xFF) are not relied on here; the scoring kernel flags them per chunk.
"""

import os

import triton
import triton.language as tl

# The packed PTX e4m3 -> bf16 decoder (``e4m3_words_to_bf16``) is opt-in: the interpreter cannot
# run inline assembly, so CI checks only an emulation of its text, and no GPU has yet run it
# against the reference (the tensor cores' and ``mul.rn.bf16x2``'s handling of bf16 subnormals
# included). ``FLASHMEMORY_BF16_ASM=1`` switches it on for sm_90 launches;
# ``scripts/gpu_check.sh`` runs the GPU tests with it on and off. Default: the decoder the
# interpreter runs, compiled for the GPU.
BF16_ASM_ENV = "FLASHMEMORY_BF16_ASM"


def bf16_asm_enabled(device) -> bool:
    """Whether bf16 launches on ``device`` decode keys with the PTX decoder (opt-in, above)."""
    return getattr(device, "type", None) == "cuda" and os.environ.get(BF16_ASM_ENV, "0") == "1"


@triton.jit
def e4m3_bits_to_f32(b):
    """uint8 e4m3fn bytes -> float32 values, exact, with integer ops only (any target).

    Normal: ``(1 + m/8) * 2**(e - 7)`` is the float32 with exponent field ``e + 120`` and the
    mantissa bits shifted up by 20. Subnormal (e == 0): ``m * 2**-9``, built as an int -> float
    conversion times an exact power of two, so no float32 denormal (and no flush-to-zero) is
    ever involved. NaN encodings decode to 480 and must be flagged by the caller.
    """
    x = b.to(tl.int32)
    sign = (x & 0x80) << 24
    e = (x >> 3) & 0xF
    m = x & 0x7
    normal = (sign | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = (m.to(tl.float32) * 0.001953125)  # m * 2**-9, exact
    sub = tl.where(sign != 0, -sub, sub)
    return tl.where(e == 0, sub, normal)


@triton.jit
def round_to_e4m3(x):
    """Round float32 ``x`` (|x| <= 448) to the nearest e4m3fn value, ties to even.

    The e4m3 grid spacing at ``|x|`` is ``2**(max(floor(log2|x|), -6) - 3)``; dividing by that
    power of two is exact, the magic-number add rounds to the nearest integer with ties to
    even (|x / q| < 2**22), and the product back is exact. Matches
    ``x.to(torch.float8_e4m3fn)`` for every input in range, subnormals included.
    """
    bits = x.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - 127
    exp = tl.maximum(exp, -6)
    quantum = ((exp - 3 + 127) << 23).to(tl.float32, bitcast=True)
    y = x / quantum
    magic = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds to integer, ties even
    r = (y + magic) - magic
    return r * quantum


@triton.jit
def round_to_bf16(x):
    """float32 -> nearest bf16 value (ties to even), returned as float32.

    Written with integer ops because ``.to(tl.bfloat16)`` rounds differently across targets
    (the interpreter truncates; ``fp_downcast_rounding`` is ignored there), and the model's q
    rounding (design §3 step 5) must be round-to-nearest-even everywhere to match torch. The result
    is exactly representable in bf16, so a later ``.to(tl.bfloat16)`` is exact. NaN stays NaN;
    overflow rounds to inf as in torch.
    """
    bits = x.to(tl.int32, bitcast=True)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) & -65536).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, rounded)


# e4m3 bits placed in a bf16 (the sign to bit 15, the 7 low bits shifted left by 4: exponent
# field and mantissa line up, 7 - 127 = -120 apart in bias) are the e4m3 value times 2**-120,
# exactly, subnormals included (an e4m3 subnormal m * 2**-9 becomes the bf16 subnormal
# m * 2**-129); one bf16 multiply by 2**120 (0x7B80: biased exponent 247; exact, the product is
# the e4m3 value) finishes it, or by -2**120 (0xFB80) to negate it as well (exact too).
BF16X2_TWO_POW_120 = 0x7B807B80
# The decoder's PTX, one packed register per byte pair ($4: the word, $5: the word & 0x7F7F7F7F,
# $6: the multiplier, 2**120 or -2**120 in both halves; $0..$3: bytes 0, 2, 1, 3 as bf16).
# tests/test_numerics.py executes this text on every byte.
E4M3_WORDS_TO_BF16_PTX = """{
        .reg .b32 e, o, s;
        shl.b32 e, $5, 4;
        and.b32 e, e, 0x07F007F0;
        shl.b32 s, $4, 8;
        and.b32 s, s, 0x80008000;
        or.b32 e, e, s;
        mul.rn.bf16x2 e, e, $6;
        shr.b32 o, $5, 4;
        and.b32 o, o, 0x07F007F0;
        and.b32 s, $4, 0x80008000;
        or.b32 o, o, s;
        mul.rn.bf16x2 o, o, $6;
        mov.b32 {$0, $1}, e;
        mov.b32 {$2, $3}, o;
        }"""
_E4M3_WORDS_TO_BF16_PTX = tl.constexpr(E4M3_WORDS_TO_BF16_PTX)


@triton.jit
def e4m3_words_to_bf16(w, x, mul):
    """int32 words of four e4m3 bytes ``w`` (and ``x = w & 0x7F7F7F7F``) -> their four bf16
    values times +-1, exact, as ``(byte 0, byte 2, byte 1, byte 3)``: the pairing that needs no
    byte permute (each pair is one packed register, bytes 0 and 2 from ``x << 4``, bytes 1 and
    3 from ``x >> 4``), then one packed ``mul.rn.bf16x2`` by ``mul`` (int32 bits of a bf16 pair:
    ``BF16X2_TWO_POW_120``, or with both sign bits set to negate: a chunk's scale sign folded
    in for free; PTX: bf16 arithmetic keeps subnormals). sm_90 PTX (inline assembly): not for
    the interpreter (opt-in: ``BF16_ASM_ENV``). NaN bytes decode to +-480 and must be flagged by
    the caller. ``tests/test_numerics.py`` executes the PTX text
    (``E4M3_WORDS_TO_BF16_PTX``) in an emulator on all 256 bytes in every byte position."""
    return tl.inline_asm_elementwise(
        asm=_E4M3_WORDS_TO_BF16_PTX,
        constraints="=h,=h,=h,=h,r,r,r", args=[w, x, mul],
        dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
