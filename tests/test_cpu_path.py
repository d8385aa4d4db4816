"""The CPU backend (flashmemory_triton.cpu_path) against the fp32 reference and float64.

The bound is derived, per chunk and layer, not fitted. Both the CPU path and the reference
decode the keys to the same fp32 values ``k = fl(fp8 * s)`` (checked bit for bit below), then
sum the same terms in different orders:

* a length-D fp32 dot product is within ``gamma_D A_h`` of its exact value, where
  ``A_h = sum_d |k_d q_hd|`` and ``gamma_n = n u / (1 - n u)``, ``u = 2**-24``;
* relu is 1-Lipschitz; the head sum ``sum_h w_h relu(x_h)`` (products, then H - 1 adds) is
  within ``gamma_{H+1} sum_h |w_h| A_h`` more;
* so each is within ``(D + H + 1) u W`` (first order) of the exact value with
  ``W = sum_h |w_h| A_h``, and the two differ by at most ``2 (D + H + 1) u W``; the offset add
  rounds once in each, ``u |logit|`` each. Against float64 (exact keys) the key rounding
  ``|k - fp8 s| <= u |fp8 s|`` adds ``u W`` once.

Scores: sigmoid is 1/4-Lipschitz and max/mean over layers do not grow the largest error; the
sigmoid itself and the mean's division round a few fp32 ulps of values <= 1.
"""

from __future__ import annotations

import os

import pytest
import torch

from _helpers import U32, assert_within, dequant_independent, make_layer_states
from flashmemory_triton import FlashMemoryRetriever, cpu_path, ops, paged
from flashmemory_triton import constants as C
from flashmemory_triton import reference as ref
from kernel_cases import logits_f64, make_keys

CPU = torch.device("cpu")
SLACK = 1.01  # gamma_n / (n u) <= 1 + n u < 1.01 for n <= 2**16
SIGMOID_ULPS = 4 * U32


def _weighted_abs(q, w, compressed_k) -> torch.Tensor:
    """``W = sum_h |w_h| sum_d |k_d q_hd|`` per layer and chunk, float64 ``[L, B, N]``, with
    the keys as the reference decodes them (finite chunks; masked ones give NaN/inf, unused)."""
    per_layer = compressed_k.dim() == 4
    out = []
    for layer in range(q.shape[0]):
        ck = compressed_k[layer] if per_layer else compressed_k
        k = ref.dequant_compressed_k(ck, q.shape[-1]).double().abs()
        a = torch.einsum("bnd,bhd->bnh", k, q[layer].double().abs())
        out.append((a * w[layer].double().abs()[:, None, :]).sum(-1))
    return torch.stack(out)


def logit_bound(q, w, compressed_k, expected, *, vs_float64=False) -> torch.Tensor:
    """The module doc's bound on ``|cpu - expected|``, float64 ``[L, B, N]``."""
    D, H = q.shape[-1], q.shape[-2]
    terms = D + H + 2 if vs_float64 else 2 * (D + H + 1)
    bound = SLACK * terms * U32 * _weighted_abs(q, w, compressed_k)
    return bound + 2 * U32 * expected.double().abs().nan_to_num(0.0, 0.0, 0.0) + 1e-300


def score_bound(logit_b: torch.Tensor) -> torch.Tensor:
    return logit_b.amax(0) / 4 + SIGMOID_ULPS


def _inputs(L, B, H, n, layout, seed=0, D=C.HEAD_DIM):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(L, B, H, D, generator=g)
    w = torch.randn(L, B, H, generator=g) / 8
    keys = make_keys((L, B, n) if layout == "per_layer" else (B, n), g)  # +, -, 0 scales
    return q, w, keys


