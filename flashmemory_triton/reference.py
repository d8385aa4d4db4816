"""Pure-torch reference of the FlashMemory retriever (design §3-§5).

This is the oracle every kernel is checked against and the ``backend="torch"`` path of
:class:`~flashmemory_triton.FlashMemoryRetriever`. It is written to be read next to design §3-§5:
one function per step, no fusion, no cleverness. ``dtype`` selects the arithmetic precision of
the fp32 steps (``torch.float64`` for tests); the bf16 rounding of q is part of the model and
happens in either precision.
"""

from __future__ import annotations

import math

import torch

from . import constants as C

__all__ = [
    "dequant_compressed_k",
    "chunk_scales",
    "rope_mixed_freqs",
    "precompute_freqs_cis",
    "freqs_cis_at",
    "apply_rope",
    "hadamard_transform",
    "rms_norm",
    "project_query",
    "prepare_query",
    "query_side",
    "score_logits",
    "keys_logits",
    "nonfinite_chunks",
    "pin_nonfinite",
    "layer_logits",
    "ensemble_scores",
]


# --- key side (design §4) -----------------------------------------------------------------------
def dequant_compressed_k(compressed_k: torch.Tensor, head_dim: int = C.HEAD_DIM,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Row format ``uint8 [..., N, head_dim + 4]`` -> keys ``[..., N, head_dim]``.

    ``k = fp8.float() * scale`` with bytes ``0..head_dim-1`` e4m3fn and the last four a
    little-endian float32 scale.
    """
    if compressed_k.dtype != torch.uint8:
        raise TypeError(f"compressed_k must be uint8, got {compressed_k.dtype}")
    if compressed_k.shape[-1] != head_dim + C.SCALE_BYTES:
        raise ValueError(f"compressed_k last dim must be {head_dim + C.SCALE_BYTES}, "
                         f"got shape {tuple(compressed_k.shape)}")
    fp8 = compressed_k[..., :head_dim].contiguous().view(torch.float8_e4m3fn).to(dtype)
    scale = chunk_scales(compressed_k, head_dim).to(dtype)[..., None]  # [..., N, 1]
    return fp8 * scale


def chunk_scales(compressed_k: torch.Tensor, head_dim: int = C.HEAD_DIM) -> torch.Tensor:
    """The float32 scale of every chunk, ``[..., N]``, from any view of row-format keys.

    ``.view(float32)`` needs contiguous bytes at a 4-byte aligned storage offset; a view at an
    odd byte offset is its own ``.contiguous()``, so it is cloned instead. The view reads the
    native byte order; the format is little-endian, as is every platform torch supports for
    CUDA (x86_64, aarch64)."""
    raw = compressed_k[..., head_dim:head_dim + C.SCALE_BYTES]
    if raw.numel() == 0:  # no chunks: empty tensors count as contiguous with any strides
        return torch.empty(raw.shape[:-1], dtype=torch.float32, device=raw.device)
    # .view(float32) needs every stride (size-1 dims' too) and the offset divisible by 4.
    if any(st % C.SCALE_BYTES for st in raw.stride()[:-1]) or raw.stride(-1) != 1 \
            or raw.storage_offset() % C.SCALE_BYTES:
        raw = raw.clone(memory_format=torch.contiguous_format)
    return raw.view(torch.float32)[..., 0]


def nonfinite_chunks(compressed_k: torch.Tensor, head_dim: int = C.HEAD_DIM) -> torch.Tensor:
    """Bool ``[..., N]``: chunks holding an e4m3 NaN byte (0x7F, 0xFF) or a scale that is NaN,
    infinite or larger in magnitude than ``C.MAX_KEY_SCALE`` (where ``scale x 448`` overflows
    float32).

    Policy (both backends): such a chunk's logit is NaN in every layer, so its score is NaN
    and no threshold or top-k selection ever keeps it. The plain formula already gives NaN
    for NaN bytes; an infinite or overflowing scale would give +-inf or NaN depending on the
    other bytes and on where each backend applies the scale, so it is pinned to NaN instead of
    letting garbage rank first. The rule reads the scale alone, so it does not depend on the
    arithmetic's precision.
    """
    nan_byte = ((compressed_k[..., :head_dim] & 0x7F) == 0x7F).any(-1)
    scale = chunk_scales(compressed_k, head_dim)
    return nan_byte | ~(scale.abs() <= C.MAX_KEY_SCALE)  # NaN compares False: caught too


def pin_nonfinite(logits: torch.Tensor, compressed_k: torch.Tensor,
                  head_dim: int = C.HEAD_DIM) -> torch.Tensor:
    """The non-finite policy on logits ``[..., N]`` of keys ``[..., N, 132]``: NaN for every
    :func:`nonfinite_chunks` chunk and for every logit that overflowed to +-inf (finite keys
    times a large q can overflow float32; the backends overflow at different steps, so an
    infinite logit is never a trustworthy rank and never selected)."""
    bad = nonfinite_chunks(compressed_k, head_dim) | torch.isinf(logits)
    return logits.masked_fill(bad, float("nan"))


# --- RoPE (design §3, YaRN, no mscale) ----------------------------------------------------------
def _yarn_correction_dim(n_rot: float, dim: int, base: float, original_seq_len: int) -> float:
    return dim * math.log(original_seq_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))


def yarn_ramp_bounds(dim: int = C.ROPE_DIM, base: float = C.ROPE_THETA,
                     original_seq_len: int = C.ROPE_ORIGINAL_SEQ_LEN,
                     beta_fast: int = C.ROPE_BETA_FAST,
                     beta_slow: int = C.ROPE_BETA_SLOW) -> tuple[int, int]:
    """``(low, high)`` of the YaRN ramp: (15, 25) for the release."""
    low = max(math.floor(_yarn_correction_dim(beta_fast, dim, base, original_seq_len)), 0)
    high = min(math.ceil(_yarn_correction_dim(beta_slow, dim, base, original_seq_len)),
               dim // 2 - 1)
    return low, high


def rope_mixed_freqs(dim: int = C.ROPE_DIM, base: float = C.ROPE_THETA,
                     factor: float = C.ROPE_FACTOR,
                     original_seq_len: int = C.ROPE_ORIGINAL_SEQ_LEN,
                     beta_fast: int = C.ROPE_BETA_FAST,
                     beta_slow: int = C.ROPE_BETA_SLOW) -> torch.Tensor:
    """The ``dim // 2`` YaRN-mixed inverse frequencies, float32 (design §3)."""
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low, high = yarn_ramp_bounds(dim, base, original_seq_len, beta_fast, beta_slow)
    i = torch.arange(dim // 2, dtype=torch.float32)
    ramp = ((i - low) / max(high - low, 1)).clamp(0.0, 1.0)
    return freqs * (1 - ramp) + freqs / factor * ramp


def precompute_freqs_cis(dim: int = C.ROPE_DIM, max_position: int = C.MAX_POSITION_RELEASE,
                         base: float = C.ROPE_THETA, factor: float = C.ROPE_FACTOR,
                         original_seq_len: int = C.ROPE_ORIGINAL_SEQ_LEN,
                         beta_fast: int = C.ROPE_BETA_FAST, beta_slow: int = C.ROPE_BETA_SLOW,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """The release's full RoPE table, complex64 ``[max_position, dim // 2]``."""
    mixed = rope_mixed_freqs(dim, base, factor, original_seq_len, beta_fast, beta_slow)
    angles = torch.outer(torch.arange(max_position, dtype=torch.float32), mixed)
    table = torch.polar(torch.ones_like(angles), angles)
    return table if device is None else table.to(device)


def freqs_cis_at(positions: torch.Tensor, max_position: int,
                 mixed_freqs: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``positions`` of the RoPE table without building it, complex64 ``[B, dim // 2]``.

    The angle is the same single float32 product ``position * mixed[i]`` the table holds, so
    the rows match :func:`precompute_freqs_cis` up to the sin/cos implementation. Positions
    are clamped to ``[0, max_position - 1]`` as the release does.
    """
    if mixed_freqs is None:
        mixed_freqs = rope_mixed_freqs()
    mixed_freqs = mixed_freqs.to(device=positions.device, dtype=torch.float32)
    # int64 first: a narrow dtype (int8, uint8, int16) cannot hold max_position - 1, and a
    # max_position past int64 clamps nothing an int64 position can hold.
    last = min(max_position - 1, torch.iinfo(torch.int64).max)
    pos = positions.to(torch.int64).clamp(0, last).to(torch.float32)
    angles = pos[:, None] * mixed_freqs[None, :]
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(q: torch.Tensor, freqs_cis: torch.Tensor, positions: torch.Tensor | None = None,
               rope_dim: int = C.ROPE_DIM) -> torch.Tensor:
    """Interleaved (GPT-J) rotation of the LAST ``rope_dim`` dims of ``q [B, H, D]``.

    ``freqs_cis`` is either the full table (then ``positions [B]`` picks and clamps rows) or
    the already-gathered rows ``[B, rope_dim // 2]`` (``positions=None``). The rotation is done
    in complex64 and cast back to ``q.dtype``; the first ``D - rope_dim`` dims are untouched.
    """
    if positions is not None:
        pos = positions.to(torch.long).clamp(0, freqs_cis.shape[0] - 1)
        freqs = freqs_cis[pos]
    else:
        freqs = freqs_cis
    q_pass, q_rot = q[..., :-rope_dim], q[..., -rope_dim:]
    pairs = q_rot.float().reshape(*q_rot.shape[:-1], rope_dim // 2, 2)
    rotated = torch.view_as_complex(pairs.contiguous()) * freqs[:, None, :].to(torch.complex64)
    q_rot = torch.view_as_real(rotated).flatten(-2).to(q.dtype)
    return torch.cat([q_pass, q_rot], dim=-1)


# --- Hadamard (design §3 step 6) ----------------------------------------------------------------
def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """Normalized Walsh-Hadamard transform over the last dim, natural (Sylvester) order.

    Butterfly with strides 1, 2, 4, ... mapping ``(a, b) -> (a + b, a - b)``, then
    ``/ sqrt(n)``. Computed in ``x.dtype`` if floating point (fp32 in the model, design §3 step 6).
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"hadamard_transform needs a power-of-two last dim, got {n}")
    out = x if x.is_floating_point() else x.float()
    lead = out.shape[:-1]
    h = 1
    while h < n:
        y = out.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        out = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return out / math.sqrt(n)


# --- query side (design §3) ---------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = C.RMS_NORM_EPS) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(x.dtype)


def project_query(hidden: torch.Tensor, wq_a: torch.Tensor, q_norm_weight: torch.Tensor,
                  wq_b: torch.Tensor, weights_proj: torch.Tensor, head_dim: int = C.HEAD_DIM,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-4 and 7: ``q [B, H, D]`` before rounding/RoPE and head weights ``w [B, H]``."""
    x = hidden.to(dtype)
    q_lora = rms_norm(x @ wq_a.to(dtype).T, q_norm_weight.to(dtype))
    # Heads from the weights, not -1: a batch of 0 rows must still give [0, H, D].
    q = (q_lora @ wq_b.to(dtype).T).view(x.shape[0], wq_b.shape[0] // head_dim, head_dim)
    n_heads = q.shape[1]
    w = (x @ weights_proj.to(dtype).T) * C.weight_scale(n_heads, head_dim)
    return q, w


def prepare_query(q: torch.Tensor, freqs_rows: torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Steps 5-6: round all of q to bf16, RoPE the last 64 dims, back to float, Hadamard."""
    q = apply_rope(q.to(torch.bfloat16), freqs_rows)
    return hadamard_transform(q.to(dtype))


def query_side(hidden: torch.Tensor, weights: dict[str, torch.Tensor], positions: torch.Tensor,
               max_position: int, head_dim: int = C.HEAD_DIM,
               dtype: torch.dtype = torch.float32,
               mixed_freqs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's query side: ``(q [B, H, D], w [B, H])`` in ``dtype``.

    ``weights`` holds the per-layer keys ``wq_a.weight``, ``q_norm_weight``, ``wq_b.weight``,
    ``weights_proj.weight``.
    """
    q, w = project_query(hidden, weights["wq_a.weight"], weights["q_norm_weight"],
                         weights["wq_b.weight"], weights["weights_proj.weight"], head_dim, dtype)
    rows = freqs_cis_at(positions, max_position, mixed_freqs)
    return prepare_query(q, rows, dtype), w


# --- score (design §5) --------------------------------------------------------------------------
def score_logits(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor,
                 logit_offset: float = 0.0) -> torch.Tensor:
    """``logit[b, n] = sum_h relu(k[b, n] . q[b, h]) * w[b, h] + logit_offset``.

    ``q [B, H, D]``, ``w [B, H]``, dequantized keys ``k [B, N, D]``; computed in ``q.dtype``.
    """
    s = torch.einsum("bnd,bhd->bnh", k.to(q.dtype), q)
    return (torch.relu(s) * w.to(q.dtype)[:, None, :]).sum(-1) + logit_offset


def layer_logits(hidden: torch.Tensor, compressed_k: torch.Tensor, positions: torch.Tensor,
                 weights: dict[str, torch.Tensor], max_position: int,
                 head_dim: int = C.HEAD_DIM, logit_offset: float = 0.0,
                 dtype: torch.dtype = torch.float32,
                 mixed_freqs: torch.Tensor | None = None) -> torch.Tensor:
    """One layer, end to end: hidden ``[B, hidden]``, keys ``uint8 [B, N, 132]`` -> ``[B, N]``."""
    q, w = query_side(hidden, weights, positions, max_position, head_dim, dtype, mixed_freqs)
    return keys_logits(q, w, compressed_k, head_dim, logit_offset)


def keys_logits(q: torch.Tensor, w: torch.Tensor, compressed_k: torch.Tensor,
                head_dim: int = C.HEAD_DIM, logit_offset: float = 0.0) -> torch.Tensor:
    """Score prepared ``q``/``w`` against row-format keys, with the non-finite-chunk policy."""
    k = dequant_compressed_k(compressed_k, head_dim, q.dtype)
    return pin_nonfinite(score_logits(q, w, k, logit_offset), compressed_k, head_dim)


def ensemble_scores(per_layer: list[torch.Tensor] | torch.Tensor,
                    mode: str = "max") -> torch.Tensor:
    """Combine per-layer sigmoid scores ``[B, N]`` by ``max`` (union) or ``mean``."""
    stacked = per_layer if isinstance(per_layer, torch.Tensor) else torch.stack(list(per_layer))
    if mode == "max":
        return stacked.max(dim=0).values
    if mode == "mean":
        return stacked.mean(dim=0)
    raise ValueError(f"ensemble mode must be 'max' or 'mean', got {mode!r}")
