"""Fused scoring kernel: e4m3 decode, per-head dot, ReLU, head weights, sigmoid, ensemble.

One launch scores every layer of every row. A program owns ``BLOCK_N`` chunks of one row; it
reads that key tile from device memory once (once for all layers when the key buffer is
shared, once per layer otherwise), runs ``[BLOCK_N, D] x [D, BLOCK_H]`` tensor-core dots
against each layer's prepared q, and reduces over heads in registers:

    logit[n] = |s_n| * sum_h relu(sign(s_n) * (fp8_n . q_h)) * w_h + logit_offset

which equals ``sum_h relu((fp8_n * s_n) . q_h) * w_h`` for ANY scale sign (relu(s x) =
|s| relu(sign(s) x)), so the fp8 bytes enter the tensor cores unscaled and exact. Neither the
dequantized keys nor any ``[B, N, H]`` tensor touches memory; the outputs are the ensemble
scores ``[B, N]`` and, on request, per-layer logits ``[L, B, N]``.

Non-finite inputs: a chunk with an e4m3 NaN byte (0x7F/0xFF) or a non-finite or overflowing
scale (``|s| > C.MAX_KEY_SCALE``) scores NaN in every layer, an overflowed logit (+-inf) is NaN
(the reference's ``pin_nonfinite`` does the same), and NaN in q or w
propagates through the NaN-aware ReLU, so nothing non-finite is silently turned into a score.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashmemory_triton import constants as C
from flashmemory_triton.utils import _device

from . import configs
from ._alloc import alloc_output
from .numerics import e4m3_bits_to_f32

_MAX_KEY_SCALE = tl.constexpr(C.MAX_KEY_SCALE)  # scales past it overflow on dequant: NaN chunk


@triton.jit
def _load_key_tile(kw_ptr, kf_ptr, key_row_words, nmask,
                   D: tl.constexpr, PRECISION: tl.constexpr, HW_FP8: tl.constexpr):
    """Load ``[BLOCK_N, D]`` e4m3 bytes and the scales of the rows at word offsets
    ``key_row_words`` (int64, in 4-byte words so the compiler knows every row is 4-byte
    aligned). Returns the dot operand, ``|scale|``, ``sign(scale)`` and a bad-row flag."""
    return _load_key_tile_at(kw_ptr, kf_ptr, key_row_words * 4, key_row_words + D // 4, nmask,
                             D, PRECISION, HW_FP8)


@triton.jit
def _load_key_tile_at(kb_ptr, kf_ptr, key_bytes, scale_words, nmask,
                      D: tl.constexpr, PRECISION: tl.constexpr, HW_FP8: tl.constexpr):
    """The tile loader for any layout: ``D`` e4m3 bytes of each chunk at byte offsets
    ``key_bytes`` from ``kb_ptr`` (uint8) and its float32 scale at ``scale_words`` from
    ``kf_ptr`` (float32), both int64 ``[BLOCK_N]``. The row format passes ``row * 132`` and
    ``row * 33 + 32``; the paged split format (``kernels.paged``) the fp8 block and the scale
    block of the chunk's page. Offsets written as multiples of 4 (or 16) let the compiler
    issue word (vector) loads. Returns the dot operand, ``|scale|``, ``sign(scale)`` and a
    bad-chunk flag (an e4m3 NaN byte or a non-finite scale)."""
    cols = tl.arange(0, D)
    kb = tl.load(kb_ptr + key_bytes[:, None] + cols[None, :], mask=nmask[:, None], other=0)
    scale = tl.load(kf_ptr + scale_words, mask=nmask, other=1.0)
    nan_byte = tl.max(((kb & 0x7F) == 0x7F).to(tl.int32), axis=1) > 0
    # NaN, infinite or overflowing scale (|s| > C.MAX_KEY_SCALE; NaN compares False).
    bad = nan_byte | ~(tl.abs(scale) <= _MAX_KEY_SCALE)
    if PRECISION == "fp8":
        if HW_FP8:
            k = kb.to(tl.float8e4nv, bitcast=True)
        else:
            k = e4m3_bits_to_f32(kb).to(tl.bfloat16)
    elif PRECISION == "bf16":
        if HW_FP8:
            k = kb.to(tl.float8e4nv, bitcast=True).to(tl.bfloat16)
        else:
            k = e4m3_bits_to_f32(kb).to(tl.bfloat16)
    else:
        if HW_FP8:
            k = kb.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        else:
            k = e4m3_bits_to_f32(kb)
    sign = tl.where(scale < 0, -1.0, 1.0)
    return k, tl.abs(scale), sign, bad


@triton.jit
def _layer_logit(k, abs_scale, sign, bad, q_ptr, w_ptr, lb, H, logit_offset,
                 D: tl.constexpr, H_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, HW_FP8: tl.constexpr,
                 BF16_DOT_VIA_F32: tl.constexpr):
    """One layer's logits ``[BLOCK_N]`` for a key tile from ``_load_key_tile(_at)``, against
    the prepared q/w of (layer, row) ``lb = l * B + b`` (int64): per head block one
    tensor-core dot, then ``|s| * sum_h relu(sign(s) * dot) * w_h + offset`` in registers;
    bad chunks are NaN."""
    cols = tl.arange(0, D)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for h0 in tl.static_range(0, H_PAD, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        hmask = heads < H
        q = tl.load(q_ptr + (lb * H + heads.to(tl.int64))[:, None] * D + cols[None, :],
                    mask=hmask[:, None], other=0.0)
        w = tl.load(w_ptr + lb * H + heads, mask=hmask, other=0.0)
        if PRECISION == "fp8":
            if HW_FP8:
                q = q.to(tl.float32).to(tl.float8e4nv)  # exact: q holds e4m3 values
                s = tl.dot(k, tl.trans(q))
            elif BF16_DOT_VIA_F32:
                s = tl.dot(k.to(tl.float32), tl.trans(q).to(tl.float32), input_precision="ieee")
            else:
                s = tl.dot(k, tl.trans(q))
        elif PRECISION == "bf16":
            if BF16_DOT_VIA_F32:
                # bf16 x bf16 products are exact in fp32: same result as the bf16 dot
                s = tl.dot(k.to(tl.float32), tl.trans(q).to(tl.float32), input_precision="ieee")
            else:
                s = tl.dot(k, tl.trans(q))
        elif PRECISION == "tf32":
            s = tl.dot(k, tl.trans(q), input_precision="tf32")
        else:
            s = tl.dot(k, tl.trans(q), input_precision="ieee")
        s = tl.maximum(s * sign[:, None], 0.0, propagate_nan=tl.PropagateNan.ALL)
        acc += tl.sum(s * w[None, :], axis=1)
    logit = acc * abs_scale + logit_offset
    # An overflowed logit (+-inf) is NaN, as in reference.pin_nonfinite.
    return tl.where(bad | (tl.abs(logit) == float("inf")), float("nan"), logit)


@triton.jit
def _ensemble_init(BLOCK_N: tl.constexpr, ENSEMBLE_MEAN: tl.constexpr):
    if ENSEMBLE_MEAN:
        ens = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        ens = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    return ens


@triton.jit
def _ensemble_add(ens, logit, ENSEMBLE_MEAN: tl.constexpr):
    """Fold one layer's logits into the running ensemble (sum of sigmoids, or NaN-aware max;
    the caller divides the sum by L)."""
    sig = 1.0 / (1.0 + tl.exp(-logit))
    if ENSEMBLE_MEAN:
        ens = ens + sig
    else:
        ens = tl.maximum(ens, sig, propagate_nan=tl.PropagateNan.ALL)
    return ens


@triton.jit
def _layer_into_ensemble(ens, k, abs_scale, sign, bad, q_ptr, w_ptr, lb, H, logit_offset,
                         logit_out, nmask, D: tl.constexpr, H_PAD: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
                         HW_FP8: tl.constexpr, BF16_DOT_VIA_F32: tl.constexpr,
                         ENSEMBLE_MEAN: tl.constexpr, WRITE_LOGITS: tl.constexpr):
    """One layer of one key tile: its logits (stored at ``logit_out`` if ``WRITE_LOGITS``)
    folded into the running ensemble, which is returned."""
    logit = _layer_logit(k, abs_scale, sign, bad, q_ptr, w_ptr, lb, H, logit_offset, D, H_PAD,
                         BLOCK_N, BLOCK_H, PRECISION, HW_FP8, BF16_DOT_VIA_F32)
    if WRITE_LOGITS:
        tl.store(logit_out, logit, mask=nmask)
    return _ensemble_add(ens, logit, ENSEMBLE_MEAN)


@triton.jit
def fused_score_kernel(
    kw_ptr, kf_ptr, q_ptr, w_ptr, scores_ptr, logits_ptr,
    B, N, H,
    stride_kl, stride_kb, stride_kn,  # key strides in 4-byte words (stride_kl = 0: shared)
    logit_offset,
    L: tl.constexpr, D: tl.constexpr, H_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    ROW_WORDS: tl.constexpr,  # > 0: rows are contiguous with this many words (33); 0: runtime
    PRECISION: tl.constexpr, HW_FP8: tl.constexpr, SHARED_KEYS: tl.constexpr,
    ENSEMBLE_MEAN: tl.constexpr, WRITE_LOGITS: tl.constexpr,
    BF16_DOT_VIA_F32: tl.constexpr,  # interpreter only: its bf16 dot multiplies raw bits
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    if ROW_WORDS > 0:
        row_words = n * ROW_WORDS
    else:
        row_words = n * stride_kn
    row_words = row_words + b * stride_kb
    ens = _ensemble_init(BLOCK_N, ENSEMBLE_MEAN)

    if SHARED_KEYS:
        # One tile, every layer: unrolled so the tile stays in registers across layers.
        k, abs_scale, sign, bad = _load_key_tile(kw_ptr, kf_ptr, row_words, nmask,
                                                 D, PRECISION, HW_FP8)
        for l in tl.static_range(L):
            ens = _layer_into_ensemble(ens, k, abs_scale, sign, bad, q_ptr, w_ptr, l * B + b,
                                       H, logit_offset, logits_ptr + (l * B + b) * N + n, nmask,
                                       D, H_PAD, BLOCK_N, BLOCK_H, PRECISION, HW_FP8,
                                       BF16_DOT_VIA_F32, ENSEMBLE_MEAN, WRITE_LOGITS)
    else:
        # One tile per layer: a runtime loop, so at most the next layer's tile is loaded
        # ahead (an unrolled loop lets the compiler issue all L tiles up front and spill).
        for l in range(L):
            k, abs_scale, sign, bad = _load_key_tile(kw_ptr, kf_ptr, row_words + l * stride_kl,
                                                     nmask, D, PRECISION, HW_FP8)
            ens = _layer_into_ensemble(ens, k, abs_scale, sign, bad, q_ptr, w_ptr, l * B + b,
                                       H, logit_offset, logits_ptr + (l * B + b) * N + n, nmask,
                                       D, H_PAD, BLOCK_N, BLOCK_H, PRECISION, HW_FP8,
                                       BF16_DOT_VIA_F32, ENSEMBLE_MEAN, WRITE_LOGITS)
    if ENSEMBLE_MEAN:
        ens = ens / L
    tl.store(scores_ptr + b * N + n, ens, mask=nmask)


def _words(stride_bytes: int) -> int:
    return stride_bytes // 4


def key_views(compressed_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte and float32 views of one key buffer (same storage). Strided inputs whose byte
    strides and storage offset are multiples of 4 are used in place; anything else is copied
    (``clone``, not ``contiguous``: a contiguous view at an odd byte offset is its own
    ``.contiguous()`` and still could not be read as float32 words)."""
    k = compressed_k
    if k.stride(-1) != 1 or any(s % 4 for s in k.stride()[:-1]) or k.storage_offset() % 4:
        k = k.clone(memory_format=torch.contiguous_format)
    return k, k.view(torch.float32)