def _check_against_reference(q, w, keys, *, ensemble="max", logit_offset=0.0, block=64,
                             vs_float64=True):
    scores, logits = cpu_path.score_prepared_cpu(q, w, keys, ensemble=ensemble,
                                                 logit_offset=logit_offset,
                                                 return_logits=True, block_chunks=block)
    ref_scores, ref_logits = ops._score_torch(q, w, keys, ensemble, logit_offset, True)
    bound = logit_bound(q, w, keys, ref_logits)
    assert_within(logits, ref_logits, bound, "logits vs reference")
    assert_within(scores, ref_scores, score_bound(bound), "scores vs reference")
    if vs_float64:  # (float64 does not overflow where fp32 does)
        exact = logits_f64(q, w, keys, logit_offset)
        assert_within(logits, exact, logit_bound(q, w, keys, exact, vs_float64=True),
                      "logits vs float64")
    # Scores alone (no logits kept) are the same numbers.
    alone, none = cpu_path.score_prepared_cpu(q, w, keys, ensemble=ensemble,
                                              logit_offset=logit_offset, block_chunks=block)
    assert none is None
    assert torch.equal(alone.isnan(), scores.isnan())
    assert torch.equal(alone.nan_to_num(), scores.nan_to_num())
    return logits


# --- the scorer -------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["shared", "per_layer"])
@pytest.mark.parametrize("ensemble", ["max", "mean"])
@pytest.mark.parametrize("n", [0, 1, 63, 64, 200])  # block 64: none, one, partial, exact, 3+
def test_matches_reference(layout, ensemble, n):
    q, w, keys = _inputs(3, 2, 4, n, layout, seed=n)
    _check_against_reference(q, w, keys, ensemble=ensemble, logit_offset=-0.75)


@pytest.mark.parametrize("layout", ["shared", "per_layer"])
def test_release_heads_default_block(layout):
    """H = 128 (the release), the default block size, N not a multiple of it."""
    q, w, keys = _inputs(3, 1, 128, cpu_path.DEFAULT_BLOCK_CHUNKS + 37, layout, seed=5)
    _check_against_reference(q, w, keys, block=cpu_path.DEFAULT_BLOCK_CHUNKS)


def test_empty_batch_and_single_layer():
    for L, B, n in ((3, 0, 10), (1, 2, 5), (2, 3, 0)):
        q, w, keys = _inputs(L, B, 4, n, "shared")
        scores, logits = cpu_path.score_prepared_cpu(q, w, keys, return_logits=True)
        assert scores.shape == (B, n) and logits.shape == (L, B, n)
        if L * B * n:
            _check_against_reference(q, w, keys)


def test_nonfinite_policy_same_as_reference():
    """NaN bytes (0x7F, 0xFF), NaN/inf/overflowing scales, zero and negative scales, a huge q
    that overflows the logit: NaN exactly where the reference has it, finite elsewhere."""
    q, w, keys = _inputs(3, 2, 4, 150, "shared", seed=3)
    keys[0, 3, 7] = 0x7F
    keys[1, 70, 0] = 0xFF
    bad_scales = {10: float("nan"), 11: float("inf"), 12: float("-inf"),
                  13: C.MAX_KEY_SCALE * 1.5, 14: -C.MAX_KEY_SCALE, 15: 0.0, 16: -0.0,
                  17: C.MAX_KEY_SCALE / 2}
    for n, s in bad_scales.items():
        keys[0, n, C.HEAD_DIM:] = torch.tensor([s], dtype=torch.float32).view(torch.uint8)
    logits = _check_against_reference(q, w, keys)
    assert logits[:, 0, [3, 10, 11, 12, 13]].isnan().all()
    assert logits[:, 1, 70].isnan().all()
    assert not logits[:, 0, [14, 15, 16]].isnan().any()
    # Overflow to a clean +inf (not NaN): layer 1, row 0, chunk 20 has every key 1.0 and every
    # q 1e38, all head weights positive; the logit must still come out NaN.
    q_big, w_pos = q.clone(), w.clone()
    q_big[1, 0] = 1e38
    w_pos[1, 0] = w[1, 0].abs() + 0.01
    keys[0, 20, :C.HEAD_DIM] = 0x38  # e4m3 1.0
    keys[0, 20, C.HEAD_DIM:] = torch.tensor([1.0], dtype=torch.float32).view(torch.uint8)
    raw = ops._score_torch(q_big, w_pos, keys, "max", 0.0, True)[1]
    assert raw[1, 0, 20].isnan() and raw[0, 0, 20].isfinite()  # the reference pins it
    big = _check_against_reference(q_big, w_pos, keys, vs_float64=False)
    assert big[1, 0, 20].isnan()


