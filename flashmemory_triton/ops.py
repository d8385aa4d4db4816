"""Functional entry points for custom decode loops and serving engines.

Two steps, usable separately so an engine can keep its own projections:

* :func:`prepare_queries`: projected q ``[L, B, H, D]`` (design §3 step 4, before rounding) and
  head weights ``[L, B, H]`` -> :class:`PreparedQueries` (bf16 rounding, RoPE, Hadamard and,
  in fp8 mode, per-head e4m3 quantization with the scale folded into the weights);
* :func:`score_prepared`: prepared queries + compressed keys -> ensemble scores ``[B, N]``
  and optionally per-layer logits ``[L, B, N]``.

:func:`score_chunks` does both. Backends: ``"triton"`` (the fused kernels), ``"cpu"`` (exact fp32
on CPU tensors, blocked and multi-threaded: :mod:`flashmemory_triton.cpu_path`), ``"torch"``
(the pure-torch fp32 reference, the oracle). ``backend="auto"`` uses Triton on CUDA tensors (or
under ``TRITON_INTERPRET=1``), the CPU path on CPU tensors, and the reference otherwise.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _validate as V
from . import constants as C
from . import reference as ref
from .utils import _device

ENSEMBLES = ("max", "mean")
BACKENDS = ("auto", "torch", "triton", "cpu")


def _precisions():
    from .kernels import DEFAULT_PRECISION, PRECISIONS
    return PRECISIONS, DEFAULT_PRECISION


class PreparedQueries(NamedTuple):
    """Scoring-ready queries. ``q [L, B, H, D]`` (bf16 for bf16/fp8 modes, fp32 otherwise),
    ``w [L, B, H]`` fp32 (fp8 scales folded in), the precision they were prepared for, and
    the backend that will score them."""
    q: torch.Tensor
    w: torch.Tensor
    precision: str
    backend: str


def resolve_backend(backend: str, device: torch.device) -> str:
    V.choice("backend", backend, BACKENDS)
    if backend == "torch":
        return "torch"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors; tensors are on {device}")
        return "cpu"
    runs = _device.triton_runs_on(device)
    if backend == "triton" and not runs:
        raise ValueError(f"backend='triton' needs CUDA tensors or TRITON_INTERPRET=1 with triton "
                         f"installed; tensors are on {device} "
                         f"(triton installed: {_device.triton_available()})")
    if runs:
        return "triton"
    return "cpu" if device.type == "cpu" else "torch"


def _resolve_precision(precision: str | None) -> str:
    precisions, default = _precisions()
    precision = default if precision is None else precision
    V.choice("precision", precision, precisions)
    return precision


def prepare_queries(q_proj: torch.Tensor, w: torch.Tensor, positions: torch.Tensor, *,
                    max_position: int = C.MAX_POSITION_RELEASE, precision: str | None = None,
                    backend: str = "auto",
                    rope_freqs: torch.Tensor | None = None) -> PreparedQueries:
    """Round, rotate and Hadamard-transform projected queries (design §3 steps 5-6).

    ``q_proj`` float ``[L, B, H, D]`` (or ``[B, H, D]`` for one layer), ``w`` float
    ``[L, B, H]`` (or ``[B, H]``) already multiplied by the weight scale, ``positions`` int
    ``[B]`` absolute token positions (clamped to the RoPE table).
    """
    V.tensor("q_proj", q_proj, floating=True, ndims=(3, 4))
    if q_proj.dim() == 3:
        q_proj = q_proj.unsqueeze(0)
    V.tensor("w", w, floating=True, ndims=(2, 3))
    if w.dim() == 2:
        w = w.unsqueeze(0)
    L, B, H, D = q_proj.shape
    if D != C.HEAD_DIM:
        raise ValueError(f"q_proj last dim must be head_dim {C.HEAD_DIM}, got {V.describe(q_proj)}")
    if tuple(w.shape) != (L, B, H):
        raise ValueError(f"w must be [L={L}, B={B}, H={H}] to match q_proj, got {V.describe(w)}")
    V.tensor("positions", positions, integer=True, ndim=1)
    # Device before values: V.positions reads the values (impossible on meta, a sync on CUDA).
    V.same_device(q_proj.device, w=w, positions=positions)
    V.positions("positions", positions, B)
    V.positive_int("max_position", max_position)
    if rope_freqs is not None:
        V.tensor("rope_freqs", rope_freqs, floating=True, ndim=1)
        if rope_freqs.shape[0] != C.ROPE_DIM // 2:
            raise ValueError(f"rope_freqs must be the {C.ROPE_DIM // 2} YaRN-mixed frequencies "
                             f"(reference.rope_mixed_freqs()), got {V.describe(rope_freqs)}")
    precision = _resolve_precision(precision)
    backend = resolve_backend(backend, q_proj.device)
    rows = ref.freqs_cis_at(positions, max_position, rope_freqs)
    # Elementwise ops keep their input's strides, so a strided q_proj would reach the scorers'
    # matmuls strided and could round differently: one small copy makes the answer layout-free.
    q_proj, w = V.dense(q_proj), V.dense(w)
    if backend in ("torch", "cpu"):  # the reference's query side, bit for bit
        q = torch.stack([ref.prepare_query(q_proj[l], rows) for l in range(L)])
        w = w.float()
        if precision == "fp8":
            q, w = quantize_fp8_per_head(q, w)
        return PreparedQueries(q, w, precision, backend)
    from .kernels.query_prep import prepare_query_launch
    q, w = prepare_query_launch(q_proj, w, rows.real.float(), rows.imag.float(), precision)
    return PreparedQueries(q, w, precision, backend)


def quantize_fp8_per_head(q: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Serving-stack fp8 q (design §5): per-head scale ``max(amax, 1e-4) / 448``, q rounded to
    e4m3 (returned as float32 holding e4m3 values), scale folded into ``w``."""
    amax = q.abs().amax(dim=-1)
    scale = amax.clamp_min(C.FP8_QUANT_MIN_AMAX) / C.FP8_E4M3_MAX
    q8 = (q / scale[..., None]).to(torch.float8_e4m3fn).to(torch.float32)
    return q8, w * scale


