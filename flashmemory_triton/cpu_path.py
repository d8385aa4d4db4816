"""The CPU backend: the design §5 score in exact fp32, blocked over chunks, all cores.

``backend="auto"`` runs this on a CPU device (``backend="cpu"`` names it; ``backend="torch"``
stays the reference, the oracle). It computes the reference's numbers: the keys are decoded to
the same fp32 values (``fp8 * scale``, one rounding, as :func:`reference.dequant_compressed_k`),
the dot products and the head sum are fp32 sums of the same terms; only the summation order
differs. Per chunk and layer the difference from the reference is at most

    2 * (D + H + 1) * 2**-24 * sum_h |w_h| sum_d |k_d q_hd|      (+ an ulp of the offset add)

(the fp32 ``gamma_n`` bound of a length-D dot product and a length-H weighted sum, for each of
the two summation orders; relu is 1-Lipschitz): relative to the sum of absolute terms, about
1.5e-5 at D = H = 128, and in practice a few 1e-7 of the largest logit.
``tests/test_cpu_path.py`` checks it. The query side is the reference's own code (bf16/fp16
weights: the same fp32 arithmetic on weights upcast 256 rows at a time, :func:`query_side`), so
q and w are the reference's bits (for bf16/fp16 weights, at the batch sizes the tests check:
at larger batches the BLAS may sum a block's dot products in another order than the whole
GEMM's, an ulp before q's own bf16 rounding).

Why it is fast (the reference, like the release, dequantizes the whole key tensor and
materializes fp32 ``[B, N, H]`` products once per layer):

* a block of chunks is decoded once for all layers that read it: the e4m3 bytes become
  float16 bit patterns with two integer ops (``e4m3`` is ``fp16`` with the exponent field
  shifted down by 8 powers of two, subnormals included), then one vectorized fp16 -> fp32
  conversion; torch's own e4m3 conversion is scalar and about 20x slower;
* one fp32 GEMM per block for every layer and head that reads those keys: ``[L*H, D] x [D, n]``
  with shared keys, ``[H, D] x [D, n]`` per layer otherwise;
* relu in place, then the head-weighted sum as a batched ``[1, H] x [H, n]`` product per layer;
* the block (``block_chunks`` chunks, about 2.3 KB each) stays in the core's own cache, and
  every temporary is one of a few buffers a worker reuses across its blocks, so memory beyond
  the outputs is bounded whatever N and B: scores ``[B, N]`` (and ``[L, B, N]`` logits when
  asked for) plus, per worker, :func:`workspace_bytes` (``block_chunks * (6 D + 4 L H)``, 4.7 MB
  at the default) and the block's scales and non-finite mask;
* the non-finite check reads each block once (:func:`chunk_masks`), not once per layer;
* the blocks are shared out to ``torch.get_num_threads()`` serial workers
  (:mod:`cpu_workers`): each block runs on one thread, so no op waits at a thread-pool barrier
  (on a machine shared with other processes, barriers cost more than the work).

NaN policy as the reference (:func:`reference.pin_nonfinite`): a chunk with an e4m3 NaN byte or
a NaN, infinite or overflowing scale has a NaN logit in every layer that reads it, and so has a
logit that overflowed to +-inf.
"""

from __future__ import annotations

import itertools

import torch

from . import _validate as V
from . import constants as C
from . import cpu_workers
from . import reference as ref

__all__ = ["DEFAULT_BLOCK_CHUNKS", "score_prepared_cpu", "query_side", "chunk_masks",
           "decode_block", "decode_keys", "workspace_bytes"]

# Chunks per block, one worker's unit of work: the temporaries (about 2.3 KB a chunk at
# L*H = 384, 4.7 MB at 2048) stay near the core (2 MB L2 a core on the project's Xeon), and a
# block is enough work (about 0.2 GFLOP) that the ten-odd op dispatches a block cost in Python are
# a few percent. Measured there (N = 65536, B = 1, scorer alone, interleaved, other jobs
# running): 512 / 1024 / 2048 / 4096 / 8192 chunks took 274 / 231 / 218 / 237 / 251 ms.
DEFAULT_BLOCK_CHUNKS = 2048

