"""The e4m3 -> bf16 decoder of the dense v2 scorer on sm_90 (``numerics.e4m3_words_to_bf16``),
proven exact without a GPU.

The decoder is PTX inline assembly, which the interpreter cannot run, so the test executes
the assembly text itself: a small emulator for the handful of PTX instructions it uses (32-bit
shifts, and, or, moves into 16-bit halves, and ``mul.rn.bf16x2``, round to nearest even with
subnormals kept) runs it on every e4m3 byte in every byte position of a word, and each output
must equal the byte's e4m3 value exactly (``torch.float8_e4m3fn``), in the documented order
(bytes 0, 2, 1, 3). The kernel's own use of that order (q's dims permuted to match) is checked
numerically by the interpreter tests of the dense scorer, which decode the same order byte by
byte, and on the GPU build by the compile tests (``mul.rn.bf16x2`` in the PTX, no e4m3
conversion).
"""

from __future__ import annotations

import re

import torch

from flashmemory_triton.kernels import numerics

NAN_BYTES = (0x7F, 0xFF)


def _asm_text() -> str:
    return numerics.E4M3_WORDS_TO_BF16_PTX


def _bf16_bits_to_f32(bits: torch.Tensor) -> torch.Tensor:
    return (bits.to(torch.int32) << 16).view(torch.float32)


def _mul_bf16x2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PTX ``mul.rn.bf16x2`` on int64-held 32-bit words: per 16-bit half, the product rounded
    to nearest even (the float32 product of two bf16 values is exact here: the test asserts
    it), subnormals kept."""
    out = torch.zeros_like(a)
    for shift in (0, 16):
        x = _bf16_bits_to_f32((a >> shift) & 0xFFFF).double()
        y = _bf16_bits_to_f32((b >> shift) & 0xFFFF).double()
        prod = (x * y).float()
        assert torch.equal(prod.double(), x * y), "product not exact in float32"
        bits = prod.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
        out |= bits << shift
    return out


def _run_ptx(text: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Execute the decoder's PTX on int64 tensors holding 32-bit values; returns the 16-bit
    outputs ``$0..$3``. Unknown instructions fail the test (the emulator must cover it all)."""
    regs = dict(inputs)
    mask = 0xFFFFFFFF

    def val(tok):
        tok = tok.strip()
        return torch.tensor(int(tok, 0)) if tok.startswith("0x") or tok.isdigit() else regs[tok]

    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        if op == "mov.b32" and args.lstrip().startswith("{"):
            halves, src = re.match(r"\{(.*?)\},\s*(\S+)", args).groups()
            lo, hi = (h.strip() for h in halves.split(","))
            regs[lo], regs[hi] = val(src) & 0xFFFF, (val(src) >> 16) & 0xFFFF
            continue
        dst, *srcs = (a.strip() for a in args.split(","))
        a = val(srcs[0])
        if op == "mov.b32":
            regs[dst] = a & mask
        elif op == "shl.b32":
            regs[dst] = (a << int(srcs[1])) & mask
        elif op == "shr.b32":
            regs[dst] = (a & mask) >> int(srcs[1])
        elif op == "and.b32":
            regs[dst] = a & val(srcs[1])
        elif op == "or.b32":
            regs[dst] = a | val(srcs[1])
        elif op == "mul.rn.bf16x2":
            regs[dst] = _mul_bf16x2(a, val(srcs[1]))
        else:
            raise AssertionError(f"PTX instruction {op!r} not emulated")
    return {k: regs[k] for k in ("$0", "$1", "$2", "$3")}


def test_e4m3_words_to_bf16_is_exact_for_every_byte_in_every_position():
    g = torch.Generator().manual_seed(0)
    table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    byte = torch.arange(256, dtype=torch.int64)
    for pos in range(4):
        # every byte at ``pos``, random bytes elsewhere (they must not leak into it)
        words = torch.randint(0, 256, (256, 4), generator=g, dtype=torch.int64)
        words[:, pos] = byte
        w = sum(words[:, i] << (8 * i) for i in range(4))
        for sign in (1.0, -1.0):  # the multiplier's sign negates every value (a scale's sign)
            _check_word(w, words, sign, table)


def _check_word(w, words, sign, table):
    """Every output of the decoder run on the words ``w`` (bytes ``words``) with the multiplier
    of ``sign``: the byte's e4m3 value times ``sign``, bit for bit."""
    mul = numerics.BF16X2_TWO_POW_120 | (0x80008000 if sign < 0 else 0)
    out = _run_ptx(_asm_text(), {"$4": w, "$5": w & 0x7F7F7F7F, "$6": torch.tensor(mul)})
    # outputs in the order byte 0, 2, 1, 3
    for slot, b in enumerate((0, 2, 1, 3)):
        got = _bf16_bits_to_f32(out[f"${slot}"])
        want = table[words[:, b]] * sign
        finite = ~torch.isin(words[:, b], torch.tensor(NAN_BYTES))
        assert torch.equal(got[finite], want[finite]), (sign, b)
        assert torch.equal(torch.signbit(got[finite]), torch.signbit(want[finite]))
        # NaN bytes decode to +-480 (the kernel flags them per chunk, never relies on this)
        nan_vals = got[~finite].abs()
        assert torch.equal(nan_vals, torch.full_like(nan_vals, 480.0)), (sign, b)


def test_subnormals_and_signed_zero_survive():
    """The smallest e4m3 subnormal (2**-9), the largest (7 * 2**-9), -0 and the largest
    normal (448) in one word each: bit exact, sign included."""
    for value in (2.0 ** -9, -7 * 2.0 ** -9, -0.0, 448.0, -448.0):
        b = int(torch.tensor([value]).to(torch.float8_e4m3fn).view(torch.uint8))
        w = torch.tensor([b | (b << 8) | (b << 16) | (b << 24)], dtype=torch.int64)
        out = _run_ptx(_asm_text(), {"$4": w, "$5": w & 0x7F7F7F7F,
                                     "$6": torch.tensor(numerics.BF16X2_TWO_POW_120)})
        for slot in range(4):
            got = _bf16_bits_to_f32(out[f"${slot}"])
            assert torch.equal(got, torch.tensor([value])), (value, slot)
            assert torch.signbit(got).item() == (value < 0 or str(value) == "-0.0"), value


def test_emulator_rejects_unknown_instructions():
    """The emulator cannot silently skip an instruction it does not model."""
    try:
        _run_ptx("cvt.rn.bf16x2.f32 e, $4, $5;", {"$4": torch.tensor([0]),
                                                   "$5": torch.tensor([0])})
    except AssertionError as e:
        assert "not emulated" in str(e)
    else:
        raise AssertionError("unknown PTX instruction accepted")
