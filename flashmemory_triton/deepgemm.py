"""A drop-in for DeepGEMM's indexer-logits API (``deep_gemm.fp8_mqa_logits``,
``get_paged_mqa_logits_metadata``, ``fp8_paged_mqa_logits``, and ``get_num_sms`` that engines
call to size the schedule), on every GPU Triton supports.

Same signatures, argument meanings, shapes, dtypes, defaults and output conventions as
DeepGEMM's Python API (its legacy fp8 entry points), computed by this package's scorer with
the weights taken as given (raw logits: no sigmoid, no ensemble, no offset)::

    logits[r, j] = sum_h weights[r, h] * relu(q[r, h] . (k_fp8[j] * k_scale[j]))

``q`` is e4m3 and read by the kernel as is (no conversion pass); any head count (V4's 128 in
one call); ``D = 128``; paged blocks of 64 keys. No function here reads a device value on
the host: shapes, dtypes, devices and strides are checked, values never (every call can be
captured in a CUDA graph). Tensors on CUDA, or on the CPU with ``TRITON_INTERPRET=1``, run
the Triton kernel (:mod:`flashmemory_triton.kernels.mqa_logits`); anything else, or
``backend="torch"``, runs the pure-torch path with the same conventions.

Conventions (DeepGEMM's):

* :func:`fp8_mqa_logits`: query ``i`` sees keys ``[ks[i], ke[i])`` (clamped into ``[0, N]``;
  ``ke <= ks`` is empty; ranges may overlap and come in any order). ``max_seqlen_k == 0``:
  logits ``[M, N]`` at absolute key columns, ``-inf`` outside each range when
  ``clean_logits`` (otherwise those columns are unspecified, as in DeepGEMM). ``max_seqlen_k
  > 0``: logits ``[M, max_seqlen_k]``, column ``j`` holding key ``ks[i] + j`` for
  ``j < ke[i] - ks[i]`` (a longer range is cut at ``max_seqlen_k``); the rest unspecified;
  ``clean_logits`` must then be False (DeepGEMM refuses the pair too).
* :func:`fp8_paged_mqa_logits`: ``q [B, next_n, H, D]``, logits ``[B * next_n,
  max_context_len]``, row ``b * next_n + t``. ``context_lens [B, next_n]``: row ``(b, t)``
  sees keys ``0 .. context_lens[b, t] - 1``; ``context_lens [B]``: it sees keys ``0 ..
  context_lens[b] - next_n + t`` (the MTP causal rule). Keys ``j`` live in page
  ``block_table[b, j // 64]``, slot ``j % 64``. Columns past a row's length are ``-inf``
  when ``clean_logits``, unspecified otherwise (DeepGEMM's convention); lengths beyond
  ``max_context_len`` or the table are cut there.

Differences that remain (see README "Switching from DeepGEMM"): no fp4 and no ``logits_dtype``
(fp32 logits only, as the legacy API); ``schedule_meta``'s content is ours (see
:func:`get_paged_mqa_logits_metadata`);
``indices`` (DeepGEMM's varlen sharing hint on sm_100) is checked and otherwise unused, since
``block_table`` and ``context_lens`` already name every row's keys; logits are a contiguous
``[rows, width]`` tensor (DeepGEMM returns a view of a wider, 1024-byte-aligned buffer).
"""

from __future__ import annotations

import torch

from . import _validate as V
from . import constants as C

__all__ = ["fp8_mqa_logits", "fp8_paged_mqa_logits", "get_num_sms",
           "get_paged_mqa_logits_metadata"]

BLOCK_KV = C.PAGE_CHUNKS  # the only paged block size (keys per page)
_FP8 = torch.float8_e4m3fn
_LEN_DTYPES = (torch.int32, torch.int64)


# --- argument checks (shapes, dtypes, devices, strides; never values) ------------------------
def _fp4_dtype(t: torch.Tensor) -> bool:
    return "float4" in str(t.dtype) or "fp4" in str(t.dtype)