# e4m3 byte b shifted into the HIGH byte of an int16, shifted right by one (arithmetic, which
# copies the sign into bit 14) and masked with 0xBF80 (clearing it again) is the float16 with
# sign bit 15, exponent bits 13..10 = b's exponent, mantissa bits 9..7 = b's mantissa: the same
# number times 2**-8, for normals and subnormals alike. (decode_block computes those bits as
# int8(b) * 128 & 0xBF80.)
_FP16_MASK = 0xBF80 - 0x10000  # as a signed int16
_FP16_TO_E4M3 = 256.0  # 2**8, exact


class _Workspace:
    """Buffers reused by every block of one call (sized for a full block)."""

    def __init__(self, n: int, head_dim: int, rows: int, device: torch.device):
        self.bits = torch.empty(n, head_dim, dtype=torch.int16, device=device)
        self.keys = torch.empty(n, head_dim, dtype=torch.float32, device=device)
        self.dots = torch.empty(rows * n, dtype=torch.float32, device=device)


def workspace_bytes(block_chunks: int, rows: int, head_dim: int = C.HEAD_DIM) -> int:
    """Bytes of the reused buffers: per chunk, 2 + 4 bytes per key dim and 4 per dot row."""
    return block_chunks * (head_dim * 6 + rows * 4)


