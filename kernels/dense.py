"""Dense scorer v2: a persistent kernel whose steady state is key loads, tensor-core dots and
the ReLU-weighted head sum, nothing else (design §12).

Same function as ``score.fused_score_kernel`` (v1, kept for comparison as a bench provider):
``logit[l, b, n] = |s_n| * sum_h relu(fp8_n' . q_lh) * w_lh + offset`` where ``fp8_n'`` is the
chunk's e4m3 bytes with the sign of its scale folded in, then sigmoid and the max/mean ensemble.

What changes (each item removes instructions from the per-tile loop, see ``kernels.aot
--report``):

* Persistent grid ``(P, B)``: program ``(p, b)`` scores tiles ``p, p + P, ...`` of row ``b``
  (``P`` about ``CTAS_PER_SM x SMs / B``). q and w of every layer of row ``b`` are loaded ONCE
  before the tile loop (into registers; the compiler stages the dot operand in shared memory),
  and, in fp8 mode, converted to e4m3 once (exact: q holds e4m3 values).
* The next tile's key bytes and scales are loaded before the current tile is scored (a
  register prefetch), so the loads overlap the dots and the epilogue.
* All heads in one dot per layer (``H_PAD`` heads, compile-time), full tiles without masks:
  the last, partial tile (``N % BLOCK_N`` chunks) is scored after the loop by one program,
  with masks.
* The scale's sign is folded into the key bytes (XOR of the e4m3 sign bit: exact, e4m3 is
  sign-magnitude), so the epilogue is one NaN-aware max and one FMA per (chunk, head).

Non-finite inputs (same policy as v1): a chunk with an e4m3 NaN byte (0x7F/0xFF) or a
non-finite or overflowing scale (``|s| > C.MAX_KEY_SCALE``) scores NaN in every layer, an
overflowed logit (+-inf) is NaN, and NaN in q or w propagates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashmemory_triton import constants as C
from flashmemory_triton.utils import _device

from . import configs
from ._alloc import alloc_output
from .numerics import BF16X2_TWO_POW_120, bf16_asm_enabled, e4m3_bits_to_f32, e4m3_words_to_bf16
from .score import _ensemble_add, _ensemble_init, key_views

_MAX_KEY_SCALE = tl.constexpr(C.MAX_KEY_SCALE)  # scales past it overflow on dequant: NaN chunk
_BF16X2_TWO_POW_120 = tl.constexpr(BF16X2_TWO_POW_120)

# How each thread sums its heads (``configs.DENSE_V2_HEAD_SUM_CHAIN``): one explicit FMA chain,
# where the installed Triton would otherwise reduce them as a tree (a multiply and an add per
# head instead of one FMA)
_HEAD_SUM_CHAIN = tl.constexpr(configs.pick(configs.DENSE_V2_HEAD_SUM_CHAIN))

PRECISIONS = ("bf16", "fp8")  # v2's modes; tf32/fp32 (debug, fp32 key tiles) stay on v1


@triton.jit
def _operand_order(q, D: tl.constexpr, PRECISION: tl.constexpr):
    """q ``[heads, D]`` loaded in dim order -> the order of ``_tile_operand``'s key columns.
    bf16: column ``4c + t`` holds dim ``4c + (0, 2, 1, 3)[t]`` (bits 0 and 1 swapped: the
    packed decoder's pairing), a swap within each thread's registers (q is still loaded with
    16-byte vectors); fp8: in order."""
    if PRECISION == "bf16":
        q = tl.reshape(tl.permute(tl.reshape(q, (q.shape[0], D // 4, 2, 2)), (0, 1, 3, 2)),
                       (q.shape[0], D))
    return q


@triton.jit
def _prepare_q(q_ptr, w_ptr, lb, H, D: tl.constexpr, H_PAD: tl.constexpr,
               PRECISION: tl.constexpr, HW_FP8: tl.constexpr, BF16_DOT_VIA_F32: tl.constexpr):
    """One layer's ``q^T [D, H_PAD]`` as the dot's operand and ``w [H_PAD]``; padded heads
    are 0 (they add relu(0) * 0)."""
    heads = tl.arange(0, H_PAD)
    hmask = heads < H
    cols = tl.arange(0, D)
    q = tl.load(q_ptr + (lb * H + heads.to(tl.int64))[:, None] * D + cols[None, :],
                mask=hmask[:, None], other=0.0)
    q = _operand_order(q, D, PRECISION)
    w = tl.load(w_ptr + lb * H + heads, mask=hmask, other=0.0)
    if PRECISION == "fp8" and HW_FP8:
        q = q.to(tl.float32).to(tl.float8e4nv)  # exact: q holds e4m3 values
    else:
        q = q.to(tl.bfloat16)
    return tl.trans(q), w


@triton.jit
def _load_tile(kw_ptr, kf_ptr, row_words, rows, nmask, D: tl.constexpr, MASKED: tl.constexpr):
    """The tile's key bytes as int32 words ``[BLOCK_N, D // 4]`` at
    ``kw_ptr + rows * row_words + col`` and its scales at ``kf_ptr + rows * row_words + D / 4``
    (``rows`` int32 within the tile; the tile's int64 base is already in the pointers). No masks
    unless ``MASKED``."""
    cols = tl.arange(0, D // 4)
    offs = rows * row_words
    if MASKED:
        kw = tl.load(kw_ptr + offs[:, None] + cols[None, :], mask=nmask[:, None], other=0)
        scale = tl.load(kf_ptr + offs + D // 4, mask=nmask, other=1.0)
    else:
        kw = tl.load(kw_ptr + offs[:, None] + cols[None, :])
        scale = tl.load(kf_ptr + offs + D // 4)
    return kw, scale


@triton.jit
def _sigmoid(x):
    # div.full (2 ulp, not IEEE division's range fix-ups): far inside every mode's tolerance
    return tl.fdiv(1.0, 1.0 + tl.exp(-x))


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _tile_operand(kw, scale, D: tl.constexpr, PRECISION: tl.constexpr, HW_FP8: tl.constexpr,
                  BF16_ASM: tl.constexpr = False):
    """The dot operand ``[BLOCK_N, D]`` with the scale's sign folded into every e4m3 sign bit
    (exact: e4m3 is sign-magnitude), and ``|scale|``, NaN for a bad chunk (an e4m3 NaN byte or
    a non-finite scale). Works on 4-byte words: a byte is 0x7F/0xFF exactly when its low 7 bits
    plus 1 carry into bit 7, which no other byte's sum reaches.

    bf16: the columns hold bytes 0, 2, 1, 3 of each word (``_operand_order``: q is put in
    that order), the pairing ``numerics.e4m3_words_to_bf16`` decodes without byte permutes;
    ``BF16_ASM`` (sm_90 only) uses it, otherwise (the interpreter) the same order is decoded
    byte by byte. fp8: bytes in order."""
    # 0x80808080 where the scale is negative: its sign bit, arithmetic-shifted over the word
    sign = (scale.to(tl.int32, bitcast=True) >> 31) & -2139062144
    if PRECISION == "bf16" and BF16_ASM:
        # the decoder's multiplier carries the sign instead: -2**120 (exact either way)
        mul = tl.broadcast_to(((sign & -2147450880) | _BF16X2_TWO_POW_120)[:, None], kw.shape)
    else:
        kw = kw ^ sign[:, None]
    # (the carry bits 0x80808080 are masked once a row, after the OR over the row's words)
    x = kw & 0x7F7F7F7F
    nan = x + 0x01010101
    # NaN, infinite or overflowing scale (|s| > C.MAX_KEY_SCALE; NaN compares False)
    bad = ((tl.reduce(nan, 1, _or) & -2139062144) != 0) | ~(tl.abs(scale) <= _MAX_KEY_SCALE)
    scale = tl.where(bad, float("nan"), tl.abs(scale))
    # words -> elements: reshape(join(join(a0, a1), join(b0, b1))) lays out a0, b0, a1, b1
    if PRECISION == "bf16" and BF16_ASM:
        e0, e2, e1, e3 = e4m3_words_to_bf16(kw, x, mul)
        return tl.reshape(tl.join(tl.join(e0, e1), tl.join(e2, e3)), (kw.shape[0], D)), scale
    b0 = (kw & 0xFF).to(tl.uint8)
    b1 = ((kw >> 8) & 0xFF).to(tl.uint8)
    b2 = ((kw >> 16) & 0xFF).to(tl.uint8)
    b3 = ((kw >> 24) & 0xFF).to(tl.uint8)
    if PRECISION == "bf16":
        # bytes 0, 2, 1, 3 of each word (``_operand_order``: the GPU decoder's pairing)
        kb = tl.reshape(tl.join(tl.join(b0, b1), tl.join(b2, b3)), (kw.shape[0], D))
    else:
        kb = tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), (kw.shape[0], D))  # 0 1 2 3
    if HW_FP8:
        k = kb.to(tl.float8e4nv, bitcast=True)
        if PRECISION == "bf16":
            k = k.to(tl.bfloat16)
    else:
        k = e4m3_bits_to_f32(kb).to(tl.bfloat16)  # exact: e4m3 values fit in bf16
    return k, scale


@triton.jit
def _layer_partial(k, qt, w, BLOCK_N: tl.constexpr, H_PAD: tl.constexpr,
                   BF16_DOT_VIA_F32: tl.constexpr):
    """``sum_h relu(k . q_h) * w_h`` (sign already in ``k``) as two partial sums ``[BLOCK_N, 2]``
    over the first and the second half of the heads: with 8 warps each warpgroup holds one
    half, so the cross-warp half of the reduction is left to ``_finish_layers``, once for all
    layers."""
    if BF16_DOT_VIA_F32:
        # exact products either way: e4m3 x bf16 fit in fp32
        x = tl.dot(k.to(tl.float32), qt.to(tl.float32), input_precision="ieee")
    else:
        x = tl.dot(k, qt)
    x = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
    if not _HEAD_SUM_CHAIN:
        return tl.sum(tl.reshape(x * w[None, :], (BLOCK_N, 2, H_PAD // 2)), axis=2)
    J: tl.constexpr = H_PAD // 8  # in-thread heads a row and warpgroup: 8-column groups x 2
    # column 8 * jg + 2 * lane4 + p of a half -> [n, half, lane4, (jg, p)]: the in-thread
    # index last, split into single values and summed as one FMA chain
    xs = (tl.reshape(tl.permute(tl.reshape(x, (BLOCK_N, 2, J // 2, 4, 2)), (0, 1, 3, 2, 4)),
                     (BLOCK_N, 2, 4, J)),)
    wv = (tl.reshape(tl.permute(tl.reshape(w, (2, J // 2, 4, 2)), (0, 2, 1, 3)), (2, 4, J)),)
    for _lvl in tl.static_range(J.bit_length() - 1):
        nx = ()
        nw = ()
        for i in tl.static_range(len(xs)):
            a, b = tl.split(tl.reshape(xs[i], xs[i].shape[:-1] + (xs[i].shape[-1] // 2, 2)))
            nx = nx + (a, b)
            c, d = tl.split(tl.reshape(wv[i], wv[i].shape[:-1] + (wv[i].shape[-1] // 2, 2)))
            nw = nw + (c, d)
        xs = nx
        wv = nw
    s = tl.reshape(xs[0], (BLOCK_N, 2, 4)) * tl.reshape(wv[0], (2, 4))[None, :, :]
    for i in tl.static_range(1, len(xs)):
        s = s + tl.reshape(xs[i], (BLOCK_N, 2, 4)) * tl.reshape(wv[i], (2, 4))[None, :, :]
    return tl.sum(s, axis=2)


@triton.jit
def _score_tile(kb, scale, qts, ws, logit_offset, out_n, nmask, scores_ptr, logits_ptr,
                lstride, L: tl.constexpr, D: tl.constexpr, H_PAD: tl.constexpr,
                BLOCK_N: tl.constexpr,
                PRECISION: tl.constexpr, HW_FP8: tl.constexpr, ENSEMBLE_MEAN: tl.constexpr,
                WRITE_LOGITS: tl.constexpr, BF16_DOT_VIA_F32: tl.constexpr,
                MASKED: tl.constexpr, BF16_ASM: tl.constexpr = False):
    """Score one shared-keys tile in every layer and store its ensemble (and logits):
    ``out_n`` int64 output offsets of row ``b`` (``b * N + n``)."""
    k, abs_scale = _tile_operand(kb, scale, D, PRECISION, HW_FP8, BF16_ASM)
    # Every layer's two half-head sums, then ONE cross-warp reduction for all of them (up to 4
    # layers joined into one tensor; more go in groups of 4).
    # max: the NaN-aware max of the logits, then ONE sigmoid (monotonic: the same as the max
    # of the sigmoids); mean: the sum of the sigmoids.
    ens = _ensemble_init(BLOCK_N, ENSEMBLE_MEAN)
    # max without logits: an overflowed logit (+-inf) makes the score NaN through
    # ``max + logit * 0`` (NaN for +-inf and NaN, +-0 otherwise), once the max is known: one
    # FMA a layer instead of a compare and a select
    logits = ()
    for l0 in tl.static_range(0, L, 4):
        p0 = _layer_partial(k, qts[l0], ws[l0], BLOCK_N, H_PAD, BF16_DOT_VIA_F32)
        p1 = p0
        p2 = p0
        p3 = p0
        if l0 + 1 < L:
            p1 = _layer_partial(k, qts[l0 + 1], ws[l0 + 1], BLOCK_N, H_PAD, BF16_DOT_VIA_F32)
        if l0 + 2 < L:
            p2 = _layer_partial(k, qts[l0 + 2], ws[l0 + 2], BLOCK_N, H_PAD, BF16_DOT_VIA_F32)
        if l0 + 3 < L:
            p3 = _layer_partial(k, qts[l0 + 3], ws[l0 + 3], BLOCK_N, H_PAD, BF16_DOT_VIA_F32)
        # [BLOCK_N, 2 halves, 2, 2] -> the halves summed across warps in one exchange
        both = tl.sum(tl.join(tl.join(p0, p1), tl.join(p2, p3)), axis=1)  # [BLOCK_N, 2, 2]
        a, b = tl.split(both)
        s0, s1 = tl.split(a)
        s2, s3 = tl.split(b)
        sums = (s0, s1, s2, s3)
        for j in tl.static_range(4):
            if l0 + j < L:
                logit = sums[j] * abs_scale + logit_offset
                if ENSEMBLE_MEAN or WRITE_LOGITS:
                    # an overflowed logit (+-inf) is NaN, as in reference.pin_nonfinite
                    logit = tl.where(tl.abs(logit) == float("inf"), float("nan"), logit)
                else:
                    logits = logits + (logit,)
                if WRITE_LOGITS:
                    if MASKED:
                        tl.store(logits_ptr + (l0 + j) * lstride + out_n, logit, mask=nmask)
                    else:
                        tl.store(logits_ptr + (l0 + j) * lstride + out_n, logit)
                if ENSEMBLE_MEAN:
                    ens = _ensemble_add(ens, logit, True)
                else:
                    ens = tl.maximum(ens, logit, propagate_nan=tl.PropagateNan.ALL)
    if ENSEMBLE_MEAN:
        ens = ens / L
    elif WRITE_LOGITS:
        ens = _sigmoid(ens)
    else:
        for i in tl.static_range(L):
            ens = ens + logits[i] * 0.0  # + 0 (exact; -0 may become +0: same sigmoid) or NaN
        ens = _sigmoid(ens)
    if MASKED:
        tl.store(scores_ptr + out_n, ens, mask=nmask)
    else:
        tl.store(scores_ptr + out_n, ens)


@triton.jit
def dense_score_kernel(
    kw_ptr, kf_ptr,  # int32 / float32 views of the key buffer
    q_ptr, w_ptr, scores_ptr, logits_ptr,
    B, N, H,
    stride_kb, stride_kn,  # shared key buffer [B, N, 132]: strides in 4-byte words
    logit_offset,
    L: tl.constexpr, D: tl.constexpr, H_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    ROW_WORDS: tl.constexpr,  # > 0: rows are contiguous with this many words (33); 0: runtime
    PRECISION: tl.constexpr, HW_FP8: tl.constexpr,
    ENSEMBLE_MEAN: tl.constexpr, WRITE_LOGITS: tl.constexpr,
    BF16_DOT_VIA_F32: tl.constexpr,  # interpreter only: its bf16 dot multiplies raw bits
    PREFETCH: tl.constexpr = True,  # load the next tile's keys before scoring this one
    BF16_ASM: tl.constexpr = False,  # sm_90: decode e4m3 -> bf16 with PTX (not interpretable)
):
    """Shared keys (one buffer for every layer): each tile is read once for all L layers."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    b = tl.program_id(1).to(tl.int64)
    if ROW_WORDS > 0:
        row_words = ROW_WORDS
    else:
        row_words = stride_kn
    # q^T and w of every layer of row b, once for all the tiles this program scores.
    qts = ()
    ws = ()
    for l in tl.static_range(L):
        qt, w = _prepare_q(q_ptr, w_ptr, l * B + b, H, D, H_PAD, PRECISION, HW_FP8,
                           BF16_DOT_VIA_F32)
        qts = qts + (qt,)
        ws = ws + (w,)
    rows = tl.arange(0, BLOCK_N)
    row_base = b * stride_kb  # words
    out_base = b * N
    lstride = B.to(tl.int64) * N
    n_full = N // BLOCK_N
    tile_words = BLOCK_N * row_words.to(tl.int64)
    nmask = rows < BLOCK_N  # unused by full tiles

    # Steady state: full tiles without masks, the next tile's keys loaded before this one is
    # scored (the prefetch index is clamped, so it never leaves the buffer). One code path for
    # the GPU and the interpreter (whose range() cannot take tensor bounds): a while loop.
    t = pid
    if PREFETCH:
        t0 = tl.minimum(pid, tl.maximum(n_full - 1, 0))
        # prologue: the first tile, masked (a program without a full tile loads nothing)
        kb, scale = _load_tile(kw_ptr + row_base + t0 * tile_words,
                               kf_ptr + row_base + t0 * tile_words, row_words, rows,
                               rows < N - t0 * BLOCK_N, D, True)
        while t < n_full:
            tn = tl.minimum(t + nprog, n_full - 1)
            kb_next, scale_next = _load_tile(kw_ptr + row_base + tn * tile_words,
                                             kf_ptr + row_base + tn * tile_words, row_words,
                                             rows, nmask, D, False)
            _score_tile(kb, scale, qts, ws, logit_offset, out_base + t * BLOCK_N + rows, nmask,
                        scores_ptr, logits_ptr, lstride, L, D, H_PAD, BLOCK_N, PRECISION,
                        HW_FP8, ENSEMBLE_MEAN, WRITE_LOGITS, BF16_DOT_VIA_F32, False, BF16_ASM)
            kb = kb_next
            scale = scale_next
            t += nprog
    else:
        # no register prefetch (where it would not fit in registers): the other programs on
        # the SM, if any, and the loads' own latency hiding are all the overlap there is
        while t < n_full:
            kb, scale = _load_tile(kw_ptr + row_base + t * tile_words,
                                   kf_ptr + row_base + t * tile_words, row_words, rows,
                                   nmask, D, False)
            _score_tile(kb, scale, qts, ws, logit_offset, out_base + t * BLOCK_N + rows, nmask,
                        scores_ptr, logits_ptr, lstride, L, D, H_PAD, BLOCK_N, PRECISION,
                        HW_FP8, ENSEMBLE_MEAN, WRITE_LOGITS, BF16_DOT_VIA_F32, False, BF16_ASM)
            t += nprog
    # The partial last tile, masked, by the program whose turn it is.
    if N % BLOCK_N != 0:
        if pid == n_full % nprog:
            nmask = rows < N - n_full * BLOCK_N
            kb, scale = _load_tile(kw_ptr + row_base + n_full * tile_words,
                                   kf_ptr + row_base + n_full * tile_words, row_words, rows,
                                   nmask, D, True)
            _score_tile(kb, scale, qts, ws, logit_offset, out_base + n_full * BLOCK_N + rows,
                        nmask, scores_ptr, logits_ptr, lstride, L, D, H_PAD, BLOCK_N, PRECISION,
                        HW_FP8, ENSEMBLE_MEAN, WRITE_LOGITS, BF16_DOT_VIA_F32, True, BF16_ASM)


# --- host side ---------------------------------------------------------------------------------
CTAS_PER_SM = 1  # from the compile report: the v2 tile at 8 warps holds one CTA per SM
INTERPRETER_PROGRAMS = 3  # several, so the round-robin tile walk is exercised off the GPU


def dense_launch_config(capability: tuple[int, int] | None, N: int, precision: str = "bf16",
                        triton_version: tuple[int, int] | None = None) -> dict:
    """Launch parameters of the v2 kernel (see ``kernels.aot --report``; spill-free under every
    supported Triton, ``tests/test_compile.py``). sm_90: 64-chunk tiles, 8 warps: the two
    warpgroups split the heads, so a thread holds 32 accumulators and 16 head weights a layer
    (128-chunk tiles, 64 and 96, spill), and the next tile is prefetched where it fits in
    registers (``configs.DENSE_V2_PREFETCH``). Interpreter: the largest tile that fits N
    (fewer numpy steps), prefetching, so the tests run the GPU's code path."""
    if capability is None:
        return dict(BLOCK_N=min(128, max(16, triton.next_power_of_2(max(N, 1)))), num_warps=4,
                    num_stages=1, PREFETCH=True)
    prefetch = configs.pick(configs.DENSE_V2_PREFETCH, triton_version)[precision]
    return dict(BLOCK_N=64, num_warps=8, num_stages=1, PREFETCH=prefetch)


def serves(precision: str, ensemble_mean: bool, write_logits: bool,
           triton_version: tuple[int, int] | None = None) -> bool:
    """Whether v2 serves this mode and epilogue on sm_90 with the installed (or given) Triton:
    every spill-free combination (``configs.DENSE_V2_BF16_EPILOGUES``)."""
    if precision not in PRECISIONS:
        return False
    if precision == "fp8":
        return True
    epilogue = "max" if not (ensemble_mean or write_logits) else "other"
    return epilogue in configs.pick(configs.DENSE_V2_BF16_EPILOGUES, triton_version)


def _programs(device: torch.device, B: int, tiles: int) -> int:
    """Programs per row: at most CTAS_PER_SM x SMs in all (rounded down, so the grid is one
    wave: 17 programs a row at B = 8 on 132 SMs would leave 4 for a second wave, doubling the
    time), at least one per row."""
    if device.type != "cuda":
        return max(1, min(tiles, INTERPRETER_PROGRAMS))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(tiles, sms * CTAS_PER_SM // B))


def dense_score_launch(q: torch.Tensor, w: torch.Tensor, compressed_k: torch.Tensor, *,
                       precision: str, hw_fp8: bool, ensemble: str = "max",
                       logit_offset: float = 0.0, return_logits: bool = False,
                       prefetch: bool | None = None, split: str | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the v2 scorer on shared keys ``[B, N, 132]`` (``q [L, B, H, D]`` prepared,
    ``w [L, B, H]``), ``precision`` in ``PRECISIONS``. Inputs are assumed validated by the
    caller (``flashmemory_triton.ops``). ``prefetch`` overrides the launch table's choice (the
    tests run both code paths); ``split`` the launch mode (``dense_split.launch_mode``: short
    contexts go to the split kernel, with the same results bit for bit)."""
    L, B, H, D = q.shape
    if compressed_k.dim() != 3 or precision not in PRECISIONS:
        raise ValueError(f"dense v2 takes shared keys [B, N, 132] in {PRECISIONS}, got "
                         f"{tuple(compressed_k.shape)} in {precision!r}")
    N = compressed_k.shape[1]
    from .dense_split import dense_split_launch, launch_mode
    mode = launch_mode(compressed_k.device, B, N, L, H, split)
    if mode != "fused":
        return dense_split_launch(q, w, compressed_k, precision=precision, hw_fp8=hw_fp8,
                                  mode=mode, ensemble=ensemble, logit_offset=logit_offset,
                                  return_logits=return_logits)
    device = compressed_k.device
    scores = alloc_output((B, N), torch.float32, device)
    logits = alloc_output((L, B, N), torch.float32, device) if return_logits else None
    if N == 0 or B == 0:
        return scores, logits
    kb, kf = key_views(compressed_k)
    kw = kb.view(torch.int32)
    stride_kb, stride_kn = kb.stride(0) // 4, kb.stride(1) // 4
    row_words = stride_kn if stride_kn == C.CHUNK_BYTES // 4 else 0
    H_pad = max(16, triton.next_power_of_2(H))
    cfg = dense_launch_config(_device.capability(device), N, precision)
    if prefetch is not None:
        cfg["PREFETCH"] = bool(prefetch)
    grid = (_programs(device, B, triton.cdiv(N, cfg["BLOCK_N"])), B)
    on_gpu = device.type == "cuda"
    dense_score_kernel[grid](
        kw, kf, q.contiguous(), w.contiguous().float(), scores,
        logits if logits is not None else scores, B, N, H, stride_kb, stride_kn,
        float(logit_offset), L=L, D=D, H_PAD=H_pad, ROW_WORDS=row_words, PRECISION=precision,
        HW_FP8=bool(hw_fp8), ENSEMBLE_MEAN=ensemble == "mean", WRITE_LOGITS=return_logits,
        BF16_DOT_VIA_F32=not on_gpu, BF16_ASM=bf16_asm_enabled(device), **cfg)
    return scores, logits