def _check_q(q, ndim: int, what: str) -> torch.Tensor:
    """The e4m3 q (also taken as DeepGEMM's newer ``(q, None)`` pair: fp8, no fp4 scales)."""
    if isinstance(q, (tuple, list)) and len(q) == 2 and q[1] is None:
        q = q[0]
    if isinstance(q, (tuple, list)):
        raise TypeError(f"q must be one e4m3 tensor {what} (the legacy fp8 API); a (values, "
                        f"scales) pair is DeepGEMM's fp4 input, which is not supported")
    V.tensor("q", q, ndim=ndim)
    if _fp4_dtype(q):
        raise ValueError(f"q is fp4 ({V.describe(q)}): only e4m3 (fp8) q is supported")
    if q.dtype != _FP8:
        raise TypeError(f"q must have dtype torch.float8_e4m3fn {what}, got {V.describe(q)}")
    if q.shape[-1] != C.HEAD_DIM:
        raise ValueError(f"q head dim must be {C.HEAD_DIM} (the only D supported), "
                         f"got {V.describe(q)}")
    if not q.is_contiguous():
        raise ValueError(f"q must be contiguous (as DeepGEMM requires), got strides {q.stride()}")
    return q


def _check_weights(weights, rows: int, H: int, contiguous: bool) -> torch.Tensor:
    V.tensor("weights", weights, ndim=2)
    if weights.dtype != torch.float32:
        raise TypeError(f"weights must be float32 [{rows}, {H}], got {V.describe(weights)}")
    if tuple(weights.shape) != (rows, H):
        raise ValueError(f"weights must be [{rows}, {H}] (one weight per query row and head), "
                         f"got {V.describe(weights)}")
    unit = weights.shape[1] <= 1 or weights.stride(1) == 1
    if not unit or (contiguous and not weights.is_contiguous()):
        need = "contiguous" if contiguous else "unit-stride along heads"
        raise ValueError(f"weights must be {need}, got strides {weights.stride()}")
    return weights


def _check_width(name: str, width: int, rows: int) -> None:
    """The float32 output ``[rows, width]`` must be addressable (int64 bytes): past that torch's
    allocation fails with an overflow that names nothing."""
    if max(rows, 1) * width * 4 >= 2 ** 63:
        raise ValueError(f"{name} = {width} is too large: the float32 logits [{rows}, {name}] "
                         f"would pass 2**63 bytes")


def _check_backend(backend: str, device: torch.device) -> str:
    """``"triton"`` where the kernel runs (CUDA, or the interpreter), else the torch path
    (which is also what the package's CPU backend means here)."""
    from .ops import resolve_backend
    return "triton" if resolve_backend(backend, device) == "triton" else "torch"


