"""Dense scorer v2, split launch: short contexts spread over the whole card (design §12).

The fused v2 kernel (``kernels.dense``) gives each program whole 64-chunk tiles, every layer
and every head of them. At N = 4096, B = 1 that is 64 tiles for 132 SMs: half the card idles
while each busy SM runs three layers. The split kernel gives one program one
(tile, layer) unit (or one (tile, layer, head half) unit: selectable, not picked by the
launcher, see ``pick_mode``), and combines the units of a tile EXACTLY: its ensemble scores
and logits are bit-identical to the fused kernel's.

Why exact. The fused kernel computes, per layer, two half-head partial sums ``p_lo, p_hi``
(``dense._layer_partial``: the ReLU-weighted head sum reduced within each warpgroup's half of
the heads), then ``logit = (p_lo + p_hi) * |s| + offset`` (pinned to NaN on +-inf), then the
ensemble over the layers in order: the NaN-aware max of the logits and one sigmoid, or the sum
of the sigmoids divided by L. Here

* a (tile, layer) program runs the same ``_layer_partial`` on the same operands with the same
  tile shape and warps (so the same dot layout and the same order of every in-warp addition),
  then the same two-term cross-warp sum (``a + b == b + a`` exactly) and the same logit
  expression;
* a (tile, layer, half) program runs the same dot and the same ReLU-weighted sum on its half of
  the heads (``[BLOCK_N, H_PAD / 2]`` at 4 warps: one warpgroup holding the same columns a
  warpgroup of the fused kernel holds) and stores its half sum; ``p_lo + p_hi`` is then
  formed by the combining program;
* (both checked in the TTGIR with Triton 3.6.0: the layer unit's dot has the fused kernel's
  MMA layout, ``warpsPerCTA = [4, 2]``, ``instrShape = [16, 64, 16]``, and its head sum the
  same reshaped linear layout; the half unit's ``[4, 1]`` MMA layout holds, per thread and
  lane, the same head columns in the same register order as one of those warpgroups)
* every unit writes its logit (or half sum) to a scratch buffer (the logits output itself when
  logits are requested) and counts itself done on the tile's counter (an atomic add with
  acquire-release semantics at GPU scope after a CTA barrier, the usual split-K semaphore);
  the LAST unit of a tile to arrive reads the tile's L logits (or 2L half sums) back, in layer
  order, and runs the fused kernel's own ensemble code on them (``score._ensemble_init``,
  ``score._ensemble_add``, ``dense._sigmoid``). Floating-point results depend only on the
  operands and the order of operations, both the same, so the bits are the same. No
  floating-point atomics are used (their order would depend on timing). The fused kernel's
  max ensemble without logits skips the pin and adds ``logit * 0`` to the max instead: NaN
  when any logit is +-inf or NaN, else the max itself (or +0 for -0: the same sigmoid), which
  is the pinned max's sigmoid, bit for bit.

The tile counters are reset by the last unit, so a counter buffer is reused by the next call on
the same stream without a memset (one buffer per device and stream; under CUDA graph capture a
fresh one, zeroed inside the graph).

Non-finite inputs follow the fused kernel's policy (each unit computes the tile's NaN flag
itself); the combining unit's ``|s|`` is its own, identical for every unit of a tile.
"""

from __future__ import annotations

import threading

import torch
import triton
import triton.language as tl

from flashmemory_triton import constants as C
from flashmemory_triton.utils import _device

from ._alloc import alloc_output
from .dense import (
    _HEAD_SUM_CHAIN,
    PRECISIONS,
    _layer_partial,
    _load_tile,
    _operand_order,
    _prepare_q,
    _sigmoid,
    _tile_operand,
    dense_launch_config,
)
from .numerics import bf16_asm_enabled
from .score import _ensemble_add, _ensemble_init, key_views

MODES = ("fused", "layers", "heads")  # the fused v2 kernel; units per tile: L, or 2 L


@triton.jit
def _prepare_q_half(q_ptr, w_ptr, lb, half, H, D: tl.constexpr, H_HALF: tl.constexpr,
                    PRECISION: tl.constexpr, HW_FP8: tl.constexpr):
    """``dense._prepare_q`` for heads ``[half * H_HALF, (half + 1) * H_HALF)`` of one layer:
    the same loads and conversions, padded heads 0."""
    heads = half * H_HALF + tl.arange(0, H_HALF)
    hmask = heads < H
    cols = tl.arange(0, D)
    q = tl.load(q_ptr + (lb * H + heads.to(tl.int64))[:, None] * D + cols[None, :],
                mask=hmask[:, None], other=0.0)
    q = _operand_order(q, D, PRECISION)  # the key operand's column order (bf16: permuted)
    w = tl.load(w_ptr + lb * H + heads, mask=hmask, other=0.0)
    if PRECISION == "fp8" and HW_FP8:
        q = q.to(tl.float32).to(tl.float8e4nv)  # exact: q holds e4m3 values
    else:
        q = q.to(tl.bfloat16)
    return tl.trans(q), w