def _check_keys(compressed_k: torch.Tensor, L: int, B: int, device: torch.device) -> None:
    V.compressed_keys("compressed_k", compressed_k)
    if compressed_k.dim() == 4 and compressed_k.shape[0] != L:
        raise ValueError(f"per-layer compressed_k must be [L={L}, B, N, 132], "
                         f"got {V.describe(compressed_k)}")
    if compressed_k.shape[-3] != B:
        raise ValueError(f"compressed_k batch must be {B} to match the queries, "
                         f"got {V.describe(compressed_k)}")
    V.same_device(device, compressed_k=compressed_k)


def _check_prepared(prepared: PreparedQueries) -> None:
    """A hand-built PreparedQueries must still be what the kernels index: q ``[L, B, H, 128]``
    in the precision's storage dtype, w ``[L, B, H]``, both on one device."""
    precisions, _ = _precisions()
    V.choice("prepared.precision", prepared.precision, precisions)
    V.choice("prepared.backend", prepared.backend, ("torch", "triton", "cpu"))
    q = V.tensor("prepared.q", prepared.q, floating=True, ndim=4)
    w = V.tensor("prepared.w", prepared.w, floating=True, ndim=3)
    L, B, H, D = q.shape
    if D != C.HEAD_DIM:
        raise ValueError(f"prepared.q last dim must be head_dim {C.HEAD_DIM}, got {V.describe(q)}")
    if tuple(w.shape) != (L, B, H):
        raise ValueError(f"prepared.w must be [L={L}, B={B}, H={H}] to match prepared.q, "
                         f"got {V.describe(w)}")
    V.same_device(q.device, **{"prepared.w": w})
    if prepared.backend == "triton":
        from .kernels.query_prep import query_out_dtype
        want = query_out_dtype(prepared.precision)
        if q.dtype != want:
            raise TypeError(f"prepared.q for precision {prepared.precision!r} on the triton "
                            f"backend must be {want} (as prepare_queries returns it), "
                            f"got {V.describe(q)}")