# --- non-paged ---------------------------------------------------------------------------------
def fp8_mqa_logits(q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], weights: torch.Tensor,
                   cu_seq_len_k_start: torch.Tensor, cu_seq_len_k_end: torch.Tensor,
                   clean_logits: bool = True, max_seqlen_k: int = 0, *,
                   backend: str = "auto") -> torch.Tensor:
    """Logits of ``M`` queries against ``N`` keys, each query over its own key range.

    ``q`` e4m3 ``[M, H, 128]``, ``kv = (e4m3 [N, 128], float32 [N])``, ``weights`` float32
    ``[M, H]``, ``cu_seq_len_k_start``/``cu_seq_len_k_end`` int32 ``[M]``. Returns float32
    ``[M, N]`` (``max_seqlen_k == 0``) or ``[M, max_seqlen_k]``; see the module doc for the
    conventions. ``backend``: ``"auto"``, ``"triton"`` or ``"torch"`` (an addition)."""
    q = _check_q(q, 3, "[M, H, 128]")
    M, H, D = q.shape
    if not isinstance(kv, (tuple, list)) or len(kv) != 2:
        raise TypeError(f"kv must be a pair (e4m3 [N, {D}], float32 [N]), got "
                        f"{type(kv).__name__}")
    k8, ks = kv
    V.tensor("kv[0]", k8, ndim=2)
    if _fp4_dtype(k8):
        raise ValueError(f"kv[0] is fp4 ({V.describe(k8)}): only e4m3 (fp8) keys are supported")
    if k8.dtype != _FP8 or k8.shape[1] != D:
        raise TypeError(f"kv[0] must be float8_e4m3fn [N, {D}], got {V.describe(k8)}")
    N = k8.shape[0]
    V.tensor("kv[1]", ks, dtype=torch.float32, ndim=1)
    if ks.shape[0] != N:
        raise ValueError(f"kv[1] (scales) must be float32 [{N}], got {V.describe(ks)}")
    if not k8.is_contiguous() or not ks.is_contiguous():
        raise ValueError(f"kv must be contiguous (as DeepGEMM requires), got strides "
                         f"{k8.stride()} and {ks.stride()}")
    _check_weights(weights, M, H, contiguous=False)
    for name, t in (("cu_seq_len_k_start", cu_seq_len_k_start),
                    ("cu_seq_len_k_end", cu_seq_len_k_end)):
        V.tensor(name, t, dtypes=_LEN_DTYPES, ndim=1)
        if t.shape[0] != M:
            raise ValueError(f"{name} must be int32 [{M}] (one per query), got {V.describe(t)}")
    V.same_device(q.device, **{"kv[0]": k8, "kv[1]": ks, "weights": weights,
                               "cu_seq_len_k_start": cu_seq_len_k_start,
                               "cu_seq_len_k_end": cu_seq_len_k_end})
    if isinstance(max_seqlen_k, bool) or not isinstance(max_seqlen_k, int) or max_seqlen_k < 0:
        raise ValueError(f"max_seqlen_k must be a non-negative int, got {max_seqlen_k!r}")
    _check_width("max_seqlen_k", max_seqlen_k, M)
    if not isinstance(clean_logits, bool):
        raise TypeError(f"clean_logits must be a bool, got {type(clean_logits).__name__}")
    if max_seqlen_k and clean_logits:
        raise ValueError("clean_logits=True needs max_seqlen_k=0: compressed logits "
                         "(max_seqlen_k > 0) are not cleaned (DeepGEMM refuses this pair too)")
    absolute = max_seqlen_k == 0
    width = N if absolute else max_seqlen_k
    if _check_backend(backend, q.device) == "torch":
        return _mqa_torch(q, k8, ks, weights, cu_seq_len_k_start, cu_seq_len_k_end, width,
                          absolute)
    from .kernels.mqa_logits import mqa_logits_launch
    kb = k8.view(torch.uint8)
    return mqa_logits_launch(q.view(torch.uint8), weights, kb, ks, width=width, limit=N,
                             paged=False, absolute=absolute, fill=clean_logits,
                             lo=cu_seq_len_k_start.contiguous(), hi=cu_seq_len_k_end.contiguous())


# The torch path's [rows, H, N] fp32 scores per step stay under this (DeepGEMM's reference
# bounds its score chunk the same way): 64 rows at H = 64, N = 65536 would be 1 GiB.
TORCH_SCORE_BYTES = 256 << 20