def test_decode_is_the_reference_dequantization_bit_for_bit():
    """Every e4m3 byte (normals, subnormals, zeros, both NaNs) in every column, times scales
    of every kind (negative, zero, subnormal, huge, the largest allowed, NaN, inf, too big)."""
    scales = torch.tensor([1.0, -0.37, 0.0, -0.0, 3.0e-39, 1e-30, 2.0 ** 100, C.MAX_KEY_SCALE,
                           -C.MAX_KEY_SCALE, float("nan"), float("inf"), C.MAX_KEY_SCALE * 2])
    fp8 = torch.stack([torch.roll(torch.arange(256, dtype=torch.uint8), r)[:C.HEAD_DIM]
                       for r in range(256)])  # byte v in column c for some row, for all v, c
    # Any 128 cyclically consecutive bytes hold 0x7F or 0xFF: keep NaN bytes in a third of
    # the rows only, so the finite decode is checked too.
    finite_rows = torch.arange(256) % 3 != 0
    fp8[finite_rows] = torch.where((fp8[finite_rows] & 0x7F) == 0x7F, fp8[finite_rows] - 1,
                                   fp8[finite_rows])
    fp8 = fp8.repeat(len(scales), 1)
    scale_col = scales.repeat_interleave(256).view(-1, 1)
    rows = torch.cat([fp8, scale_col.view(torch.uint8)], dim=1)
    keys, bad = cpu_path.decode_keys(rows)
    assert torch.equal(bad, ref.nonfinite_chunks(rows))
    assert bad.any() and (~bad).any()
    ok = ~bad
    want = ref.dequant_compressed_k(rows)
    assert torch.equal(keys[ok].view(torch.int32), want[ok].view(torch.int32))  # bits, -0 too
    exact = dequant_independent(rows)  # float64 from the bit layout, no torch fp8
    assert torch.equal(keys[ok], exact[ok].float())  # one fp32 rounding of fp8 * scale


def test_odd_offset_and_strided_keys():
    """Keys that are a view at an odd byte offset (scales not 4-byte aligned) decode the same."""
    q, w, keys = _inputs(3, 2, 4, 90, "shared", seed=9)
    buf = torch.empty(keys.numel() + 1, dtype=torch.uint8)
    buf[1:] = keys.flatten()
    odd = buf[1:].view(keys.shape)
    a = cpu_path.score_prepared_cpu(q, w, odd, return_logits=True)[1]
    b = cpu_path.score_prepared_cpu(q, w, keys, return_logits=True)[1]
    assert torch.equal(a.nan_to_num(), b.nan_to_num())