def score_prepared(prepared: PreparedQueries, compressed_k: torch.Tensor, *,
                   ensemble: str = "max", logit_offset: float = 0.0,
                   return_logits: bool = False, autotune: bool | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ensemble scores ``[B, N]`` (and per-layer logits ``[L, B, N]`` if ``return_logits``).

    ``compressed_k`` uint8 ``[B, N, 132]`` (one buffer for every layer, as the release) or
    ``[L, B, N, 132]`` (one per layer, as serving). ``autotune=None`` reads
    ``FLASHMEMORY_AUTOTUNE`` (off unless set to 1; never in the interpreter).
    """
    if not isinstance(prepared, PreparedQueries):
        raise TypeError(f"prepared must come from prepare_queries, got {type(prepared).__name__}")
    _check_prepared(prepared)
    V.choice("ensemble", ensemble, ENSEMBLES)
    logit_offset = V.real_number("logit_offset", logit_offset)
    q, w = prepared.q, prepared.w
    L, B, H, D = q.shape
    _check_keys(compressed_k, L, B, q.device)
    if prepared.backend != "triton":
        return _score_torch(q, w, compressed_k, ensemble, logit_offset, return_logits,
                            prepared.backend)
    import os

    from .kernels.score import fused_score_launch
    if autotune is None:
        autotune = os.environ.get("FLASHMEMORY_AUTOTUNE", "0") == "1"
    return fused_score_launch(q, w, compressed_k, precision=prepared.precision,
                              hw_fp8=_device.has_hw_fp8(q.device), ensemble=ensemble,
                              logit_offset=logit_offset, return_logits=return_logits,
                              autotune=autotune)


def _score_torch(q, w, compressed_k, ensemble, logit_offset, return_logits, backend="torch"):
    """The non-Triton backends on validated inputs: ``"cpu"`` (exact fp32, blocked) or
    ``"torch"`` (the reference, layer by layer)."""
    if backend == "cpu":
        from .cpu_path import score_prepared_cpu
        return score_prepared_cpu(q, w, compressed_k, ensemble=ensemble,
                                  logit_offset=logit_offset, return_logits=return_logits)
    L = q.shape[0]
    per_layer = compressed_k.dim() == 4
    logits = torch.stack([
        ref.keys_logits(q[l].float(), w[l], compressed_k[l] if per_layer else compressed_k,
                        logit_offset=logit_offset)
        for l in range(L)])
    scores = ref.ensemble_scores(torch.sigmoid(logits), ensemble)
    return scores, (logits if return_logits else None)


def score_chunks(q_proj: torch.Tensor, w: torch.Tensor, positions: torch.Tensor,
                 compressed_k: torch.Tensor, *, max_position: int = C.MAX_POSITION_RELEASE,
                 precision: str | None = None, ensemble: str = "max", logit_offset: float = 0.0,
                 return_logits: bool = False, backend: str = "auto"
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`prepare_queries` then :func:`score_prepared`."""
    # Keys and scoring options are checked here too, so nothing launches on bad input.
    V.tensor("q_proj", q_proj, floating=True, ndims=(3, 4))
    _check_keys(compressed_k, q_proj.shape[0] if q_proj.dim() == 4 else 1, q_proj.shape[-3],
                q_proj.device)
    V.choice("ensemble", ensemble, ENSEMBLES)
    V.real_number("logit_offset", logit_offset)
    prepared = prepare_queries(q_proj, w, positions, max_position=max_position,
                               precision=precision, backend=backend)
    return score_prepared(prepared, compressed_k, ensemble=ensemble, logit_offset=logit_offset,
                          return_logits=return_logits)


def project_queries(retriever, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All layers' projections in batched GEMMs (design §3 steps 1-4 and 7).

    ``hidden [B, hidden]`` (shared: one GEMM against every layer's stacked ``wq_a`` and
    ``weights_proj``) or ``[L, B, hidden]`` (per layer: one batched matmul). Runs in the
    weights' storage dtype (fp32 as released; bf16 weights give a bf16 GEMM with fp32
    accumulation), returns fp32 ``q [L, B, H, D]`` and ``w [L, B, H]``.
    """
    L, R, H, D = retriever.n_layers, retriever.q_lora_rank, retriever.n_heads, retriever.head_dim
    wdt = retriever.dtype
    # A strided hidden (e.g. column-major) could take another GEMM path and round differently;
    # one small copy keeps the result independent of the layout, bit for bit.
    hidden = V.dense(hidden)
    if hidden.dim() == 2:
        B = hidden.shape[0]
        flat = retriever.w_in.reshape(L * (R + H), -1)
        proj = (hidden.to(wdt) @ flat.T).float().view(B, L, R + H).transpose(0, 1)
    else:
        B = hidden.shape[1]
        proj = torch.bmm(hidden.to(wdt), retriever.w_in.transpose(1, 2)).float()
    q_lora = ref.rms_norm(proj[..., :R], retriever.q_norm_weight.float()[:, None, :])
    q = torch.bmm(q_lora.to(wdt), retriever.wq_b.transpose(1, 2)).float().view(L, B, H, D)
    w = proj[..., R:] * C.weight_scale(H, D)
    return q, w


def score_hidden(retriever, hidden, compressed_k, positions, *, ensemble="max",
                 return_logits=False, layer: int | None = None):
    """The retriever's Triton path: batched projections, query kernel, fused scorer.

    ``layer`` scores that layer alone (``score_layer``): the projections stay batched (they are
    small), but only its queries and its key buffer reach the kernels."""
    q, w = project_queries(retriever, hidden)
    if layer is not None:
        q, w = q[layer:layer + 1], w[layer:layer + 1]
        if compressed_k.dim() == 4:
            compressed_k = compressed_k[layer:layer + 1]
    prepared = prepare_queries(q, w, positions, max_position=retriever.max_position,
                               precision=retriever.precision, backend="triton",
                               rope_freqs=retriever.rope_freqs)
    return score_prepared(prepared, compressed_k, ensemble=ensemble,
                          logit_offset=retriever.logit_offset, return_logits=return_logits)