def _mqa_torch(q, k8, ks, w, lo, hi, width, absolute, rows_per_step: int = 64):
    """Torch path: dequantized keys, the head-weighted ReLU sum, then the range mask."""
    M, N = q.shape[0], k8.shape[0]
    per_row = 4 * q.shape[1] * max(N, 1)
    rows_per_step = max(1, min(rows_per_step, TORCH_SCORE_BYTES // per_row))
    k = k8.float() * ks[:, None]
    lo = lo.to(torch.int64).clamp(0, N)
    hi = torch.maximum(hi.to(torch.int64).clamp(0, N), lo)
    out = torch.full((M, width), float("-inf"), dtype=torch.float32, device=q.device)
    for m0 in range(0, M, rows_per_step):
        m1 = min(M, m0 + rows_per_step)
        s = torch.einsum("mhd,nd->mhn", q[m0:m1].float(), k).relu()
        full = torch.einsum("mhn,mh->mn", s, w[m0:m1].float())  # [m, N]
        if absolute:
            j = torch.arange(N, device=q.device)
            inside = (j[None, :] >= lo[m0:m1, None]) & (j[None, :] < hi[m0:m1, None])
            out[m0:m1] = torch.where(inside, full, out[m0:m1])
        else:
            j = torch.arange(width, device=q.device)
            src = lo[m0:m1, None] + j[None, :]
            inside = src < hi[m0:m1, None]
            src = torch.where(inside, src, torch.zeros_like(src)).clamp(max=max(N - 1, 0))
            got = full.gather(1, src) if N else torch.zeros_like(src, dtype=torch.float32)
            out[m0:m1] = torch.where(inside, got, out[m0:m1])
    return out


# --- paged -------------------------------------------------------------------------------------
CPU_NUM_SMS = 4  # the schedule's share count off the GPU (several: the walk is exercised)


def get_num_sms() -> int:
    """The SM count engines pass to :func:`get_paged_mqa_logits_metadata` (DeepGEMM's
    ``get_num_sms()``, which serving engines call next to it): the current CUDA device's
    multiprocessor count, or ``CPU_NUM_SMS`` without a GPU (queried per call, never at
    import)."""
    from .utils import _device
    if not _device.cuda_available():
        return CPU_NUM_SMS
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def get_paged_mqa_logits_metadata(context_lens: torch.Tensor, block_kv: int, num_sms: int,
                                  indices: torch.Tensor | None = None) -> torch.Tensor:
    """The paged kernel's schedule: int32 ``[num_sms + 1, 2]``, row ``i`` = (query row,
    64-key block within it) where program ``i``'s equal share of all the batch's key blocks
    begins; row ``num_sms`` is ``(rows, 0)``. Computed with device ops only (no host sync).

    :func:`fp8_paged_mqa_logits` launches one program per share (``num_sms`` of them, whatever
    the GPU), each walking its blocks in order and skipping to the next row past a row's
    length. The first share always starts at ``(0, 0)`` and the last ends after the last row,
    so any non-decreasing schedule (one built for other lengths, another ``num_sms``, 1-D
    ``context_lens`` with ``next_n > 1``) still covers every block exactly once: a stale
    schedule costs balance, never correctness, as long as its rows are non-decreasing."""
    if block_kv != BLOCK_KV:
        raise ValueError(f"block_kv must be {BLOCK_KV} (the only page size), got {block_kv!r}")
    if isinstance(num_sms, bool) or not isinstance(num_sms, int) or num_sms < 1:
        raise ValueError(f"num_sms must be a positive int, got {num_sms!r}")
    V.addressable("the schedule", (num_sms + 1, 2), 8, num_sms=num_sms)
    V.tensor("context_lens", context_lens, dtypes=_LEN_DTYPES, ndims=(1, 2))
    lens = context_lens.reshape(-1) if context_lens.dim() == 2 else context_lens
    _check_indices(indices, lens.shape[0], context_lens,
                   context_lens.shape[1] if context_lens.dim() == 2 else 1)
    blocks = (lens.to(torch.int64).clamp_min(0) + BLOCK_KV - 1) // BLOCK_KV
    cum = torch.cumsum(blocks, 0)  # inclusive
    total = cum[-1] if cum.numel() else torch.zeros((), dtype=torch.int64, device=lens.device)
    target = torch.arange(num_sms + 1, device=lens.device, dtype=torch.int64) * total // num_sms
    row = torch.searchsorted(cum, target, right=True)  # first row whose blocks end after target
    before = torch.where(row > 0, cum[(row - 1).clamp_min(0)] if cum.numel() else row, 0)
    meta = torch.stack([row, target - before], dim=1)
    meta[-1, 0], meta[-1, 1] = lens.shape[0], 0
    return meta.to(torch.int32)


def _check_indices(indices, rows: int, context_lens, next_n: int) -> None:
    if indices is None:
        return
    V.tensor("indices", indices, dtypes=_LEN_DTYPES, ndim=1)
    if indices.shape[0] != rows:
        raise ValueError(f"indices must be int32 [{rows}] (one per query row), "
                         f"got {V.describe(indices)}")
    if next_n != 1:
        raise ValueError(f"indices (varlen rows) needs next_n = 1, got next_n = {next_n}")
    V.same_device(context_lens.device, indices=indices)


def _check_kv_cache(kv_cache) -> tuple[int, int]:
    """``uint8 [P, 64, 1, 132]`` with DeepGEMM's strides; returns (P, page stride bytes)."""
    V.tensor("kv_cache", kv_cache, ndim=4)
    if kv_cache.dtype != torch.uint8:
        raise TypeError(f"kv_cache must be uint8 [P, 64, 1, 132] (the fused fp8 cache), "
                        f"got {V.describe(kv_cache)}")
    P, block, heads, width = kv_cache.shape
    if block != BLOCK_KV:
        raise ValueError(f"kv_cache block size must be {BLOCK_KV} (the only one supported), "
                         f"got {V.describe(kv_cache)}")
    if heads != 1:
        raise ValueError(f"kv_cache must have one kv head [P, 64, 1, 132], got "
                         f"{V.describe(kv_cache)}")
    if width == C.HEAD_DIM // 2 + C.SCALE_BYTES:
        raise ValueError(f"kv_cache looks like an fp4 cache ({width} bytes a key): only the fp8 "
                         f"cache (132 bytes a key) is supported")
    if width != C.CHUNK_BYTES:
        raise ValueError(f"kv_cache last dim must be {C.CHUNK_BYTES} (128 e4m3 bytes + a "
                         f"float32 scale: D = 128 is the only head dim), got "
                         f"{V.describe(kv_cache)}")
    stride = kv_cache.stride(0)
    if kv_cache.stride(1) != C.CHUNK_BYTES or kv_cache.stride(3) != 1:
        raise ValueError(f"kv_cache must have strides (page, 132, *, 1) (DeepGEMM's), "
                         f"got {kv_cache.stride()}")
    if P > 1 and (stride % 4 or stride < C.PAGE_BYTES):
        raise ValueError(f"kv_cache page stride must be a multiple of 4 bytes and at least "
                         f"{C.PAGE_BYTES}, got {stride}")
    if kv_cache.data_ptr() % 4:
        raise ValueError(f"kv_cache must start 4-byte aligned (float32 scales), its address "
                         f"% 4 = {kv_cache.data_ptr() % 4}")
    return P, stride if P > 1 else C.PAGE_BYTES


def _pool_bytes(kv_cache, P: int, stride: int) -> torch.Tensor:
    """A flat uint8 view from the first page's first byte to the last page's last byte."""
    span = (P - 1) * stride + C.PAGE_BYTES if P else 0
    return kv_cache.as_strided((span,), (1,))


def fp8_paged_mqa_logits(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor,
                         context_lens: torch.Tensor, block_table: torch.Tensor,
                         schedule_meta: torch.Tensor, max_context_len: int,
                         clean_logits: bool = False, indices: torch.Tensor | None = None, *,
                         backend: str = "auto") -> torch.Tensor:
    """Logits of ``B * next_n`` decode queries against their requests' paged keys.

    ``q`` e4m3 ``[B, next_n, H, 128]``, ``kv_cache`` uint8 ``[P, 64, 1, 132]`` (each page
    ``[64 x 128 e4m3][64 x float32]``, any page stride that is a multiple of 4), ``weights``
    float32 ``[B * next_n, H]``, ``context_lens`` int32 ``[B]`` or ``[B, next_n]``,
    ``block_table`` int32 ``[B, max_blocks]``, ``schedule_meta`` from
    :func:`get_paged_mqa_logits_metadata`. Returns float32 ``[B * next_n, max_context_len]``;
    see the module doc for the conventions."""
    q = _check_q(q, 4, "[B, next_n, H, 128]")
    B, next_n, H, D = q.shape
    P, stride = _check_kv_cache(kv_cache)
    R = B * next_n
    _check_weights(weights, R, H, contiguous=True)
    V.tensor("context_lens", context_lens, dtypes=_LEN_DTYPES, ndims=(1, 2))
    if tuple(context_lens.shape) not in ((B,), (B, next_n)):
        raise ValueError(f"context_lens must be int32 [{B}] or [{B}, {next_n}] (B, next_n of "
                         f"q), got {V.describe(context_lens)}")
    V.tensor("block_table", block_table, dtypes=_LEN_DTYPES, ndim=2)
    if block_table.shape[0] != B:
        raise ValueError(f"block_table must be int32 [{B}, max_blocks], got "
                         f"{V.describe(block_table)}")
    V.tensor("schedule_meta", schedule_meta, dtype=torch.int32, ndim=2)
    if schedule_meta.shape[1] != 2 or schedule_meta.shape[0] < 2:
        raise ValueError(f"schedule_meta must be int32 [num_sms + 1, 2] (from "
                         f"get_paged_mqa_logits_metadata), got {V.describe(schedule_meta)}")
    _check_indices(indices, R, context_lens, next_n)
    V.same_device(q.device, kv_cache=kv_cache, weights=weights, context_lens=context_lens,
                  block_table=block_table, schedule_meta=schedule_meta)
    if isinstance(max_context_len, bool) or not isinstance(max_context_len, int) \
            or max_context_len < 0:
        raise ValueError(f"max_context_len must be a non-negative int, got {max_context_len!r}")
    _check_width("max_context_len", max_context_len, R)
    if not isinstance(clean_logits, bool):
        raise TypeError(f"clean_logits must be a bool, got {type(clean_logits).__name__}")
    lens = row_lengths(context_lens, next_n)
    if _check_backend(backend, q.device) == "torch":
        return _paged_torch(q, kv_cache, P, stride, weights, lens, block_table, max_context_len)
    from .kernels.mqa_logits import mqa_logits_launch
    kb = _pool_bytes(kv_cache, P, stride)
    kf = kb.view(torch.float32) if P else kb.new_empty(0).view(torch.float32)
    return mqa_logits_launch(q.view(torch.uint8).view(R, H, D), weights, kb, kf,
                             width=max_context_len, limit=P, paged=True, absolute=False,
                             fill=clean_logits, lo=lens, table=block_table, next_n=next_n,
                             meta=schedule_meta.contiguous(), page_stride=stride)


def row_lengths(context_lens: torch.Tensor, next_n: int) -> torch.Tensor:
    """Keys each query row sees, int32 ``[B * next_n]`` (device ops only): ``[B, next_n]``
    lengths as given; ``[B]`` lengths by the causal rule ``context_lens[b] - next_n + t + 1``."""
    if context_lens.dim() == 2:
        return context_lens.reshape(-1).to(torch.int32).contiguous()
    t = torch.arange(next_n, device=context_lens.device, dtype=torch.int64)
    lens = context_lens.to(torch.int64)[:, None] - next_n + 1 + t[None, :]
    return lens.reshape(-1).to(torch.int32)


def _paged_torch(q, kv_cache, P, stride, w, lens, table, width):
    """Torch path: each table row's pages gathered and dequantized once for its next_n rows."""
    B, next_n, H, D = q.shape
    R = B * next_n
    out = torch.full((R, width), float("-inf"), dtype=torch.float32, device=q.device)
    T = table.shape[1] * BLOCK_KV
    cols = min(width, T)
    if cols == 0 or R == 0:
        return out
    flat = _pool_bytes(kv_cache, P, stride)
    pages = flat.as_strided((P, C.PAGE_BYTES), (stride, 1)) if P else \
        flat.new_zeros(1, C.PAGE_BYTES)
    fp8 = pages[:, :BLOCK_KV * D].reshape(-1, BLOCK_KV, D).view(_FP8)
    scale = pages[:, BLOCK_KV * D:].contiguous().view(torch.float32)  # [P, 64]
    ids = table.to(torch.int64)
    valid = (ids >= 0) & (ids < P)  # P = 0: no page is valid (the stand-in page is never read)
    ids = torch.where(valid, ids, torch.zeros_like(ids))
    lens = lens.to(torch.int64).clamp(0, cols).view(B, next_n)
    j = torch.arange(cols, device=q.device)
    for b in range(B):
        k = fp8[ids[b]].float() * scale[ids[b]][..., None]  # [max_blocks, 64, D]
        k = torch.where(valid[b][:, None, None], k, torch.full_like(k, float("nan")))
        k = k.reshape(T, D)[:cols]
        s = torch.einsum("thd,nd->thn", q[b].float(), k).relu()
        logits = torch.einsum("thn,th->tn", s, w[b * next_n:(b + 1) * next_n].float())
        inside = j[None, :] < lens[b][:, None]
        rows = slice(b * next_n, (b + 1) * next_n)
        out[rows, :cols] = torch.where(inside, logits, out[rows, :cols])
    return out