def test_thread_count_does_not_matter():
    """One thread (blocks run in order on the caller) and the serial workers (each block on one
    worker at one intra-op thread) run the same ops on the same blocks: the same bits."""
    q, w, keys = _inputs(3, 2, 4, 300, "shared", seed=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_path.score_prepared_cpu(q, w, keys, return_logits=True, block_chunks=64)
        torch.set_num_threads(3)
        many = cpu_path.score_prepared_cpu(q, w, keys, return_logits=True, block_chunks=64)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(many[1], one[1]) and torch.equal(many[0], one[0])


@pytest.mark.parametrize("bad, match", [
    (lambda q, w, k: (q, w[:, :1], k), "w must be"),
    (lambda q, w, k: (q, w, k[..., :131]), "last dim must be 132"),
    (lambda q, w, k: (q, w, k.float()), "uint8"),
    (lambda q, w, k: (q, w, k[:1]), "batch must be 2"),
    (lambda q, w, k: (q, w, torch.stack([k, k])), "per-layer compressed_k must be"),
])
def test_bad_input_is_named(bad, match):
    q, w, keys = _inputs(3, 2, 4, 8, "shared")
    with pytest.raises((ValueError, TypeError), match=match):
        cpu_path.score_prepared_cpu(*bad(q, w, keys))
    with pytest.raises(ValueError, match="block_chunks"):
        cpu_path.score_prepared_cpu(q, w, keys, block_chunks=0)
    with pytest.raises(ValueError, match="ensemble"):
        cpu_path.score_prepared_cpu(q, w, keys, ensemble="sum")


# --- dispatch: every CPU entry point goes through the CPU path ----------------------------------
@pytest.fixture
def no_interpreter(monkeypatch):
    """What a CPU user has: no TRITON_INTERPRET, so 'auto' picks the CPU path."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" not in os.environ


@pytest.fixture
def count_cpu_calls(monkeypatch):
    calls = []
    real = cpu_path.score_prepared_cpu

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(cpu_path, "score_prepared_cpu", counting)

    def forbidden(*args, **kwargs):
        raise AssertionError("the reference scorer ran on the CPU backend")
    monkeypatch.setattr(ref, "keys_logits", forbidden)
    return calls


def _model_inputs(per_layer: bool, n: int = 150, B: int = 2, hidden: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, B, hidden, generator=g) if per_layer else torch.randn(B, hidden, generator=g)
    keys = make_keys((3, B, n) if per_layer else (B, n), g)
    return h, keys, torch.tensor([5, 70000][:B])


def test_auto_on_cpu_is_the_cpu_path(no_interpreter):
    model = FlashMemoryRetriever(make_layer_states(), backend="auto")
    assert model.resolved_backend() == "cpu"
    assert FlashMemoryRetriever(make_layer_states(), backend="torch").resolved_backend() == "torch"
    assert ops.resolve_backend("auto", CPU) == "cpu"
    assert ops.resolve_backend("torch", CPU) == "torch"
    meta = torch.device("meta")
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
        ops.resolve_backend("cpu", meta)
    with pytest.raises(ValueError, match="backend='cpu' needs the retriever on a CPU device"):
        FlashMemoryRetriever(make_layer_states(), device=meta, backend="cpu").resolved_backend()


@pytest.mark.parametrize("per_layer", [False, True])
def test_every_retriever_call_goes_through_it(per_layer, no_interpreter, count_cpu_calls):
    model = FlashMemoryRetriever(make_layer_states(), backend="auto")
    h, keys, pos = _model_inputs(per_layer)
    calls = {
        "logits": lambda: model.logits(h, keys, pos),
        "forward": lambda: model(h, keys, pos),
        "score_layer": lambda: model.score_layer("l12", h, keys, pos),
        "ensemble": lambda: model.ensemble(h, keys, pos, "mean"),
        "select_topk": lambda: model.select_topk(h, keys, pos, threshold=0.5),
    }
    if not per_layer:
        vb = paged.pack_varlen([keys[0, :100], keys[1]])
        pool = paged.pack_pool([keys[0, :100], keys[1]])
        calls["score_varlen"] = lambda: model.score_varlen(h, vb.keys, vb.cu_chunks, pos)
        calls["score_paged"] = lambda: model.score_paged(h, pool.pool, pool.page_table,
                                                         pool.n_chunks, pos)
    for name, call in calls.items():
        before = len(count_cpu_calls)
        call()
        assert len(count_cpu_calls) == before + 1, f"{name} did not use the CPU path"
    assert count_cpu_calls[2][0] == 1  # score_layer scores its layer only


@pytest.mark.parametrize("per_layer", [False, True])
def test_retriever_matches_reference(per_layer, no_interpreter):
    states = make_layer_states(n_heads=8)
    model = FlashMemoryRetriever(states, backend="auto", logit_offset=0.25)
    oracle = FlashMemoryRetriever(states, backend="torch", logit_offset=0.25)
    h, keys, pos = _model_inputs(per_layer, seed=1)
    keys[..., 0, 3] = 0x7F  # a NaN chunk in every batch row
    q, w = model._reference_queries(h, pos, per_layer, range(3))
    ref_logits = oracle.logits(h, keys, pos)
    bound = logit_bound(q, w, keys, ref_logits)
    assert_within(model.logits(h, keys, pos), ref_logits, bound, "logits")
    fwd = model(h, keys, pos)
    for i, (name, scores) in enumerate(fwd.items()):
        assert_within(scores, torch.sigmoid(ref_logits[i]), bound[i] / 4 + SIGMOID_ULPS, name)
        layer = model.score_layer(name, h, keys, pos, apply_sigmoid=False)
        assert_within(layer, ref_logits[i], bound[i], f"score_layer {name}")
    for mode in ("max", "mean"):
        assert_within(model.ensemble(h, keys, pos, mode), oracle.ensemble(h, keys, pos, mode),
                      score_bound(bound), f"ensemble {mode}")
    if not per_layer:
        vb = paged.pack_varlen([keys[0, :100], keys[1]])
        got = model.score_varlen(h, vb.keys, vb.cu_chunks, pos, return_logits=True)
        want = oracle.score_varlen(h, vb.keys, vb.cu_chunks, pos, return_logits=True)
        assert torch.equal(got.n_chunks, want.n_chunks)
        real = torch.arange(150)[None] < want.n_chunks[:, None]
        assert torch.equal(got.logits.isinf(), want.logits.isinf())
        assert_within(got.logits[:, real], want.logits[:, real], bound[:, real], "varlen")
        pool = paged.pack_pool([keys[0, :100], keys[1]])
        got = model.score_paged(h, pool.pool, pool.page_table, pool.n_chunks, pos)
        want = oracle.score_paged(h, pool.pool, pool.page_table, pool.n_chunks, pos)
        assert_within(got.scores[:, :150], want.scores[:, :150], score_bound(bound), "paged")


def test_functional_ops_go_through_it(no_interpreter, count_cpu_calls):
    q_proj, w, keys = _inputs(3, 2, 4, 70, "shared", seed=2)
    pos = torch.tensor([3, 400])
    scores, logits = ops.score_chunks(q_proj, w, pos, keys, return_logits=True)
    assert len(count_cpu_calls) == 1
    prepared = ops.prepare_queries(q_proj, w, pos)
    assert prepared.backend == "cpu"
    pool = paged.pack_pool([keys[0], keys[1, :40]])
    out = paged.score_paged(prepared, pool.pool, pool.page_table, pool.n_chunks)
    vb = paged.pack_varlen([keys[0], keys[1, :40]])
    out_v = paged.score_varlen(prepared, vb.keys, vb.cu_chunks)
    assert len(count_cpu_calls) == 3
    assert torch.equal(out.scores[0, :70], scores[0]) and torch.equal(out_v.scores[0], scores[0])


def test_functional_ops_match_reference(no_interpreter):
    q_proj, w, keys = _inputs(3, 2, 4, 70, "per_layer", seed=6)
    pos = torch.tensor([3, 400])
    for ensemble in ("max", "mean"):
        got = ops.score_chunks(q_proj, w, pos, keys, ensemble=ensemble, return_logits=True,
                               logit_offset=1.5)
        want = ops.score_chunks(q_proj, w, pos, keys, ensemble=ensemble, return_logits=True,
                                logit_offset=1.5, backend="torch")
        q = ops.prepare_queries(q_proj, w, pos, backend="torch").q
        bound = logit_bound(q, w, keys, want[1])
        assert_within(got[1], want[1], bound, "logits")
        assert_within(got[0], want[0], score_bound(bound), "scores")


# --- bf16-stored weights ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 3])
def test_low_precision_weights_query_side_is_the_reference_bit_for_bit(dtype, batch):
    """Weights upcast 256 rows at a time give the reference's fp32 projections exactly (an
    off-by-one bf16 rounding of q downstream would otherwise break the logit bound)."""
    states = make_layer_states(hidden=300, rank=600, n_heads=5, dtype=dtype)  # 640 q rows
    weights = states["l10"]
    g = torch.Generator().manual_seed(batch)
    hidden = torch.randn(batch, 300, generator=g)
    pos = torch.arange(batch) * 1000
    q, w = cpu_path.query_side(hidden, weights, pos, C.MAX_POSITION_RELEASE)
    q_ref, w_ref = ref.query_side(hidden, weights, pos, C.MAX_POSITION_RELEASE)
    assert torch.equal(q, q_ref) and torch.equal(w, w_ref)


def test_bf16_retriever_matches_reference(no_interpreter):
    states = make_layer_states(hidden=300, rank=600, n_heads=4, dtype=torch.bfloat16)
    model = FlashMemoryRetriever(states, dtype=torch.bfloat16)
    oracle = FlashMemoryRetriever(states, dtype=torch.bfloat16, backend="torch")
    assert model.resolved_backend() == "cpu"
    g = torch.Generator().manual_seed(8)
    h = torch.randn(2, 300, generator=g)
    keys = make_keys((2, 90), g)
    pos = torch.tensor([7, 900])
    q, w = model._reference_queries(h, pos, False, range(3))
    want = oracle.logits(h, keys, pos)
    assert_within(model.logits(h, keys, pos), want, logit_bound(q, w, keys, want), "bf16 logits")


# --- bench: the CPU comparison (tiny sizes; speed is never asserted) ---------------------------
def test_bench_cpu_comparison_runs(tmp_path, no_interpreter):
    import json

    from flashmemory_triton.bench import cpu as bench_cpu
    out = tmp_path / "cpu.json"
    rc = bench_cpu.main(["--n", "64,130", "--batch", "1,2", "--repeats", "1", "--hidden", "64",
                         "--rank", "32", "--heads", "4", "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["environment"]["resolved_backend"] == "cpu"
    rows = doc["rows"]
    assert [(r["n"], r["batch"]) for r in rows] == [(64, 1), (64, 2), (130, 1), (130, 2)]
    for r in rows:
        assert r["status"] == "ok" and r["logit_rel_err"] <= bench_cpu.REL_ERR_BAR
        assert r["release_ms"] > 0 and r["ours_ms"] > 0 and r["speedup"] > 0
        assert r["floor_gemm_ms"] > 0 and r["floor_read_ms"] > 0
    model = bench_cpu.build_model(64, 32, 4, torch.float32)
    skipped = bench_cpu.run_row(model, 64, 1, 1, memory_budget=0)
    assert skipped.release_ms is None and skipped.status.startswith("release skipped")


def test_release_module_is_the_reference_without_the_policy():
    """The bench's release algorithm computes what the reference backend does on clean keys."""
    from flashmemory_triton.bench import cpu as bench_cpu
    states = make_layer_states()
    model = FlashMemoryRetriever(states, backend="torch")
    h, keys, pos = _model_inputs(False, seed=3)
    keys = make_keys((2, 150), torch.Generator().manual_seed(3), special_scales=False)
    assert torch.equal(bench_cpu.release_module_logits(model, h, keys, pos),
                       model.logits(h, keys, pos))