def chunk_masks(compressed_k: torch.Tensor, slab: int = 1 << 16
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over a key buffer ``uint8 [..., N, D + 4]``: ``2**8 * scale`` float32 and the
    chunks the reference pins to NaN (:func:`reference.nonfinite_chunks`: an e4m3 NaN byte, or a
    scale that is NaN, infinite or past ``C.MAX_KEY_SCALE``), both ``[..., N]``.

    Done once per buffer, not per layer; ``slab`` chunks at a time, so the byte temporaries stay
    bounded whatever N. ``2**8 * scale`` is exact and finite for every chunk not masked.
    """
    D = compressed_k.shape[-1] - C.SCALE_BYTES
    scale = ref.chunk_scales(compressed_k, D)
    bad = ~(scale.abs() <= C.MAX_KEY_SCALE)  # NaN compares False: caught too
    N = compressed_k.shape[-2]
    for lead in itertools.product(*(range(d) for d in compressed_k.shape[:-2])):
        for n0 in range(0, N, slab):
            rows = compressed_k[lead][n0:n0 + slab, :D]
            # b | 0x80 == 0xFF exactly for the NaN bytes 0x7F and 0xFF; a byte max is
            # vectorized (a row-wise any() of a comparison is not).
            bad[lead][n0:n0 + slab] |= (rows | 0x80).amax(dim=-1) == 0xFF
    return scale * _FP16_TO_E4M3, bad


def decode_block(rows: torch.Tensor, scale256: torch.Tensor, ws: _Workspace | None = None
                 ) -> torch.Tensor:
    """Row-format chunks ``uint8 [n, D + 4]`` and their ``2**8 * scale`` -> fp32 keys ``[n, D]``,
    exactly :func:`reference.dequant_compressed_k`'s for every chunk :func:`chunk_masks` does
    not mask (``fp8 * scale`` rounded once). ``ws``: buffers to decode into."""
    n, width = rows.shape
    D = width - C.SCALE_BYTES
    if ws is None:
        ws = _Workspace(n, D, 0, rows.device)
    bits = ws.bits[:n]
    # The byte read as int8 and sign-extended, times 128 (no overflow: |int8| <= 128), has b's
    # low 7 bits at 13..7 and b's sign bit in bits 15 and 14: the bits of (b << 8) >> 1. Integer
    # multiplies are vectorized, shifts are not.
    bits.copy_(rows[:, :D].view(torch.int8))
    bits.mul_(128).bitwise_and_(_FP16_MASK)
    # float16 (fp8 value * 2**-8) times 2**8 * scale, computed in fp32 (the fp16 operand is
    # widened exactly): the real product fp8 * scale, rounded once. One op, no fp32 copy first.
    return torch.mul(bits.view(torch.float16), scale256[:, None], out=ws.keys[:n])


def decode_keys(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-format chunks ``uint8 [n, D + 4]`` -> fp32 keys ``[n, D]`` (the reference's values
    wherever the mask is False) and the bool ``[n]`` non-finite mask (:func:`chunk_masks`)."""
    scale256, bad = chunk_masks(rows)
    return decode_block(rows, scale256), bad


def score_prepared_cpu(q: torch.Tensor, w: torch.Tensor, compressed_k: torch.Tensor, *,
                       ensemble: str = "max", logit_offset: float = 0.0,
                       return_logits: bool = False, block_chunks: int = DEFAULT_BLOCK_CHUNKS
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ensemble scores ``[B, N]`` (and per-layer logits ``[L, B, N]`` if ``return_logits``).

    ``q [L, B, H, D]`` prepared queries (after RoPE and Hadamard; any float dtype, scored in
    fp32), ``w [L, B, H]`` head weights, ``compressed_k`` uint8 ``[B, N, D + 4]`` (every layer)
    or ``[L, B, N, D + 4]`` (one buffer per layer). Same numbers as the reference's
    ``keys_logits`` per layer, to fp32 summation order (module doc).
    """
    V.tensor("q", q, floating=True, ndim=4)
    V.tensor("w", w, floating=True, ndim=3)
    L, B, H, D = q.shape
    if tuple(w.shape) != (L, B, H):
        raise ValueError(f"w must be [L={L}, B={B}, H={H}] to match q, got {V.describe(w)}")
    V.compressed_keys("compressed_k", compressed_k, D)
    shared = compressed_k.dim() == 3
    if not shared and compressed_k.shape[0] != L:
        raise ValueError(f"per-layer compressed_k must be [L={L}, B, N, {D + C.SCALE_BYTES}], "
                         f"got {V.describe(compressed_k)}")
    if compressed_k.shape[-3] != B:
        raise ValueError(f"compressed_k batch must be {B} to match q, got "
                         f"{V.describe(compressed_k)}")
    V.same_device(q.device, w=w, compressed_k=compressed_k)
    V.choice("ensemble", ensemble, ("max", "mean"))
    logit_offset = V.real_number("logit_offset", logit_offset)
    V.positive_int("block_chunks", block_chunks)

    device, N = q.device, compressed_k.shape[-2]
    q32, w32 = q.float(), w.float()
    scores = torch.empty(B, N, dtype=torch.float32, device=device)
    logits = torch.empty(L, B, N, dtype=torch.float32, device=device) if return_logits else None
    buffers = [compressed_k] if shared else list(compressed_k)
    rows = L * H if shared else H  # dot-product rows of one GEMM
    block = min(block_chunks, max(N, 1))
    blocks_per_row = -(-N // block)
    # Shared keys: every layer's heads in one GEMM. Per layer: one GEMM per layer.
    groups = [[(q32[:, b].reshape(L * H, D), w32[:, b].reshape(L, 1, H), 0)] if shared
              else [(q32[l, b], w32[l, b].reshape(1, 1, H), l) for l in range(L)]
              for b in range(B)]
    # reference.ensemble_scores' reductions, written straight into the scores
    reduce = torch.amax if ensemble == "max" else torch.mean

    def score_block(item: int, state: dict) -> None:
        """Block ``item`` (row-major over ``[B, blocks_per_row]``): its scores and logits,
        masked chunks included. ``state``: this worker's buffers, made on its first block."""
        if not state:
            state["ws"] = _Workspace(block, D, rows, device)
            state["out"] = torch.empty(L, block, dtype=torch.float32, device=device)
            state["sig"] = torch.empty(L, block, dtype=torch.float32, device=device)
        ws = state["ws"]
        b, n0 = divmod(item, blocks_per_row)
        n0 *= block
        n1 = min(N, n0 + block)
        m = n1 - n0
        out = state["out"][:, :m]
        bad_layers = []
        for qg, wg, g in groups[b]:
            scale256, bad = chunk_masks(buffers[g][b, n0:n1])
            bad_layers.append(bad)
            keys = decode_block(buffers[g][b, n0:n1], scale256, ws)
            dots = ws.dots[:qg.shape[0] * m].view(qg.shape[0], m)
            torch.mm(qg, keys.t(), out=dots)
            dots.relu_()
            # [layers, 1, H] x [layers, H, m]: the head-weighted sum, written in place.
            torch.bmm(wg, dots.view(wg.shape[0], H, m),
                      out=out[g:g + wg.shape[0]].view(wg.shape[0], 1, m))
        if logit_offset != 0.0:
            out.add_(logit_offset)
        # reference.pin_nonfinite: an overflowed (+-inf) logit is NaN, in one op: x + 0 * x is
        # x for every finite x (signed zeros included) and NaN for +-inf.
        out.add_(out, alpha=0.0)
        # The masked chunks: NaN in every layer that reads them (so NaN scores).
        bad_l = torch.stack(bad_layers) if not shared else bad_layers[0][None]
        out.masked_fill_(bad_l, float("nan"))
        if logits is not None:
            logits[:, b, n0:n1] = out
        sig = torch.sigmoid(out, out=state["sig"][:, :m])
        reduce(sig, dim=0, out=scores[b, n0:n1])

    cpu_workers.run_items(score_block, B * blocks_per_row if N else 0)
    return scores, logits


# --- query side -------------------------------------------------------------------------------
UPCAST_ROWS = 256  # weight rows upcast to fp32 at a time: 4 MB of fp32 at hidden 4096


def _matmul_upcast(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.float().T`` for fp32 ``x [B, K]``, with ``weight [R, K]`` upcast
    ``UPCAST_ROWS`` rows at a time (cache-sized) instead of as a whole: a bf16 weight is read
    once at 2 bytes an element, and no full fp32 copy is ever made. The row blocks run on the
    serial workers (:mod:`cpu_workers`: two ops a block, no thread-pool barrier). Each output
    element is the same K-term fp32 dot product as in the single GEMM (the split is over output
    columns; ``tests/test_cpu_path.py`` checks the bits against the reference)."""
    if weight.dtype == torch.float32:
        return x @ weight.T
    R, K = weight.shape
    out = torch.empty(x.shape[0], R, dtype=torch.float32, device=x.device)

    def block(i: int, state: dict) -> None:
        r0 = i * UPCAST_ROWS
        r1 = min(R, r0 + UPCAST_ROWS)
        if not state:  # one reused fp32 buffer a worker: a fresh .float() costs more
            state["buf"] = torch.empty(min(UPCAST_ROWS, R), K, dtype=torch.float32,
                                       device=x.device)
        rows = state["buf"][:r1 - r0]
        rows.copy_(weight[r0:r1])
        out[:, r0:r1] = x @ rows.T

    cpu_workers.run_items(block, -(-R // UPCAST_ROWS))
    return out


def query_side(hidden: torch.Tensor, weights: dict[str, torch.Tensor], positions: torch.Tensor,
               max_position: int, head_dim: int = C.HEAD_DIM,
               mixed_freqs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reference.query_side` in fp32 for weights stored in any float dtype: the same
    steps and the same fp32 arithmetic on the upcast weights, without materializing them in
    fp32 (the reference's ``weight.to(float32)`` copies 170 MB a layer per call for bf16
    weights). fp32 weights take the reference's own function."""
    if all(t.dtype == torch.float32 for t in weights.values()):
        return ref.query_side(hidden, weights, positions, max_position, head_dim,
                              mixed_freqs=mixed_freqs)
    x = hidden.float()
    q_lora = ref.rms_norm(_matmul_upcast(x, weights["wq_a.weight"]),
                          weights["q_norm_weight"].float())
    q = _matmul_upcast(q_lora, weights["wq_b.weight"]).view(x.shape[0], -1, head_dim)
    n_heads = q.shape[1]
    w = _matmul_upcast(x, weights["weights_proj.weight"]) * C.weight_scale(n_heads, head_dim)
    rows = ref.freqs_cis_at(positions, max_position, mixed_freqs)
    return ref.prepare_query(q, rows), w