def launch_config(N: int, H_pad: int, precision: str,
                  capability: tuple[int, int] | None, shared: bool = True,
                  triton_version: tuple[int, int] | None = None) -> dict:
    """Launch parameters by shape class (no autotuning).

    GPU, chosen from the compiled resource usage (``python -m flashmemory_triton.kernels.aot``;
    every default below is spill-free under every supported Triton, which
    ``tests/test_compile.py`` enforces; version-dependent entries live in ``kernels.configs``):
    * sm_90: 128-chunk tiles, 8 warps, heads in blocks of 64 (a [128, 64] fp32 accumulator,
      32 registers a thread; 187-255 registers in all); tf32/fp32 hold an fp32 key tile, twice
      the operand registers, so their heads go in blocks of 32. Chunks per tile by Triton
      release and key layout: ``configs.V1_SM90_BLOCK_N`` (64 where 128 spills).
    * before Hopper (sm_8x: mma.sync, and on sm_80 the integer e4m3 decode): 64-chunk tiles,
      heads in blocks of 32 (128-chunk tiles or 64-head blocks spill there), 4 or 8 warps by
      release and key layout (``configs.V1_SM8X_WARPS``).
    ``capability`` None means the interpreter: the largest tile that fits N (each program is a
    numpy step; fewer is faster). ``triton_version`` defaults to the installed one.
    """
    if capability is None:
        return dict(BLOCK_N=min(128, max(16, triton.next_power_of_2(max(N, 1)))),
                    BLOCK_H=min(H_pad, 128), num_warps=4, num_stages=1)
    layout = "shared" if shared else "per_layer"
    if capability < (9, 0):
        warps = configs.pick(configs.V1_SM8X_WARPS, triton_version)[layout]
        return dict(BLOCK_N=64, BLOCK_H=min(H_pad, 32), num_warps=warps, num_stages=2)
    block_h = 32 if precision in ("tf32", "fp32") else 64
    block_n = configs.pick(configs.V1_SM90_BLOCK_N, triton_version)[layout]
    return dict(BLOCK_N=block_n, BLOCK_H=min(H_pad, block_h), num_warps=8, num_stages=2)