def test_cpu_ceilings_are_measured():
    from flashmemory_triton.bench import roofline
    c = roofline.measure_ceilings(CPU, lambda fn: 1.0)
    assert c.matmul_tflops["fp32"] > 0 and c.matmul_tflops["bf16"] > 0 and c.copy_gbps > 0
    assert "best of" in c.notes[0]


def test_bench_sweep_times_the_cpu_path_on_cpu_only():
    from flashmemory_triton.bench import cli, providers, runner, sweeps
    from flashmemory_triton.bench.inputs import ModelDims
    sweep = sweeps.Sweep(n=(128,), batch=(2,), layout=("shared", "per_layer"), precision=("bf16",),
                         ensemble=("mean",))
    chosen = [providers.PROVIDERS[n] for n in ("reference", "cpu", "cycle_cpu")]
    options = runner.Options(device=CPU, dims=ModelDims(hidden=128, rank=64, heads=4),
                             min_samples=2, progress=False)
    rows = runner.run_sweep(sweep, chosen, options).rows
    cpu_rows = [r for r in rows if r["provider"] in ("cpu", "cycle_cpu")]
    assert len(cpu_rows) == 4 and all(r["status"] == "ok" for r in cpu_rows)
    assert all(r["logit_rel_rms"] < 1e-6 for r in cpu_rows if r["provider"] == "cpu")
    gpu = runner.Options(device=torch.device("cuda"), progress=False)
    assert runner._static_skip(None, providers.PROVIDERS["cpu"], gpu, True, "", set()) \
        .startswith("skipped: the CPU path")
    names = [p.name for p in cli.default_providers(torch.device("cuda"), gpu)]
    assert "cpu" not in names and "cycle_cpu" not in names