@triton.jit
def _half_partial(k, qt, w, BLOCK_N: tl.constexpr, H_HALF: tl.constexpr,
                  BF16_DOT_VIA_F32: tl.constexpr):
    """One half of ``dense._layer_partial``: the same dot, ReLU and weighted head sum on half
    the heads (``[BLOCK_N]``), in the same order: ``tl.sum`` of the weighted values, or where
    ``dense._HEAD_SUM_CHAIN`` the same explicit FMA chain over each thread's heads (column
    ``8 * jg + 2 * lane4 + p`` of the half) and then the sum over the 4 lanes."""
    if BF16_DOT_VIA_F32:
        x = tl.dot(k.to(tl.float32), qt.to(tl.float32), input_precision="ieee")
    else:
        x = tl.dot(k, qt)
    x = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
    if not _HEAD_SUM_CHAIN:
        return tl.sum(x * w[None, :], axis=1)
    J: tl.constexpr = H_HALF // 4  # dense._layer_partial's J = H_PAD // 8
    xs = (tl.reshape(tl.permute(tl.reshape(x, (BLOCK_N, J // 2, 4, 2)), (0, 2, 1, 3)),
                     (BLOCK_N, 4, J)),)
    wv = (tl.reshape(tl.permute(tl.reshape(w, (J // 2, 4, 2)), (1, 0, 2)), (4, J)),)
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
    s = tl.reshape(xs[0], (BLOCK_N, 4)) * tl.reshape(wv[0], (4,))[None, :]
    for i in tl.static_range(1, len(xs)):
        s = s + tl.reshape(xs[i], (BLOCK_N, 4)) * tl.reshape(wv[i], (4,))[None, :]
    return tl.sum(s, axis=1)


@triton.jit
def _pin_logit(s, abs_scale, logit_offset):
    """``dense._score_tile``'s logit: the same expression (the same FMA on the GPU)."""
    logit = s * abs_scale + logit_offset
    # an overflowed logit (+-inf) is NaN, as in reference.pin_nonfinite
    return tl.where(tl.abs(logit) == float("inf"), float("nan"), logit)


@triton.jit
def dense_split_kernel(
    kw_ptr, kf_ptr,  # int32 / float32 views of the key buffer
    q_ptr, w_ptr, scores_ptr, logits_ptr,
    part_ptr,  # float32 [UNITS, B, N]: each unit's logit (or half sum); logits_ptr when L units
    count_ptr,  # int32 [B * tiles], zero on entry and on exit: units of a tile done
    B, N, H,
    stride_kb, stride_kn,  # shared key buffer [B, N, 132]: strides in 4-byte words
    logit_offset,
    L: tl.constexpr, D: tl.constexpr, H_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    ROW_WORDS: tl.constexpr,  # > 0: rows are contiguous with this many words (33); 0: runtime
    PRECISION: tl.constexpr, HW_FP8: tl.constexpr,
    ENSEMBLE_MEAN: tl.constexpr, WRITE_LOGITS: tl.constexpr,
    BF16_DOT_VIA_F32: tl.constexpr,  # interpreter only: its bf16 dot multiplies raw bits
    SPLIT_HEADS: tl.constexpr,  # units are (layer, head half): 2 L a tile; else L
    BF16_ASM: tl.constexpr = False,  # sm_90: the fused kernel's PTX e4m3 -> bf16 decoder
):
    """Program ``(t, u, b)`` scores unit ``u`` of tile ``t`` of row ``b``; the tile's last unit
    to finish writes its ensemble (module docstring: why the result is the fused kernel's)."""
    t = tl.program_id(0)
    u = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    if ROW_WORDS > 0:
        row_words = ROW_WORDS
    else:
        row_words = stride_kn
    rows = tl.arange(0, BLOCK_N)
    n0 = t.to(tl.int64) * BLOCK_N
    nmask = rows < N - n0
    out_n = b * N + n0 + rows  # int64 offsets of row b's outputs
    lstride = B.to(tl.int64) * N
    tile_words = n0 * row_words
    kb, scale = _load_tile(kw_ptr + b * stride_kb + tile_words,
                           kf_ptr + b * stride_kb + tile_words, row_words, rows, nmask, D, True)
    k, abs_scale = _tile_operand(kb, scale, D, PRECISION, HW_FP8, BF16_ASM)
    if SPLIT_HEADS:
        last = 2 * L - 1
        layer = u // 2
        qt, w = _prepare_q_half(q_ptr, w_ptr, layer * B + b, u % 2, H, D, H_PAD // 2,
                                PRECISION, HW_FP8)
        half_sum = _half_partial(k, qt, w, BLOCK_N, H_PAD // 2, BF16_DOT_VIA_F32)
        tl.store(part_ptr + u * lstride + out_n, half_sum, mask=nmask)
    else:
        last = L - 1
        qt, w = _prepare_q(q_ptr, w_ptr, u * B + b, H, D, H_PAD, PRECISION, HW_FP8,
                           BF16_DOT_VIA_F32)
        p = _layer_partial(k, qt, w, BLOCK_N, H_PAD, BF16_DOT_VIA_F32)  # [BLOCK_N, 2 halves]
        logit = _pin_logit(tl.sum(p, axis=1), abs_scale, logit_offset)
        tl.store(part_ptr + u * lstride + out_n, logit, mask=nmask)
    # Every thread's stores precede the count (the barrier), and the count releases them to
    # the GPU; the unit that completes the count acquires every other unit's stores.
    tl.debug_barrier()
    counter = count_ptr + b * tl.cdiv(N, BLOCK_N) + t
    done = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    if done == last:
        tl.store(counter, 0)  # every unit of the tile has counted: ready for the next call
        ens = _ensemble_init(BLOCK_N, ENSEMBLE_MEAN)
        for l in tl.static_range(L):
            # L2 reads (.cg): the other units' stores were made by other SMs
            if SPLIT_HEADS:
                lo = tl.load(part_ptr + (2 * l) * lstride + out_n, mask=nmask, other=0.0,
                             cache_modifier=".cg")
                hi = tl.load(part_ptr + (2 * l + 1) * lstride + out_n, mask=nmask, other=0.0,
                             cache_modifier=".cg")
                logit = _pin_logit(lo + hi, abs_scale, logit_offset)
                if WRITE_LOGITS:
                    tl.store(logits_ptr + l * lstride + out_n, logit, mask=nmask)
            else:
                logit = tl.load(part_ptr + l * lstride + out_n, mask=nmask, other=0.0,
                                cache_modifier=".cg")
            if ENSEMBLE_MEAN:
                ens = _ensemble_add(ens, logit, True)
            else:
                ens = tl.maximum(ens, logit, propagate_nan=tl.PropagateNan.ALL)
        if ENSEMBLE_MEAN:
            ens = ens / L
        else:
            ens = _sigmoid(ens)
        tl.store(scores_ptr + out_n, ens, mask=nmask)


# --- host side ---------------------------------------------------------------------------------
MIN_HALF_HEADS = 16  # a tensor-core dot needs at least 16 columns: head halves need H_PAD >= 32
WARPS = {"layers": 8, "heads": 4}  # layers: the fused kernel's tile; heads: one warpgroup
# Co-resident (tile, layer) programs per SM, from the compile report (sm_90, 8 warps): 80-99
# registers with Triton 3.6.0, 3.7.1, 3.8.0 and 3.9.0, spill-free, so two CTAs of 256 threads fit
# the register file under every supported release (no per-release entry in kernels/configs.py).
LAYER_CTAS_PER_SM = 2


def pick_mode(B: int, tiles: int, L: int, sms: int) -> str:
    """The launch mode on ``sms`` SMs (design §12):

    * ``"fused"`` whenever its grid already gives every SM a program (``B * tiles >= sms``:
      the headline; B = 8 at N = 4096), and wherever the layer units would not all be resident
      at once (``B * tiles * L > 2 * sms``): there the busiest SM would run three or more
      units, each reloading its q and w, against the fused kernel's L layers of one tile;
    * ``"layers"`` otherwise: every (tile, layer) unit starts at once, at most two to an SM,
      so the longest program scores one layer instead of L (N = 4096 and N = 2048 at B = 1).

    ``"heads"`` is never picked: the compile report gives a (tile, layer, head half) unit at 4
    warps 1331-1796 SASS instructions a warp (max ensemble, Triton 3.6.0-3.9.0), more issue
    cycles than a whole (tile, layer) unit at 8 warps (704-761 a warp, 1408-1522 cycles),
    because each of its warps decodes twice as much of the tile and its combining step runs in
    a layout with 16 rows a thread. It stays selectable (``split="heads"``) and exact, for a GPU
    measurement."""
    if B * tiles >= sms or B * tiles * L > LAYER_CTAS_PER_SM * sms:
        return "fused"
    return "layers"


_COUNTERS: dict = {}
_COUNTERS_LOCK = threading.Lock()


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least ``n`` tile counters. On the GPU one buffer per device
    and stream, reused without a memset: every launch leaves it zeroed (the last unit of each
    tile resets its counter), and launches on one stream run in order. While a CUDA graph is
    being captured, a fresh buffer instead (its zeroing is captured too, in the graph's own
    memory pool), so replays of graphs never share counters with each other or with eager
    calls. Off the GPU a fresh buffer."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return torch.zeros(max(n, 1), dtype=torch.int32, device=device)
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    with _COUNTERS_LOCK:
        buf = _COUNTERS.get(key)
        if buf is None or buf.numel() < n:
            # (an outgrown buffer is freed into the caching allocator, which reuses it only
            # for this stream's later work, after the launches queued on it)
            buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
            _COUNTERS[key] = buf
        return buf


def launch_mode(device: torch.device, B: int, N: int, L: int, H: int,
                split: str | None = None) -> str:
    """The mode a launch uses: ``split`` when given (the tests run every mode on any device),
    else on the GPU ``pick_mode`` with the device's SM count (read at call time), and off the
    GPU the fused kernel."""
    if split is not None:
        if split not in MODES:
            raise ValueError(f"split must be None or one of {MODES}, got {split!r}")
        h_pad = max(16, triton.next_power_of_2(H))
        if split == "heads" and h_pad // 2 < MIN_HALF_HEADS:
            raise ValueError(f"split='heads' needs at least {2 * MIN_HALF_HEADS} padded heads "
                             f"(a {MIN_HALF_HEADS}-column dot a half), got H = {H}")
        return split
    if device.type != "cuda" or N == 0 or B == 0:
        return "fused"
    block_n = dense_launch_config(_device.capability(device), N)["BLOCK_N"]
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return pick_mode(B, triton.cdiv(N, block_n), L, sms)


def dense_split_launch(q: torch.Tensor, w: torch.Tensor, compressed_k: torch.Tensor, *,
                       precision: str, hw_fp8: bool, mode: str, ensemble: str = "max",
                       logit_offset: float = 0.0, return_logits: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the split scorer (``mode`` ``"layers"`` or ``"heads"``) on shared keys
    ``[B, N, 132]``: the same arguments and results as ``dense.dense_score_launch``, bit for
    bit. Inputs are assumed validated by the caller (``flashmemory_triton.ops``)."""
    L, B, H, D = q.shape
    if compressed_k.dim() != 3 or precision not in PRECISIONS or mode not in MODES[1:]:
        raise ValueError(f"dense split takes shared keys [B, N, 132] in {PRECISIONS} and a mode "
                         f"in {MODES[1:]}, got {tuple(compressed_k.shape)} in {precision!r}, "
                         f"mode {mode!r}")
    N = compressed_k.shape[1]
    device = compressed_k.device
    scores = alloc_output((B, N), torch.float32, device)
    logits = alloc_output((L, B, N), torch.float32, device) if return_logits else None
    if N == 0 or B == 0:
        return scores, logits
    H_pad = max(16, triton.next_power_of_2(H))
    heads = mode == "heads"
    if heads and H_pad // 2 < MIN_HALF_HEADS:
        raise ValueError(f"mode 'heads' needs at least {2 * MIN_HALF_HEADS} padded heads, "
                         f"got H = {H}")
    kb, kf = key_views(compressed_k)
    kw = kb.view(torch.int32)
    stride_kb, stride_kn = kb.stride(0) // 4, kb.stride(1) // 4
    row_words = stride_kn if stride_kn == C.CHUNK_BYTES // 4 else 0
    # the fused kernel's tile (the same dot shape, hence the same arithmetic)
    block_n = dense_launch_config(_device.capability(device), N, precision)["BLOCK_N"]
    tiles = triton.cdiv(N, block_n)
    units = 2 * L if heads else L
    if heads or logits is None:
        part = torch.empty((units, B, N), dtype=torch.float32, device=device)
    else:
        part = logits  # the layer units' logits are the output
    on_gpu = device.type == "cuda"
    grid = (tiles, units, B)
    dense_split_kernel[grid](
        kw, kf, q.contiguous(), w.contiguous().float(), scores,
        logits if logits is not None else scores, part, _counters(device, B * tiles),
        B, N, H, stride_kb, stride_kn, float(logit_offset), L=L, D=D, H_PAD=H_pad,
        BLOCK_N=block_n, ROW_WORDS=row_words, PRECISION=precision, HW_FP8=bool(hw_fp8),
        ENSEMBLE_MEAN=ensemble == "mean", WRITE_LOGITS=return_logits,
        BF16_DOT_VIA_F32=not on_gpu, BF16_ASM=bf16_asm_enabled(device), SPLIT_HEADS=heads,
        num_warps=WARPS[mode] if on_gpu else 4, num_stages=1)
    return scores, logits
