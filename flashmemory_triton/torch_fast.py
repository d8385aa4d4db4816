"""A faster pure-torch scorer: tensor-core matmuls over blocks of chunks, no Triton.

The reference (:mod:`flashmemory_triton.reference`) reproduces the release: it dequantizes the
whole key tensor to fp32 and materializes fp32 ``[B, N, H]`` dot products per layer, so its
memory grows with ``B * N * H * 4`` bytes (16 GB at B = 32, N = 1M) and it runs without tensor
cores. This module computes the same design §5 score with ordinary torch ops a serving engine can
ship where Triton is unavailable:

* the e4m3 bytes are decoded to bf16 (exact: every e4m3 value is a bf16 value) and multiplied
  by bf16 queries with one batched matmul for all layers that share a key buffer;
* the per-chunk scale is factored out of the dot product as
  ``relu(s * x) = |s| * relu(sign(s) * x)``, which holds for every sign of ``s`` (design §5 warns
  that ``relu(s * x) = s * relu(x)`` needs ``s > 0``);
* chunks are processed in blocks sized so the temporaries stay under ``block_bytes``.

Precision ``"bf16"`` rounds q and the matmul output to bf16 (fp32 accumulation inside the
matmul); ``"fp32"`` runs the same algorithm in fp32 and agrees with the reference to fp32
rounding. The head-weighted sum and everything after it are fp32 in both modes. Chunks with a
NaN byte or a non-finite scale get NaN logits, as in :func:`reference.keys_logits`.
"""

from __future__ import annotations

import torch

from . import _validate as V
from . import constants as C
from . import reference as ref
from .ops import ENSEMBLES, _check_keys, prepare_queries

PRECISIONS = ("bf16", "fp32")
DEFAULT_BLOCK_BYTES = 256 * 2**20  # temporaries per block; large enough to keep matmuls efficient

_COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

__all__ = ["PRECISIONS", "score_chunks_fast", "score_prepared_fast"]


