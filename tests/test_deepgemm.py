"""The DeepGEMM drop-in (flashmemory_triton/deepgemm.py, kernels/mqa_logits.py).

Two oracles, both written here:

* a float64 reference decoded from the raw bytes (``_helpers.e4m3fn_decode``: no torch fp8),
  with the range / length / page rules spelled out per row, against which both backends are
  checked with a derived error bound; the columns outside each row's keys are checked
  exactly (``-inf`` when ``clean_logits``; left alone otherwise: outputs are NaN-poisoned);
* DeepGEMM's own test inputs and references, re-implemented from its ``tests/test_attention.py``
  (deepseek-ai/DeepGEMM @ 54e2261: ``generate_ks_ke_tests``, ``kv_cache_cast_to_fp8``,
  ``per_custom_dims_cast_to_fp8``, ``ref_fp8_mqa_logits``, ``ref_paged_mqa_logits``,
  ``calc_diff``) at small sizes, passed unchanged, judged by its own tolerances.
"""

from __future__ import annotations

import pytest
import torch

from _helpers import e4m3fn_decode
from flashmemory_triton import constants as C
from flashmemory_triton import deepgemm as dg

pytestmark = pytest.mark.interpreter

FP8 = torch.float8_e4m3fn
D = C.HEAD_DIM
U32 = 2.0 ** -24
BACKENDS = ["triton", "torch"]
NAN_BYTE = 0x7F  # e4m3 NaN: any key read from a page nobody should read poisons its logit


# --- float64 reference ---------------------------------------------------------------------------
def ref_full(q8: torch.Tensor, k8: torch.Tensor, scale: torch.Tensor, w: torch.Tensor):
    """Every (row, key) logit in float64 from bytes: ``q8`` e4m3 ``[R, H, D]``, ``k8`` e4m3
    ``[N, D]``, ``scale [N]``, ``w [R, H]``. Returns the logits and the magnitude
    ``sum_h |w| |s| (|q_h| . |k|)`` the error bound scales with."""
    q = e4m3fn_decode(q8.view(torch.uint8))
    k = e4m3fn_decode(k8.view(torch.uint8))
    s = scale.double().cpu()
    w = w.double().cpu()
    dots = torch.einsum("rhd,nd->rhn", q, k) * s[None, None, :]
    logits = torch.einsum("rhn,rh->rn", dots.relu(), w)
    mag = torch.einsum("rhd,nd->rhn", q.abs(), k.abs()) * s.abs()[None, None, :]
    return logits, torch.einsum("rhn,rh->rn", mag, w.abs())


def bound(mag: torch.Tensor, H: int) -> torch.Tensor:
    """fp32 error of sum_h w_h relu(s * q_h . k): each dot of D products accumulates at most
    gamma_D |q|.|k| (Higham 3.1), the key scale (and the torch path's dequantized key) adds a
    rounding or two, ReLU is 1-Lipschitz and the weighted sum over H heads adds gamma_H: in all
    below (D + H + 4) u * mag with u = 2^-24. Worst-case, not statistical: never loosened."""
    return (D + H + 4) * U32 * mag + 1e-30


def assert_rows(got: torch.Tensor, want: torch.Tensor, mag: torch.Tensor, inside: torch.Tensor,
                clean: bool, H: int):
    """``inside`` [R, W]: where ``want`` holds a logit; elsewhere ``-inf`` if ``clean``."""
    got = got.double().cpu()
    assert got.shape == want.shape
    assert not torch.isnan(got[inside]).any(), "a logit inside a row's keys was not written"
    err = (got - want).abs()[inside]
    tol = bound(mag, H)[inside]
    assert (err <= tol).all(), f"max excess {(err - tol).max():.3g}"
    if clean:
        assert (got[~inside] == float("-inf")).all(), "clean_logits: not -inf outside the keys"


# --- inputs --------------------------------------------------------------------------------------
def fp8_q(*shape, gen):
    return (torch.randn(*shape, generator=gen) * 2).to(FP8)


def fp8_keys(N: int, gen):
    """``(e4m3 [N, D], float32 [N])`` quantized per key row (amax / 448), signs of the scales
    mixed: the math holds for any scale sign."""
    x = torch.randn(N, D, generator=gen)
    s = x.abs().amax(1).clamp_min(1e-4) / 448.0
    k8 = (x / s[:, None]).to(FP8)
    sign = torch.where(torch.rand(N, generator=gen) < 0.2, -1.0, 1.0)
    return k8, (s * sign).float()