def autotune_configs():
    return [triton.Config(dict(BLOCK_N=bn, BLOCK_H=bh), num_warps=nw, num_stages=ns)
            for bn in (64, 128, 256) for bh in (32, 64, 128) for nw in (4, 8) for ns in (1, 2)
            if not (bn == 256 and bh == 128)]


_tuned_kernel = None


def _autotuned():
    global _tuned_kernel
    if _tuned_kernel is None:
        _tuned_kernel = triton.autotune(
            configs=autotune_configs(),
            # Not N: decode lengths grow every call and the best tile hardly depends on N once
            # the grid fills the card; tuning once per model shape and mode is enough.
            key=["H", "L", "PRECISION", "HW_FP8", "SHARED_KEYS", "WRITE_LOGITS"],
        )(fused_score_kernel)
    return _tuned_kernel


def uses_v2(compressed_k: torch.Tensor, precision: str, autotune: bool,
            ensemble: str = "max", return_logits: bool = False) -> bool:
    """Whether ``fused_score_launch`` picks the persistent v2 kernel (``kernels.dense``): shared
    keys in bf16/fp8 on Hopper and newer (its q stays resident in shared memory, which the
    mma.sync path before Hopper cannot read: there v1 is the plain path) where v2 compiles
    spill-free (``dense.serves``), and in the interpreter, so the tests run it. Autotuning and
    per-layer keys stay on v1."""
    from .dense import PRECISIONS as V2_PRECISIONS
    from .dense import serves
    if compressed_k.dim() != 3 or precision not in V2_PRECISIONS or autotune:
        return False
    capability = _device.capability(compressed_k.device)
    if capability is None:
        return True
    return capability >= (9, 0) and serves(precision, ensemble == "mean", return_logits)