def score_chunks_fast(q_proj: torch.Tensor, w: torch.Tensor, positions: torch.Tensor,
                      compressed_k: torch.Tensor, *, max_position: int = C.MAX_POSITION_RELEASE,
                      precision: str = "bf16", ensemble: str = "max", logit_offset: float = 0.0,
                      return_logits: bool = False, block_bytes: int = DEFAULT_BLOCK_BYTES
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as :func:`flashmemory_triton.ops.score_chunks`, computed with torch ops.

    ``q_proj`` float ``[L, B, H, D]`` (projected, before rounding/RoPE/Hadamard), ``w``
    ``[L, B, H]`` (weight scale included), ``positions`` int ``[B]``, ``compressed_k`` uint8
    ``[B, N, 132]`` (shared) or ``[L, B, N, 132]`` (per layer). Returns ensemble scores
    ``[B, N]`` float32 and, if ``return_logits``, per-layer logits ``[L, B, N]`` float32.
    """
    V.choice("precision", precision, PRECISIONS)
    # The query side is the reference's, in fp32: rounding q to the compute dtype happens below.
    prepared = prepare_queries(q_proj, w, positions, max_position=max_position,
                               precision="fp32", backend="torch")
    return score_prepared_fast(prepared.q, prepared.w, compressed_k, precision=precision,
                               ensemble=ensemble, logit_offset=logit_offset,
                               return_logits=return_logits, block_bytes=block_bytes)


def score_prepared_fast(q: torch.Tensor, w: torch.Tensor, compressed_k: torch.Tensor, *,
                        precision: str = "bf16", ensemble: str = "max",
                        logit_offset: float = 0.0, return_logits: bool = False,
                        block_bytes: int = DEFAULT_BLOCK_BYTES
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Score already prepared queries ``q [L, B, H, D]`` (after Hadamard) with weights
    ``w [L, B, H]`` against ``compressed_k``; see :func:`score_chunks_fast`."""
    V.tensor("q", q, floating=True, ndim=4)
    V.tensor("w", w, floating=True, ndim=3)
    V.choice("precision", precision, PRECISIONS)
    V.choice("ensemble", ensemble, ENSEMBLES)
    if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes < 1:
        raise ValueError(f"block_bytes must be a positive int, got {block_bytes!r}")
    L, B, H, D = q.shape
    if D != C.HEAD_DIM:
        raise ValueError(f"q last dim must be head_dim {C.HEAD_DIM}, got {V.describe(q)}")
    if tuple(w.shape) != (L, B, H):
        raise ValueError(f"w must be [L={L}, B={B}, H={H}] to match q, got {V.describe(w)}")
    V.same_device(q.device, w=w)
    _check_keys(compressed_k, L, B, q.device)
    q, w = V.dense(q), V.dense(w)  # strided operands could take another matmul path

    dtype = _COMPUTE_DTYPES[precision]
    shared = compressed_k.dim() == 3
    N = compressed_k.shape[-2]
    # Group the layers that read the same keys into one matmul: shared keys -> one group of
    # L*H query rows; per-layer keys -> L groups of H rows. Shapes [G, B, layers_per_group, ...].
    if shared:
        keys = compressed_k.unsqueeze(0)  # [1, B, N, 132]
        q_groups = q.transpose(0, 1).reshape(1, B, L * H, D)
        w_groups = w.transpose(0, 1).reshape(1, B, L, 1, H)
    else:
        keys = compressed_k
        q_groups = q.reshape(L, B, H, D)
        w_groups = w.reshape(L, B, 1, 1, H)
    G, per_group = keys.shape[0], L // keys.shape[0]
    q_c = q_groups.to(dtype)  # [G, B, rows, D]
    w_groups = w_groups.float()

    logits = torch.empty(L, B, N, dtype=torch.float32, device=q.device)
    rows = per_group * H
    # Temporaries per chunk of one (group, batch) pair: decoded keys, the dot products in the
    # compute dtype, and their fp32 relu copy for the weighted sum.
    bytes_per_chunk = G * B * (D * dtype.itemsize + rows * (dtype.itemsize + 4))
    block = max(1, block_bytes // bytes_per_chunk)
    for n0 in range(0, N, block):
        n1 = min(N, n0 + block)
        rows_k = keys[:, :, n0:n1]
        # [G, B, n, D], exact; row-major whatever the keys' layout, so the matmul rounds alike
        k8 = rows_k[..., :C.HEAD_DIM].view(torch.float8_e4m3fn).to(
            dtype, memory_format=torch.contiguous_format)
        scale = ref.chunk_scales(rows_k)  # [G, B, n], any byte offset
        # Chunks last, so the head-weighted sum below is a plain batched matmul.
        dots = torch.matmul(q_c, k8.transpose(-1, -2))  # [G, B, rows, n]
        # relu(s * x) = |s| * relu(sign(s) * x) for any sign of s; sign(0) = 0 gives the
        # reference's relu(0 * x) = 0. (Non-finite scales are pinned to NaN below.)
        dots.mul_(torch.sign(scale).to(dtype)[:, :, None, :]).relu_()
        relu = dots.float().view(G, B, per_group, H, n1 - n0)
        weighted = torch.matmul(w_groups, relu)[..., 0, :]  # [G, B, per_group, n]
        if shared:
            block_logits = weighted[0].transpose(0, 1)  # [L, B, n]
        else:
            block_logits = weighted[:, :, 0]  # [L, B, n]
        block_logits = block_logits * scale.abs() + logit_offset
        # The project's policy for chunks with an e4m3 NaN byte or a non-finite or overflowing
        # scale, and for overflowed logits (reference.pin_nonfinite): NaN in every layer.
        logits[:, :, n0:n1] = ref.pin_nonfinite(block_logits, rows_k)
    scores = ref.ensemble_scores(torch.sigmoid(logits), ensemble)
    return scores, (logits if return_logits else None)
