"""The CPU backend: the design §5 score in exact fp32, blocked over chunks, all cores.

``backend="auto"`` runs this on a CPU device (``backend="cpu"`` names it; ``backend="torch"``
stays the reference, the oracle). It computes the reference's numbers: the keys are decoded to
the same fp32 values (``fp8 * scale``, one rounding, as :func:`reference.dequant_compressed_k`),
the dot products and the head sum are fp32 sums of the same terms; only the summation order
differs. Per chunk and layer the difference from the reference is at most

    2 * (D + H) * 2**-24 * sum_h |w_h| sum_d |k_d q_hd|        (+ an ulp of the offset add)

(the fp32 ``gamma_n`` bound of a length-D dot product and a length-H sum, for each of the two
summation orders; relu is 1-Lipschitz); ``tests/test_cpu_path.py`` checks it.

Why it is fast (the reference, like the release, dequantizes the whole key tensor and
materializes fp32 ``[B, N, H]`` products once per layer):

* a block of chunks is decoded once for all layers: the e4m3 bytes become float16 bit patterns
  with two integer ops (``e4m3`` is ``fp16`` with the exponent field shifted down by 8 powers of
  two, subnormals included), then one vectorized fp16 -> fp32 conversion; torch's own e4m3
  conversion is scalar and several times slower;
* one fp32 GEMM per block for every layer and head that reads those keys: ``[L*H, D] x [D, n]``
  with shared keys, ``[H, D] x [D, n]`` per layer otherwise;
* relu in place, then the head-weighted sum as a batched ``[1, H] x [H, n]`` product per layer;
* the block (``block_chunks`` chunks, about 2.5 KB each) stays in the cores' L2, and every
  temporary is one of a few buffers reused across blocks, so memory beyond the outputs is
  bounded whatever N and B: scores ``[B, N]`` (and ``[L, B, N]`` logits when asked for) plus
  ``block_chunks * (L*H + 3*D + 8) * 4`` bytes;
* every torch op runs on torch's intra-op thread pool (``torch.get_num_threads()``).

NaN policy as the reference (:func:`reference.pin_nonfinite`): a chunk with an e4m3 NaN byte or
a NaN, infinite or overflowing scale has a NaN logit in every layer that reads it, and so has a
logit that overflowed to +-inf.
"""

from __future__ import annotations

import torch

from . import _validate as V
from . import constants as C
from . import reference as ref

__all__ = ["DEFAULT_BLOCK_CHUNKS", "score_prepared_cpu", "decode_keys", "workspace_bytes"]

# Chunks per block: the block's temporaries (about 2.5 KB a chunk at L*H = 384) fit the L2 of
# two cores; much smaller blocks pay torch's per-op overhead, larger ones spill to L3.
DEFAULT_BLOCK_CHUNKS = 1024

# e4m3 byte b shifted into the HIGH byte of an int16, shifted right by one (arithmetic, which
# copies the sign into bit 14) and masked with 0xBF80 (clearing it again) is the float16 with sign bit 15, exponent bits 13..10 = b's exponent, mantissa
# bits 9..7 = b's mantissa: the same number times 2**-8, for normals and subnormals alike.
_FP16_MASK = 0xBF80 - 0x10000  # as a signed int16
_FP16_TO_E4M3 = 256.0  # 2**8, exact
_E4M3_MAX_AS_FP16 = C.FP8_E4M3_MAX / _FP16_TO_E4M3  # 1.75; the NaN bytes decode to +-1.875


class _Workspace:
    """Buffers reused by every block of one call (sized for a full block)."""

    def __init__(self, n: int, head_dim: int, rows: int, device: torch.device):
        self.bits = torch.empty(n, head_dim, dtype=torch.int16, device=device)
        self.keys = torch.empty(n, head_dim, dtype=torch.float32, device=device)
        self.dots = torch.empty(rows * n, dtype=torch.float32, device=device)