def build_pool(k8: torch.Tensor, scale: torch.Tensor, table_pages: list[list[int]],
               lengths: list[int], P: int, stride: int = C.PAGE_BYTES) -> torch.Tensor:
    """A ``[P, 64, 1, 132]`` split-layout cache with page stride ``stride`` holding each
    request's keys ``k8[b] / scale[b]`` at its pages; untouched bytes are e4m3 NaN."""
    buf = torch.full((P * stride,), NAN_BYTE, dtype=torch.uint8)
    pages = buf.as_strided((P, C.PAGE_BYTES), (stride, 1))
    for b, (ids, n) in enumerate(zip(table_pages, lengths)):
        for j in range(n):
            p, slot = ids[j // 64], j % 64
            pages[p, slot * D:(slot + 1) * D] = k8[b][j].view(torch.uint8)
            pages[p, 64 * D + 4 * slot:64 * D + 4 * slot + 4] = \
                scale[b][j:j + 1].view(torch.uint8)
    return buf.as_strided((P, 64, 1, C.CHUNK_BYTES), (stride, C.CHUNK_BYTES, C.CHUNK_BYTES, 1))


# --- fp8_mqa_logits (prefill / non-paged) --------------------------------------------------------
# Ranges: overlapping, empty (ke == ks and ke < ks), out of order, cut at 0 and N, full.
KS = [0, 5, 100, 40, 0, 149, 30, -7, 60]
KE = [10, 5, 150, 200, 150, 150, 20, 3, 61]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H", [32, 64, 128])
@pytest.mark.parametrize("clean", [True, False])
def test_mqa_ranges(backend, H, clean):
    gen = torch.Generator().manual_seed(H + clean)
    N, M = 150, len(KS)
    q8, w = fp8_q(M, H, D, gen=gen), torch.randn(M, H, generator=gen)
    k8, s = fp8_keys(N, gen)
    ks, ke = torch.tensor(KS, dtype=torch.int32), torch.tensor(KE, dtype=torch.int32)
    got = dg.fp8_mqa_logits(q8, (k8, s), w, ks, ke, clean_logits=clean, backend=backend)
    if H == 32:  # DeepGEMM's newer (q, None) pair is the same fp8 q
        again = dg.fp8_mqa_logits((q8, None), (k8, s), w, ks, ke, clean, backend=backend)
        assert torch.equal(again.nan_to_num(1.5), got.nan_to_num(1.5))
    full, mag = ref_full(q8, k8, s, w)
    j = torch.arange(N)
    inside = (j[None] >= ks.clamp(0, N)[:, None]) & (j[None] < ke.clamp(0, N)[:, None])
    assert_rows(got, full, mag, inside, clean, H)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_seqlen_k", [1, 37, 64, 200])
def test_mqa_compressed(backend, max_seqlen_k):
    """``max_seqlen_k > 0``: column j of row i is key ks[i] + j (ranges longer than
    max_seqlen_k are cut); the rest is unspecified (here: left NaN-poisoned or -inf)."""
    gen = torch.Generator().manual_seed(max_seqlen_k)
    N, M, H = 150, len(KS), 32
    q8, w = fp8_q(M, H, D, gen=gen), torch.randn(M, H, generator=gen)
    k8, s = fp8_keys(N, gen)
    ks, ke = torch.tensor(KS, dtype=torch.int32), torch.tensor(KE, dtype=torch.int32)
    got = dg.fp8_mqa_logits(q8, (k8, s), w, ks, ke, clean_logits=False,
                            max_seqlen_k=max_seqlen_k, backend=backend)
    assert got.shape == (M, max_seqlen_k)
    full, mag = ref_full(q8, k8, s, w)
    lo, hi = ks.clamp(0, N).long(), ke.clamp(0, N).long()
    j = torch.arange(max_seqlen_k)
    src = (lo[:, None] + j[None]).clamp(max=N - 1)
    inside = j[None] < (hi - lo).clamp_min(0)[:, None]
    assert_rows(got, full.gather(1, src), mag.gather(1, src), inside, False, H)


def test_mqa_clean_with_max_seqlen_k_refused():
    q8, k8 = torch.zeros(2, 32, D).to(FP8), torch.zeros(4, D).to(FP8)
    args = (q8, (k8, torch.ones(4)), torch.ones(2, 32), torch.zeros(2, dtype=torch.int32),
            torch.ones(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="clean_logits"):
        dg.fp8_mqa_logits(*args, True, 8)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        dg.fp8_mqa_logits(*args, False, -1)
    for huge in (2 ** 64, 2 ** 62):  # an unaddressable [M, max_seqlen_k] output, named
        with pytest.raises(ValueError, match=f"max_seqlen_k = {huge} is too large"):
            dg.fp8_mqa_logits(*args, False, huge)


# --- fp8_paged_mqa_logits (decode) ----------------------------------------------------------------
def paged_case(H: int, next_n: int, two_d: bool, stride: int, seed: int):
    """Requests of 70, 0, 130 and 64 keys (not multiples of 64, empty, exact page); pages
    shuffled, requests 0 and 3 share their first page (prefix sharing), page 4 unused."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [70, 0, 130, 64]
    table_pages = [[6, 1], [], [3, 0, 5], [6]]
    B, P = len(lengths), 8
    keys = [fp8_keys(max(n, 1), gen) for n in lengths]
    k8 = [k for k, _ in keys]
    sc = [s for _, s in keys]
    k8[3], sc[3] = k8[0][:64], sc[0][:64]  # the shared page holds equal bytes
    cache = build_pool(k8, sc, table_pages, lengths, P, stride)
    table = torch.full((B, 4), -1, dtype=torch.int32)
    for b, ids in enumerate(table_pages):
        table[b, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
    q8 = fp8_q(B, next_n, H, D, gen=gen)
    w = torch.randn(B * next_n, H, generator=gen)
    ctx1 = torch.tensor(lengths, dtype=torch.int32)
    if two_d:  # per-row lengths <= the request's (the last row is the full length)
        ctx = (torch.rand(B, next_n, generator=gen) * (ctx1[:, None] + 1)).int()
        ctx[:, -1] = ctx1
        rows = ctx.reshape(-1).long()
    else:  # the causal rule: row t sees context_len - next_n + t + 1 keys
        ctx = ctx1
        rows = (ctx1[:, None].long() - next_n + 1 + torch.arange(next_n)[None]).reshape(-1)
    return q8, cache, w, ctx, table, rows, (k8, sc, lengths)


def paged_ref(q8, w, keys, next_n, width):
    """Full logits per request in float64: ``[B * next_n, width]`` (-inf past its keys)."""
    k8, sc, lengths = keys
    R, H = w.shape
    full = torch.full((R, width), float("-inf"), dtype=torch.float64)
    mag = torch.zeros(R, width, dtype=torch.float64)
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        rows = slice(b * next_n, (b + 1) * next_n)
        f, m = ref_full(q8[b], k8[b][:n], sc[b][:n], w[rows])
        c = min(n, width)
        full[rows, :c], mag[rows, :c] = f[:, :c], m[:, :c]
    return full, mag


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("next_n,two_d", [(1, False), (1, True), (2, False), (2, True)])
@pytest.mark.parametrize("clean", [True, False])
def test_paged(backend, next_n, two_d, clean):
    H = 64
    q8, cache, w, ctx, table, rows, keys = paged_case(H, next_n, two_d, C.PAGE_BYTES,
                                                      seed=next_n * 2 + two_d)
    meta = dg.get_paged_mqa_logits_metadata(ctx if two_d else ctx[:, None].expand(-1, next_n),
                                            64, 4)
    width = 200
    got = dg.fp8_paged_mqa_logits(q8, cache, w, ctx, table, meta, width, clean, backend=backend)
    assert got.shape == (len(rows), width) and got.dtype == torch.float32
    full, mag = paged_ref(q8, w, keys, next_n, width)
    inside = torch.arange(width)[None] < rows.clamp_min(0)[:, None]
    assert_rows(got, full, mag, inside, clean, H)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H", [32, 128])
@pytest.mark.parametrize("stride,width", [(C.PAGE_BYTES + 64, 140), (C.PAGE_BYTES + 4, 100)])
def test_paged_strided_cache_any_heads(backend, H, stride, width):
    """The engine's page stride (a 16-byte multiple, and a 4-byte one: word loads), H 32 and
    128 in one call, ``max_context_len`` shorter than the longest request (cut there)."""
    q8, cache, w, ctx, table, rows, keys = paged_case(H, 2, True, stride, seed=H + stride)
    assert cache.stride(0) == stride
    meta = dg.get_paged_mqa_logits_metadata(ctx, 64, 2)
    got = dg.fp8_paged_mqa_logits(q8, cache, w, ctx, table, meta, width, True, backend=backend)
    full, mag = paged_ref(q8, w, keys, 2, width)
    inside = torch.arange(width)[None] < rows.clamp(0, width)[:, None]
    assert_rows(got, full, mag, inside, True, H)


def test_triton_and_torch_agree():
    """The two paths on the same inputs, paged and not: the same logits within twice the
    bound (each is within it of float64) and the same -inf pattern."""
    q8, cache, w, ctx, table, rows, keys = paged_case(64, 2, False, C.PAGE_BYTES, seed=7)
    meta = dg.get_paged_mqa_logits_metadata(ctx[:, None].expand(-1, 2), 64, 3)
    a, b = (dg.fp8_paged_mqa_logits(q8, cache, w, ctx, table, meta, 192, True, backend=be)
            for be in BACKENDS)
    _, mag = paged_ref(q8, w, keys, 2, 192)
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    fin = torch.isfinite(b)
    assert ((a - b).abs().double()[fin] <= 2 * bound(mag, 64)[fin]).all()
    gen = torch.Generator().manual_seed(3)
    k8, s = fp8_keys(150, gen)
    q8, w = fp8_q(len(KS), 64, D, gen=gen), torch.randn(len(KS), 64, generator=gen)
    ks, ke = torch.tensor(KS, dtype=torch.int32), torch.tensor(KE, dtype=torch.int32)
    a, b = (dg.fp8_mqa_logits(q8, (k8, s), w, ks, ke, backend=be) for be in BACKENDS)
    _, mag = ref_full(q8, k8, s, w)
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    fin = torch.isfinite(b)
    assert ((a - b).abs().double()[fin] <= 2 * bound(mag, 64)[fin]).all()


def test_metadata_schedule():
    """Row i: (query row, block) where SM i's equal share of the 64-key blocks begins."""
    ctx = torch.tensor([[70, 70], [0, 0], [130, 130]], dtype=torch.int32)  # 2,2,0,0,3,3 blocks
    meta = dg.get_paged_mqa_logits_metadata(ctx, 64, 4)
    assert meta.dtype == torch.int32 and meta.shape == (5, 2)
    # 10 blocks over 4 SMs start at blocks 0, 2, 5, 7; the end marker is (rows, 0).
    assert meta.tolist() == [[0, 0], [1, 0], [4, 1], [5, 0], [6, 0]]
    # [70, 0, 130]: 2 + 0 | 3 blocks over 2 SMs
    assert dg.get_paged_mqa_logits_metadata(ctx[:, 0], 64, 2).tolist() == [[0, 0], [2, 0], [3, 0]]
    with pytest.raises(ValueError, match="block_kv"):
        dg.get_paged_mqa_logits_metadata(ctx, 32, 4)


# --- unsupported values and bad input: clear errors before any launch ----------------------------
def _paged_args(**over):
    q8 = torch.zeros(2, 1, 32, D).to(FP8)
    cache = torch.zeros(3, 64, 1, 132, dtype=torch.uint8)
    args = dict(q=q8, kv_cache=cache, weights=torch.ones(2, 32),
                context_lens=torch.ones(2, dtype=torch.int32),
                block_table=torch.zeros(2, 1, dtype=torch.int32),
                schedule_meta=torch.zeros(5, 2, dtype=torch.int32), max_context_len=64)
    args.update(over)
    return args


@pytest.mark.parametrize("over,exc,match", [
    (dict(q=torch.zeros(2, 1, 32, 64).to(FP8)), ValueError, "head dim must be 128"),
    (dict(q=torch.zeros(2, 1, 32, D, dtype=torch.bfloat16)), TypeError, "float8_e4m3fn"),
    (dict(q=(torch.zeros(2, 1, 32, 64, dtype=torch.uint8), torch.zeros(2, 1, 32))), TypeError,
     "fp4"),
    (dict(kv_cache=torch.zeros(3, 32, 1, 132, dtype=torch.uint8)), ValueError, "block size"),
    (dict(kv_cache=torch.zeros(3, 64, 1, 68, dtype=torch.uint8)), ValueError, "fp4"),
    (dict(kv_cache=torch.zeros(3, 64, 132, dtype=torch.uint8)), ValueError, "4 dims"),
    (dict(weights=torch.ones(2, 16)), ValueError, r"weights must be \[2, 32\]"),
    (dict(context_lens=torch.ones(3, dtype=torch.int32)), ValueError, "context_lens"),
    (dict(context_lens=torch.ones(2, dtype=torch.float32)), TypeError, "context_lens"),
    (dict(block_table=torch.zeros(3, 1, dtype=torch.int32)), ValueError, "block_table"),
    (dict(schedule_meta=torch.zeros(5, 3, dtype=torch.int32)), ValueError, "schedule_meta"),
    (dict(max_context_len=-1), ValueError, "max_context_len"),
    (dict(max_context_len=2 ** 64), ValueError, "max_context_len = 18446744073709551616 is too"),
    (dict(max_context_len=2 ** 62), ValueError, "max_context_len = 4611686018427387904 is too"),
    (dict(indices=torch.zeros(5, dtype=torch.int32)), ValueError, "indices"),
])
def test_paged_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        dg.fp8_paged_mqa_logits(**_paged_args(**over))


def test_mqa_bad_input():
    q8, k8 = torch.zeros(2, 32, D).to(FP8), torch.zeros(4, D).to(FP8)
    ks = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="head dim must be 128"):
        dg.fp8_mqa_logits(torch.zeros(2, 32, 64).to(FP8), (k8[:, :64], torch.ones(4)),
                          torch.ones(2, 32), ks, ks)
    with pytest.raises(TypeError, match="kv must be a pair"):
        dg.fp8_mqa_logits(q8, k8, torch.ones(2, 32), ks, ks)
    with pytest.raises(ValueError, match="scales"):
        dg.fp8_mqa_logits(q8, (k8, torch.ones(3)), torch.ones(2, 32), ks, ks)
    with pytest.raises(ValueError, match="cu_seq_len_k_end"):
        dg.fp8_mqa_logits(q8, (k8, torch.ones(4)), torch.ones(2, 32), ks, ks[:1])


# --- DeepGEMM's own test inputs, unchanged, and its tolerances --------------------------------
def dg_calc_diff(x, y):
    """DeepGEMM's ``calc_diff``: 1 - cosine-like similarity in float64."""
    x, y = x.double(), y.double()
    denominator = (x * x + y * y).sum()
    return 0.0 if denominator == 0 else float(1 - 2 * (x * y).sum() / denominator)


def dg_per_custom_dims_cast_to_fp8(x, dims):
    excluded = tuple(i for i in range(x.dim()) if i not in set(dims))
    sf = x.abs().float().amax(dim=excluded, keepdim=True).clamp(1e-4) / 448.0
    return (x * (1.0 / sf)).to(FP8), sf.squeeze()


def dg_generate_ks_ke(seq_len, seq_len_kv, disable_cp):
    if disable_cp:
        ks = torch.zeros(seq_len, dtype=torch.int)
        return ks, torch.arange(seq_len, dtype=torch.int) + (seq_len_kv - seq_len)
    chunk, cp_size = seq_len // 2, seq_len_kv // seq_len
    cp_id = cp_size // 3
    ks, ke = torch.zeros(seq_len, dtype=torch.int), torch.zeros(seq_len, dtype=torch.int)
    for i in range(chunk):
        ke[i] = cp_id * chunk + i
        ke[i + chunk] = (cp_size * 2 - 1 - cp_id) * chunk + i
    return ks, ke


def dg_ref_mqa(q, kv, weights, ks, ke):
    """DeepGEMM's ``ref_fp8_mqa_logits`` (unchunked: the sizes here are small)."""
    q, k = q.float(), kv.float()
    score = torch.einsum("mhd,nd->hmn", q, k)
    logits = torch.einsum("hmn,hm->mn", score.relu(), weights.transpose(0, 1))
    cols = torch.arange(kv.shape[0])
    mask = (cols[None, :] >= ks[:, None]) & (cols[None, :] < ke[:, None])
    return logits.masked_fill(~mask, float("-inf"))


@pytest.mark.parametrize("H", [64, 128])
@pytest.mark.parametrize("disable_cp", [False, True])
@pytest.mark.parametrize("compressed", [False, True])
def test_deepgemm_mqa_inputs(H, disable_cp, compressed):
    torch.manual_seed(0)
    seq_len, seq_len_kv = 8, 48
    q = torch.randn(seq_len, H, D, dtype=torch.bfloat16)
    kv = torch.randn(seq_len_kv, D, dtype=torch.bfloat16)
    weights = torch.randn(seq_len, H, dtype=torch.float32)
    ks, ke = dg_generate_ks_ke(seq_len, seq_len_kv, disable_cp)
    ref_logits = dg_ref_mqa(q, kv, weights, ks, ke)
    q_in = q.to(FP8)
    kv_in = dg_per_custom_dims_cast_to_fp8(kv, (0,))
    simulated = dg_ref_mqa(q_in.to(torch.bfloat16),
                           (kv_in[0].float() * kv_in[1].unsqueeze(1)).to(torch.bfloat16),
                           weights, ks, ke)
    kwargs = dict(q=q_in, kv=kv_in, weights=weights, cu_seq_len_k_start=ks,
                  cu_seq_len_k_end=ke, clean_logits=not compressed, max_seqlen_k=0)
    if compressed:
        kwargs["max_seqlen_k"] = int((ke - ks).max())
    logits = dg.fp8_mqa_logits(**kwargs)
    if compressed:  # DeepGEMM's post-processing back to absolute columns
        assert logits.shape == (seq_len, kwargs["max_seqlen_k"])
        tmp = torch.full((seq_len, seq_len_kv), float("-inf"))
        for i in range(seq_len):
            tmp[i, ks[i]:ke[i]] = logits[i, :ke[i] - ks[i]]
        logits = tmp
    neginf = ref_logits == float("-inf")
    assert torch.equal(logits == float("-inf"), neginf)
    diff = dg_calc_diff(logits.masked_fill(neginf, 0), ref_logits.masked_fill(neginf, 0))
    sim = dg_calc_diff(logits.masked_fill(neginf, 0), simulated.masked_fill(neginf, 0))
    assert diff < 1e-3, diff  # DeepGEMM's fp8 bound
    assert sim < 5e-6, sim  # DeepGEMM's ref_diff_tol for fp32 logits and weights


def dg_kv_cache_cast_to_fp8(x):
    """DeepGEMM's ``kv_cache_cast_to_fp8``: [P, 64, 1, 128] -> uint8 [P, 64, 1, 132]."""
    num_blocks, block_size, num_heads, head_dim = x.shape
    x_amax = x.abs().float().amax(dim=3, keepdim=True).clamp(1e-4)
    sf = x_amax / 448.0
    x_scaled = (x * (1.0 / sf)).to(FP8)
    x_fp8 = torch.empty((num_blocks, block_size * (head_dim + 4)), dtype=torch.uint8)
    x_fp8[:, :block_size * head_dim] = x_scaled.view(num_blocks, block_size * head_dim) \
        .view(torch.uint8)
    x_fp8[:, block_size * head_dim:] = sf.view(num_blocks, block_size).view(torch.uint8)
    return (x_fp8.view(num_blocks, block_size, num_heads, head_dim + 4),
            (x_scaled.float() * sf).to(x.dtype))


def dg_ref_paged(q, kv_cache, weights, context_lens, block_tables, max_model_len, use_2d):
    """DeepGEMM's ``ref_paged_mqa_logits``."""
    batch_size, next_n, _, dim = q.size()
    _, block_size, _, dim = kv_cache.size()
    logits = torch.full([batch_size * next_n, max_model_len], float("-inf"))
    for i, context_len in enumerate(context_lens.tolist()):
        q_offsets = torch.full((next_n,), context_len, dtype=torch.int32) if use_2d \
            else torch.arange(context_len - next_n, context_len)
        weight_slice = weights[i * next_n:(i + 1) * next_n, :].transpose(0, 1)
        num_blocks = (context_len + block_size - 1) // block_size
        kv_slice = kv_cache[block_tables[i][:num_blocks]]
        kx = kv_slice.permute(2, 3, 0, 1).reshape(kv_slice.size(2), dim, -1)
        s = torch.matmul(q[i].transpose(0, 1).float(), kx.float())
        total_len = num_blocks * block_size
        k_offsets = torch.arange(0, total_len)
        mask = (k_offsets[None, :] < context_len) & (k_offsets[None, :] <= q_offsets[:, None])
        s = torch.where(mask[None], s, float("-inf"))
        s = (torch.relu(s) * weight_slice[..., None]).sum(dim=0)
        logits[i * next_n:(i + 1) * next_n, :total_len] = torch.where(
            k_offsets[None, :] <= q_offsets[:, None], s, float("-inf"))
    return logits


@pytest.mark.parametrize("H", [64, 128])
@pytest.mark.parametrize("next_n", [1, 2])
@pytest.mark.parametrize("use_2d", [True, False])
def test_deepgemm_paged_inputs(H, next_n, use_2d):
    torch.manual_seed(1)
    batch_size, avg_kv, block_kv = 3, 100, 64
    q = torch.randn((batch_size, next_n, H, D), dtype=torch.bfloat16)
    weights = torch.randn((batch_size * next_n, H), dtype=torch.float)
    context_lens = torch.randint(int(0.7 * avg_kv), int(1.3 * avg_kv), (batch_size,),
                                 dtype=torch.int)
    blocks_per_seq = (context_lens + block_kv - 1) // block_kv
    max_model_len = int(blocks_per_seq.max()) * block_kv
    num_total = int(blocks_per_seq.sum())
    kv_cache = torch.randn((num_total, block_kv, 1, D), dtype=torch.bfloat16)
    block_table = torch.zeros((batch_size, int(blocks_per_seq.max())), dtype=torch.int)
    pool = torch.randperm(num_total, dtype=torch.int)
    off = 0
    for i, nb in enumerate(blocks_per_seq.tolist()):
        block_table[i, :nb] = pool[off:off + nb]
        off += nb
    ref_logits = dg_ref_paged(q, kv_cache, weights, context_lens, block_table, max_model_len,
                              use_2d)
    q_in = q.to(FP8)
    kv_in, kv_sim = dg_kv_cache_cast_to_fp8(kv_cache)
    simulated = dg_ref_paged(q_in.to(torch.bfloat16), kv_sim, weights, context_lens,
                             block_table, max_model_len, use_2d)
    positions = torch.arange(max_model_len).unsqueeze(0).expand(batch_size * next_n, -1)
    if use_2d:
        ctx_nextn = ((context_lens.unsqueeze(1) + 1) * torch.rand(batch_size, next_n)).int()
        ctx_nextn[:, -1] = context_lens
        neginf = ~(positions < ctx_nextn.view(-1, 1))
    else:
        ctx_nextn = context_lens
        offsets = torch.arange(batch_size * next_n)
        limits = (context_lens[offsets // next_n] - next_n + offsets % next_n).unsqueeze(1)
        neginf = ~(positions <= limits)
    meta = dg.get_paged_mqa_logits_metadata(ctx_nextn if use_2d else ctx_nextn[:, None],
                                            block_kv, 132)
    logits = dg.fp8_paged_mqa_logits(q=q_in, kv_cache=kv_in, weights=weights,
                                     context_lens=ctx_nextn, block_table=block_table,
                                     schedule_meta=meta, max_context_len=max_model_len,
                                     clean_logits=False)
    assert logits.dtype == torch.float32 and logits.shape == (batch_size * next_n, max_model_len)
    got = logits.masked_fill(neginf, 0)
    diff = dg_calc_diff(got, ref_logits.masked_fill(neginf, 0))
    sim = dg_calc_diff(got, simulated.masked_fill(neginf, 0))
    assert diff < 1e-3, diff
    assert sim < 5e-6, sim
    # and our own, stricter convention: -inf exactly past each row's length when cleaning
    clean = dg.fp8_paged_mqa_logits(q_in, kv_in, weights, ctx_nextn, block_table, meta,
                                    max_model_len, True)
    assert torch.equal(clean == float("-inf"), neginf)


# --- the native API takes engine shapes: [P, 64, 1, 132] pools, page strides, 2-D n_chunks ------
def _native_batch(gen, L=None):
    """Three requests (70, 0, 130 chunks) in a shuffled pool, and prepared fp32 queries."""
    from flashmemory_triton import paged
    from kernel_cases import make_keys
    lead = () if L is None else (L,)
    reqs = [make_keys((*lead, n), gen) for n in (70, 0, 130)]
    batch = paged.pack_pool(reqs, page_ids=[[4, 1], [], [0, 5, 2]], num_pages=6)
    return batch


def _prep(L, rows, gen, backend):
    from flashmemory_triton import ops
    q = torch.randn(L, rows, 16, D, generator=gen)
    w = torch.randn(L, rows, 16, generator=gen) / 16
    return ops.prepare_queries(q, w, torch.arange(rows), precision="fp32", backend=backend)


def _padded_cache(pool: torch.Tensor, stride: int) -> torch.Tensor:
    """The same pages as ``pool [..., P, 8448]`` in an engine-shaped ``[..., P, 64, 1, 132]``
    cache whose pages are ``stride`` bytes apart (padding bytes poisoned with e4m3 NaN)."""
    *lead, P, _ = pool.shape
    buf = torch.full((*lead, P, stride), NAN_BYTE, dtype=torch.uint8)
    buf[..., :C.PAGE_BYTES] = pool
    L = lead[0] if lead else None
    size = (*lead, P, 64, 1, C.CHUNK_BYTES)
    strides = ((P * stride,) if L else ()) + (stride, C.CHUNK_BYTES, C.CHUNK_BYTES, 1)
    return buf.as_strided(size, strides)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["shared", "stacked"])
@pytest.mark.parametrize("stride", [C.PAGE_BYTES, C.PAGE_BYTES + 64, C.PAGE_BYTES + 4])
def test_native_engine_pools(backend, layout, stride):
    """``score_paged`` reads ``[P, 64, 1, 132]`` (``[L, P, 64, 1, 132]``) caches at any page
    stride (16-byte multiples in place, others copied) exactly as the ``[P, 8448]`` pool."""
    from flashmemory_triton import paged
    gen = torch.Generator().manual_seed(stride + len(layout))
    L = 2
    batch = _native_batch(gen, None if layout == "shared" else L)
    prep = _prep(L, 3, gen, backend)
    want = paged.score_paged(prep, batch.pool, batch.page_table, batch.n_chunks,
                             return_logits=True)
    cache = _padded_cache(batch.pool, stride)
    assert cache.shape[-3:] == (64, 1, 132) and cache.stride(-4) == stride
    got = paged.score_paged(prep, cache, batch.page_table, batch.n_chunks, return_logits=True)
    assert torch.equal(got.scores, want.scores) and torch.equal(got.logits, want.logits)
    kb = paged.page_pools(cache)
    assert kb.page_stride == (stride if stride % 16 == 0 else C.PAGE_BYTES)
    if stride % 16 == 0:  # read in place: the kernel's pointer is the cache's own memory
        assert kb.base.data_ptr() == cache.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
def test_native_two_d_n_chunks(backend):
    """``n_chunks [B, next_n]``: ``B * next_n`` query rows, row ``b * next_n + t`` seeing the
    first ``n_chunks[b, t]`` chunks of request ``b``: the same as the table repeated."""
    from flashmemory_triton import paged
    gen = torch.Generator().manual_seed(5)
    batch = _native_batch(gen)
    next_n = 2
    n2 = torch.stack([batch.n_chunks - 3, batch.n_chunks], 1).clamp_min(0)
    prep = _prep(2, 3 * next_n, gen, backend)
    got = paged.score_paged(prep, batch.pool.view(-1, 64, 1, 132), batch.page_table, n2,
                            return_logits=True)
    want = paged.score_paged(prep, batch.pool, batch.page_table.repeat_interleave(2, 0),
                             n2.reshape(-1), return_logits=True)
    assert torch.equal(got.scores, want.scores) and torch.equal(got.logits, want.logits)
    assert got.n_chunks.tolist() == [67, 70, 0, 0, 127, 130]
    rows = paged.pool_to_rows(batch.pool, batch.page_table, n2)  # the converters too
    full = paged.pool_to_rows(batch.pool, batch.page_table, batch.n_chunks)
    assert rows.shape[0] == 6 and torch.equal(rows[1], full[0]) and torch.equal(rows[5], full[2])


def test_native_row_shaped_pool_refused():
    """The rule: ``[P, 64, 132]`` is the row format's shape and is refused (with the hint)."""
    from flashmemory_triton import paged
    batch = _native_batch(torch.Generator().manual_seed(0))
    prep = _prep(1, 3, torch.Generator().manual_seed(1), "torch")
    with pytest.raises(ValueError, match="ROW layout"):
        paged.score_paged(prep, batch.pool.view(-1, 64, 132), batch.page_table, batch.n_chunks)


def test_retriever_engine_shapes():
    """``FlashMemoryRetriever.score_paged`` with per-layer ``[P, 64, 1, 132]`` caches at an
    engine's page stride and 2-D ``n_chunks``: exactly the call on ``[P, 8448]`` pools with the
    table repeated per MTP row, on both backends."""
    from flashmemory_triton import FlashMemoryRetriever
    from kernel_cases import retriever_states
    gen = torch.Generator().manual_seed(11)
    states = retriever_states(gen, 64, 32, 8)
    batch = _native_batch(gen, L=3)
    n2 = torch.stack([batch.n_chunks, (batch.n_chunks - 5).clamp_min(0)], 1)
    h = torch.randn(3, 6, 64, generator=gen)
    pos = torch.arange(6) * 1000
    caches = list(_padded_cache(batch.pool, C.PAGE_BYTES + 16).unbind(0))
    pools = list(batch.pool.unbind(0))
    table2 = batch.page_table.repeat_interleave(2, 0)
    for backend in BACKENDS:
        m = FlashMemoryRetriever(states, backend=backend, precision="fp32")
        got = m.score_paged(h, caches, batch.page_table, n2, pos, return_logits=True)
        want = m.score_paged(h, pools, table2, n2.reshape(-1), pos, return_logits=True)
        assert torch.equal(got.scores, want.scores) and torch.equal(got.logits, want.logits)
        assert got.n_chunks.tolist() == n2.reshape(-1).tolist()


@pytest.mark.gpu
def test_gpu_no_host_sync_and_graph_capture(device):
    """On a GPU: neither entry point synchronizes with the host (torch's sync debug mode
    raises on a sync) and a captured CUDA graph replays the eager logits bitwise."""
    if device.type != "cuda":
        pytest.skip("needs --device cuda")
    q8, cache, w, ctx, table, rows, keys = paged_case(128, 2, True, C.PAGE_BYTES + 64, seed=9)
    q8, cache, w, ctx, table = (t.to(device) for t in (q8, cache, w, ctx, table))
    meta = dg.get_paged_mqa_logits_metadata(ctx, 64, 132)
    gen = torch.Generator().manual_seed(9)
    k8, s = (t.to(device) for t in fp8_keys(150, gen))
    qm, wm = fp8_q(len(KS), 128, D, gen=gen).to(device), torch.randn(len(KS), 128).to(device)
    ks, ke = (torch.tensor(v, dtype=torch.int32, device=device) for v in (KS, KE))

    def run():
        return (dg.fp8_paged_mqa_logits(q8, cache, w, ctx, table, meta, 192, True),
                dg.fp8_mqa_logits(qm, (k8, s), wm, ks, ke))

    eager = run()  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        assert torch.equal(a, b)


def test_rows_split_over_launches(monkeypatch):
    """More query rows than one launch takes (``MAX_ROWS`` cut to 3): later launches index q,
    weights, lengths, table rows (``row // next_n``, a request's MTP rows split between two
    launches) and outputs from their first row, paged and not."""
    from flashmemory_triton.kernels import mqa_logits as KM
    monkeypatch.setattr(KM, "MAX_ROWS", 3)
    q8, cache, w, ctx, table, rows, keys = paged_case(32, 2, True, C.PAGE_BYTES, seed=21)
    meta = dg.get_paged_mqa_logits_metadata(ctx, 64, 2)
    got = dg.fp8_paged_mqa_logits(q8, cache, w, ctx, table, meta, 160, True, backend="triton")
    full, mag = paged_ref(q8, w, keys, 2, 160)
    assert_rows(got, full, mag, torch.arange(160)[None] < rows.clamp(0, 160)[:, None], True, 32)
    gen = torch.Generator().manual_seed(22)
    k8, s = fp8_keys(150, gen)
    qm, wm = fp8_q(len(KS), 32, D, gen=gen), torch.randn(len(KS), 32, generator=gen)
    ks, ke = torch.tensor(KS, dtype=torch.int32), torch.tensor(KE, dtype=torch.int32)
    got = dg.fp8_mqa_logits(qm, (k8, s), wm, ks, ke, backend="triton")
    full, mag = ref_full(qm, k8, s, wm)
    j = torch.arange(150)
    inside = (j[None] >= ks.clamp(0, 150)[:, None]) & (j[None] < ke.clamp(0, 150)[:, None])
    assert_rows(got, full, mag, inside, True, 32)


def test_schedule_any_nondecreasing():
    """The kernel walks the schedule it is given: every non-decreasing schedule covers every
    block once (one share, more shares than blocks, one built for other lengths or for 1-D
    lengths with next_n = 2, all-zero rows: the last share then does everything)."""
    q8, cache, w, ctx, table, rows, keys = paged_case(32, 2, False, C.PAGE_BYTES, seed=31)
    full, mag = paged_ref(q8, w, keys, 2, 192)
    inside = torch.arange(192)[None] < rows.clamp(0, 192)[:, None]
    two_d = ctx[:, None].expand(-1, 2).contiguous()
    schedules = [dg.get_paged_mqa_logits_metadata(two_d, 64, n) for n in (1, 3, 40)] + [
        dg.get_paged_mqa_logits_metadata(ctx, 64, 4),  # rows of the 1-D lengths: B, not 2B
        dg.get_paged_mqa_logits_metadata(torch.full_like(two_d, 500), 64, 4),  # other lengths
        torch.zeros(4, 2, dtype=torch.int32)]
    for meta in schedules:
        got = dg.fp8_paged_mqa_logits(q8, cache, w, ctx, table, meta, 192, True)
        assert_rows(got, full, mag, inside, True, 32)
    with pytest.raises(ValueError, match="schedule_meta"):
        dg.fp8_paged_mqa_logits(q8, cache, w, ctx, table, torch.zeros(1, 2, dtype=torch.int32),
                                192)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_page_ids_outside_the_pool_give_nan(backend):
    """A key whose page id is outside ``[0, P)`` is never read: its logit is NaN on both
    paths (the kernel's policy), never a plausible number; an empty pool (P = 0) included."""
    gen = torch.Generator().manual_seed(41)
    H, width = 32, 128
    q8, w = fp8_q(2, 1, H, D, gen=gen), torch.randn(2, H, generator=gen)
    ctx = torch.tensor([[100], [70]], dtype=torch.int32)
    meta = dg.get_paged_mqa_logits_metadata(ctx, 64, 2)
    for P, table in ((3, [[1, 3], [-1, 0]]), (0, [[0, 0], [0, 1]])):
        cache = torch.zeros(P, 64, 1, 132, dtype=torch.uint8)  # zero keys: logits 0 if read
        tab = torch.tensor(table, dtype=torch.int32)
        got = dg.fp8_paged_mqa_logits(q8, cache, w, ctx, tab, meta, width, True,
                                      backend=backend)
        j = torch.arange(width)[None]
        page_ok = torch.tensor([[1 < P, 3 < P], [False, 0 < P]])
        ok = page_ok.gather(1, (j // 64).expand(2, -1)) & (j < ctx)
        bad = ~ok & (j < ctx)
        assert torch.isnan(got[bad]).all(), f"P={P}: a key of a missing page was not NaN"
        assert (got[ok] == 0).all() and (got[j.expand(2, -1) >= ctx] == float("-inf")).all()


def test_get_num_sms_builds_a_schedule(device):
    """DeepGEMM's ``get_num_sms()`` (engines call it to size the schedule) exists and gives a
    schedule of that many shares: the device's SM count on CUDA, a few shares otherwise."""
    n = dg.get_num_sms()
    assert isinstance(n, int) and n >= 1
    if device.type == "cuda":
        assert n == torch.cuda.get_device_properties(device).multi_processor_count
    ctx = torch.tensor([[70], [130]], dtype=torch.int32, device=device)
    assert dg.get_paged_mqa_logits_metadata(ctx, 64, n).shape == (n + 1, 2)


@pytest.mark.parametrize("budget_rows", [1, 4])
def test_mqa_torch_rows_in_steps(monkeypatch, budget_rows):
    """The torch path scores rows in steps bounded by ``TORCH_SCORE_BYTES`` (here forced to
    1 and 4 rows of ``[H, N]`` scores): every step's rows and ranges land in their own output
    rows, absolute and compressed, as in one step."""
    gen = torch.Generator().manual_seed(51)
    N, M, H = 150, len(KS), 32
    monkeypatch.setattr(dg, "TORCH_SCORE_BYTES", budget_rows * 4 * H * N)
    q8, w = fp8_q(M, H, D, gen=gen), torch.randn(M, H, generator=gen)
    k8, s = fp8_keys(N, gen)
    ks, ke = torch.tensor(KS, dtype=torch.int32), torch.tensor(KE, dtype=torch.int32)
    full, mag = ref_full(q8, k8, s, w)
    lo, hi = ks.clamp(0, N).long(), ke.clamp(0, N).long()
    got = dg.fp8_mqa_logits(q8, (k8, s), w, ks, ke, backend="torch")
    j = torch.arange(N)
    assert_rows(got, full, mag, (j[None] >= lo[:, None]) & (j[None] < hi[:, None]), True, H)
    got = dg.fp8_mqa_logits(q8, (k8, s), w, ks, ke, False, 40, backend="torch")
    j = torch.arange(40)
    src = (lo[:, None] + j[None]).clamp(max=N - 1)
    assert_rows(got, full.gather(1, src), mag.gather(1, src),
                j[None] < (hi - lo).clamp_min(0)[:, None], False, H)