def fused_score_launch(q: torch.Tensor, w: torch.Tensor, compressed_k: torch.Tensor, *,
                       precision: str, hw_fp8: bool, ensemble: str = "max",
                       logit_offset: float = 0.0, return_logits: bool = False,
                       autotune: bool = False, kernel: str = "auto"
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the fused scorer. ``q [L, B, H, D]`` prepared (see ``query_prep``), ``w [L, B, H]``
    fp32, ``compressed_k`` uint8 ``[B, N, 132]`` (shared) or ``[L, B, N, 132]``. Inputs are
    assumed validated by the caller (``flashmemory_triton.ops``). ``kernel``: ``"auto"`` (v2
    where ``uses_v2``, else v1), ``"v1"`` (this module's kernel, kept for comparison) or
    ``"v2"``."""
    if kernel not in ("auto", "v1", "v2"):
        raise ValueError(f"kernel must be 'auto', 'v1' or 'v2', got {kernel!r}")
    if kernel == "v2" or (kernel == "auto" and uses_v2(compressed_k, precision, autotune,
                                                       ensemble, return_logits)):
        from .dense import dense_score_launch
        return dense_score_launch(q, w, compressed_k, precision=precision, hw_fp8=hw_fp8,
                                  ensemble=ensemble, logit_offset=logit_offset,
                                  return_logits=return_logits)
    L, B, H, D = q.shape
    shared = compressed_k.dim() == 3
    N = compressed_k.shape[-2]
    device = compressed_k.device
    scores = alloc_output((B, N), torch.float32, device)
    logits = alloc_output((L, B, N), torch.float32, device) if return_logits else None
    if N == 0 or B == 0:
        return scores, logits
    kw, kf = key_views(compressed_k)
    strides = [_words(s) for s in kw.stride()[:-1]]
    stride_kl, stride_kb, stride_kn = ([0] + strides) if shared else strides
    row_words = stride_kn if stride_kn == C.CHUNK_BYTES // 4 else 0
    H_pad = max(16, triton.next_power_of_2(H))
    q = q.contiguous()
    w = w.contiguous().float()
    common = dict(L=L, D=D, H_PAD=H_pad, ROW_WORDS=row_words, PRECISION=precision,
                  HW_FP8=bool(hw_fp8), SHARED_KEYS=shared, ENSEMBLE_MEAN=ensemble == "mean",
                  WRITE_LOGITS=return_logits,
                  # Triton 3.6's interpreter runs np.matmul on the uint16 storage of bf16
                  # operands; upcasting first is exact and only happens off the GPU.
                  BF16_DOT_VIA_F32=device.type != "cuda")
    args = (kw, kf, q, w, scores, logits if logits is not None else scores, B, N, H,
            stride_kl, stride_kb, stride_kn, float(logit_offset))
    if autotune and device.type == "cuda":
        kernel = _autotuned()
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B)  # noqa: E731
        kernel[grid](*args, **common)
    else:
        cfg = launch_config(N, H_pad, precision, _device.capability(device), shared)
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), B)
        fused_score_kernel[grid](*args, **common, **cfg)
    return scores, logits