def workspace_bytes(block_chunks: int, rows: int, head_dim: int = C.HEAD_DIM) -> int:
    """Bytes of the reused buffers: per chunk, 2 + 4 bytes per key dim and 4 per dot row."""
    return block_chunks * (head_dim * 6 + rows * 4)


def decode_keys(rows: torch.Tensor, ws: _Workspace | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-format chunks ``uint8 [n, D + 4]`` -> fp32 keys ``[n, D]`` and a bool ``[n]`` mask.

    The keys are exactly :func:`reference.dequant_compressed_k`'s (``fp8 * scale`` rounded once
    to fp32); the mask marks the chunks the reference pins to NaN (an e4m3 NaN byte or a
    non-finite scale). ``ws``: buffers to decode into (a fresh set if ``None``).
    """
    n, width = rows.shape
    D = width - C.SCALE_BYTES
    if ws is None:
        ws = _Workspace(n, D, 0, rows.device)
    bits = ws.bits[:n]
    bits.copy_(rows[:, :D])  # zero-extended byte b
    # b * 256 wraps into the sign bit: the same bits as b << 8, and vectorized (the shift is not).
    bits.mul_(256).bitwise_right_shift_(1).bitwise_and_(_FP16_MASK)
    keys = ws.keys[:n]
    keys.copy_(bits.view(torch.float16))  # fp8 value * 2**-8, exact
    # Two row reductions (vectorized; aminmax and comparisons over rows are not).
    hi, lo = keys.amax(dim=-1), keys.amin(dim=-1)
    scale = ref.chunk_scales(rows, D)
    # The reference's rule (reference.nonfinite_chunks): a NaN byte, or a scale that is NaN,
    # infinite or past C.MAX_KEY_SCALE. NaN compares False, so it is caught too.
    bad = (hi > _E4M3_MAX_AS_FP16) | (lo < -_E4M3_MAX_AS_FP16)
    bad |= ~(scale.abs() <= C.MAX_KEY_SCALE)
    # keys * (2**8 * scale) is the real product fp8 * scale rounded once, as the reference's
    # fp8.float() * scale; 2**8 * scale is exact and finite for every scale not masked above.
    keys.mul_((scale * _FP16_TO_E4M3)[:, None])
    return keys, bad


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
    rows = L * H if shared else H  # dot-product rows of one GEMM
    block = min(block_chunks, max(N, 1))
    ws = _Workspace(block, D, rows, device)
    for b in range(B):
        # Shared keys: every layer's heads in one GEMM. Per layer: one GEMM per layer.
        groups = ([(q32[:, b].reshape(L * H, D), w32[:, b].reshape(L, 1, H), None)] if shared
                  else [(q32[l, b], w32[l, b].reshape(1, 1, H), l) for l in range(L)])
        for n0 in range(0, N, block):
            n1 = min(N, n0 + block)
            m = n1 - n0
            layer_logits = []
            for qg, wg, layer in groups:
                k_rows = compressed_k[b, n0:n1] if shared else compressed_k[layer, b, n0:n1]
                keys, bad = decode_keys(k_rows, ws)
                dots = ws.dots[:qg.shape[0] * m].view(qg.shape[0], m)
                torch.mm(qg, keys.t(), out=dots)
                dots.relu_()
                lg = torch.bmm(wg, dots.view(wg.shape[0], H, m)).view(wg.shape[0], m)
                if logit_offset != 0.0:
                    lg.add_(logit_offset)
                # reference.pin_nonfinite: masked chunks and overflowed logits are NaN.
                layer_logits.append(lg.masked_fill_(bad | torch.isinf(lg), float("nan")))
            block_logits = layer_logits[0] if shared else torch.cat(layer_logits)
            if logits is not None:
                logits[:, b, n0:n1] = block_logits
            scores[b, n0:n1] = ref.ensemble_scores(torch.sigmoid(block_logits), ensemble)
    return scores, logits
