"""The release's scoring path: the bench's reference provider, the function ``torch.compile``
is given, and (in blocks of chunks) the oracle of the correctness check.

It strings together the functions of :mod:`flashmemory_triton.reference` as the upstream
release runs them: per layer, dequantize the WHOLE key tensor to fp32, ``einsum`` to fp32
``[B, N, H]``, relu, weight, sum; sigmoid; ensemble. The query side (bf16 rounding, RoPE,
Hadamard) is :func:`release_queries`, run once outside the timed region: it costs the same
whatever N, and the full-cycle rows time it with everything else.
"""

from __future__ import annotations

import torch

from flashmemory_triton import reference as ref


def release_queries(q_proj: torch.Tensor, positions: torch.Tensor,
                    max_position: int) -> torch.Tensor:
    """Projected ``q [L, B, H, D]`` -> scoring-ready fp32 queries (design §3 steps 5-6)."""
    rows = ref.freqs_cis_at(positions, max_position)
    return torch.stack([ref.prepare_query(q, rows) for q in q_proj])


def release_scores(q: torch.Tensor, w: torch.Tensor, compressed_k: torch.Tensor, ensemble: str,
                   logit_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ensemble scores ``[B, N]`` and per-layer logits ``[L, B, N]`` as the release computes them.

    ``q [L, B, H, D]`` from :func:`release_queries`, ``w [L, B, H]``; ``compressed_k`` is
    ``[B, N, 132]`` (every layer reads it, and dequantizes it again, as the release does) or
    ``[L, B, N, 132]``.
    """
    per_layer = compressed_k.dim() == 4
    logits = torch.stack([
        ref.score_logits(q[layer], w[layer], ref.dequant_compressed_k(
            compressed_k[layer] if per_layer else compressed_k), logit_offset)
        for layer in range(q.shape[0])])
    return ref.ensemble_scores(torch.sigmoid(logits), ensemble), logits


def release_temp_bytes(batch: int, n: int, heads: int, head_dim: int) -> int:
    """Peak temporaries of one layer of :func:`release_scores`: per chunk and batch row, two
    fp32 ``[D]`` key copies (decoded, scaled) and three fp32 ``[H]`` tensors (einsum, relu,
    weighted)."""
    return batch * n * (2 * head_dim + 3 * heads) * 4


def release_scores_blocked(q: torch.Tensor, w: torch.Tensor, compressed_k: torch.Tensor,
                           ensemble: str, block_bytes: int, logit_offset: float = 0.0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`release_scores` over blocks of chunks, temporaries under ``block_bytes``.

    Every chunk's logit depends on that chunk alone, so the blocks give the same numbers as one
    call; this is how the check gets a reference where the release would run out of memory.
    """
    L, B, H, D = q.shape
    N = compressed_k.shape[-2]
    block = max(1, block_bytes // release_temp_bytes(B, 1, H, D))
    scores = torch.empty(B, N, dtype=torch.float32, device=compressed_k.device)
    logits = torch.empty(L, B, N, dtype=torch.float32, device=compressed_k.device)
    for n0 in range(0, N, block):
        n1 = min(N, n0 + block)
        scores[:, n0:n1], logits[:, :, n0:n1] = release_scores(
            q, w, compressed_k[..., n0:n1, :], ensemble, logit_offset)
    return scores, logits
