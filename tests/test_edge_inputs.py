"""Inputs an adversarial user tried (issue 14) that once gave a silent wrong answer, lost state
or failed late: each test here failed on the code before its fix.

Equalities are exact (``torch.equal``): both sides run the same fp32 code on the same values,
so any difference is a bug, not rounding.
"""

from __future__ import annotations

import re

import pytest
import torch

from _helpers import make_layer_states
from flashmemory_triton import FlashMemoryRetriever, ops, select_resident, topk_mask
from flashmemory_triton import constants as C
from flashmemory_triton import reference as ref
from flashmemory_triton.torch_fast import score_chunks_fast, score_prepared_fast
from kernel_cases import make_keys
from test_retriever_api import HIDDEN, RANK, inputs

BACKENDS = ["torch", "triton", "cpu"]  # cpu: the CPU path (CPU devices only)
FAR = [200, 400000]  # positions where a bf16 RoPE table is off by whole radians


@pytest.fixture(autouse=True)
def _cpu_backend_on_cpu_only(request, device):
    spec = getattr(request.node, "callspec", None)
    if spec is not None and spec.params.get("backend") == "cpu" and device.type != "cpu":
        pytest.skip("backend='cpu' (the CPU path) takes CPU tensors only")


def _model(device, backend, **kw):
    states = make_layer_states(hidden=HIDDEN, rank=RANK, n_heads=4)
    return FlashMemoryRetriever(states, device=device, backend=backend,
                                max_position=C.MAX_POSITION_RELEASE, **kw)


def _far_inputs(device, B=2, N=12):
    hidden, ck, _ = inputs(device, B, N)
    return hidden, ck, torch.tensor(FAR[:B], device=device)


# --- module dtype casts keep the RoPE frequencies in float32 --------------------------------------
@pytest.mark.parametrize("cast,dtype", [
    (lambda m: m.to(torch.bfloat16), torch.bfloat16), (lambda m: m.bfloat16(), torch.bfloat16),
    (lambda m: m.half(), torch.float16), (lambda m: m.to(dtype=torch.float16), torch.float16)],
    ids=["to-bf16", "bfloat16", "half", "to-fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dtype_cast_equals_constructing_with_that_dtype(cast, dtype, backend, device):
    hidden, ck, pos = _far_inputs(device)
    built = _model(device, backend, dtype=dtype)
    cast_model = cast(_model(device, backend))
    assert cast_model.dtype == dtype and cast_model.rope_freqs.dtype == torch.float32
    assert torch.equal(cast_model.rope_freqs, built.rope_freqs)
    assert torch.equal(cast_model.logits(hidden, ck, pos), built.logits(hidden, ck, pos))
    back = cast_model.float()  # and back: fp32 weights (rounded), fp32 frequencies
    assert back.dtype == torch.float32 and back.rope_freqs.dtype == torch.float32


def test_cast_to_an_unsupported_dtype_is_refused_and_changes_nothing(device):
    model = _model(device, "torch")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="float64"):
        model.double()
    with pytest.raises(TypeError, match="float64"):
        model.to(torch.float64)
    assert model.dtype == torch.float32 and model.rope_freqs.dtype == torch.float32
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k


# --- strided hidden on the torch backend ---------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_column_major_hidden_gives_the_contiguous_answer(backend, device):
    model = _model(device, backend)
    for B in (1, 2, 5):
        hidden, ck, _ = inputs(device, B, 9, seed=B)
        pos = torch.arange(B, device=device) * 1000
        want = model.logits(hidden, ck, pos)
        got = model.logits(hidden.t().contiguous().t(), ck, pos)
        assert torch.equal(got, want), (backend, B)
        per_layer = torch.stack([hidden] * 3).transpose(1, 2).contiguous().transpose(1, 2)
        assert torch.equal(model.logits(per_layer, ck, pos), want), (backend, B, "per-layer")


# --- overflowing scales and logits ---------------------------------------------------------------
def _with_scale(keys, b, n, scale):
    keys = keys.clone()
    keys[b, n, C.HEAD_DIM:] = torch.tensor([scale], dtype=torch.float32).view(torch.uint8)
    return keys


def _max_scale_key(keys, b, n, scale):
    """Chunk ``(b, n)``: every e4m3 byte 448 (0x7E) with ``scale``: dequantizes to 448 * s."""
    keys = _with_scale(keys, b, n, scale)
    keys[b, n, :C.HEAD_DIM] = 0x7E
    return keys


def test_max_key_scale_is_the_float32_overflow_edge():
    s = torch.tensor([C.MAX_KEY_SCALE], dtype=torch.float32)
    assert float(s) == C.MAX_KEY_SCALE  # exactly a float32
    assert torch.isfinite(s * C.FP8_E4M3_MAX).all()
    up = torch.nextafter(s, torch.tensor([float("inf")]))
    assert torch.isinf(up * C.FP8_E4M3_MAX).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflowing_scale_is_nan_everywhere_and_never_selected(backend, device):
    model = _model(device, backend)
    hidden, ck, pos = _far_inputs(device)
    edge = torch.nextafter(torch.tensor(C.MAX_KEY_SCALE), torch.tensor(float("inf"))).item()
    for scale in (3e38, -3e38, edge, -edge):
        bad = _max_scale_key(ck, 0, 3, scale)
        logits = model.logits(hidden, bad, pos)
        assert bool(torch.isnan(logits[:, 0, 3]).all()), (backend, scale)
        assert not bool(torch.isnan(logits[:, 0, :3]).any()), (backend, scale)
        for k in (1, 11):
            assert not bool(model.select_topk(hidden, bad, pos, top_k=k)[0, 3]), (backend, k)
        assert not bool(model.select_topk(hidden, bad, pos, threshold=-1.0)[0, 3])
        scores = model.ensemble(hidden, bad, pos)
        for mode in ("chunk", "page", "topk"):
            kw = dict(top_k=1) if mode == "topk" else dict(threshold=0.0, recent=0,
                                                           max_pages=1, page_size=1)
            assert not bool(select_resident(scores, mode=mode, **kw).mask[0, 3]), mode


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_on_scale_overflow_policy(device, backend):
    """The largest accepted scale is scored (finite); the next float32 up is a NaN chunk."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 1, 4, C.HEAD_DIM, generator=g).to(device) * 1e-30
    w = (torch.randn(3, 1, 4, generator=g) / 64).to(device)
    pos = torch.tensor([7], device=device)
    keys = make_keys((1, 6), g).to(device)
    keys = _max_scale_key(keys, 0, 1, C.MAX_KEY_SCALE)
    keys = _max_scale_key(keys, 0, 2, -C.MAX_KEY_SCALE)
    edge = torch.nextafter(torch.tensor(C.MAX_KEY_SCALE), torch.tensor(float("inf"))).item()
    keys = _max_scale_key(keys, 0, 4, edge)
    prep = ops.prepare_queries(q, w, pos, backend=backend, precision="fp32")
    _, logits = ops.score_prepared(prep, keys, return_logits=True)
    nan = torch.isnan(logits[:, 0]).cpu()
    assert nan[:, 4].all() and not nan[:, [0, 1, 2, 3, 5]].any(), (backend, logits)


@pytest.mark.parametrize("backend", BACKENDS + ["fast"])
def test_overflowed_logits_are_nan_in_every_backend(backend, device):
    """Finite keys, a q so large the head-weighted sum overflows: NaN, never +-inf."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 1, 4, C.HEAD_DIM, generator=g).to(device)
    w = torch.ones(2, 1, 4, device=device)
    keys = make_keys((1, 5), g, special_scales=False).to(device)
    keys = _max_scale_key(keys, 0, 2, C.MAX_KEY_SCALE / 2)  # key values near float32's max
    pos = torch.tensor([3], device=device)
    if backend == "fast":
        prep = ops.prepare_queries(q, w, pos, backend="torch", precision="fp32")
        _, logits = score_prepared_fast(prep.q, prep.w, keys, precision="fp32",
                                        return_logits=True)
    else:
        prep = ops.prepare_queries(q, w, pos, backend=backend, precision="fp32")
        _, logits = ops.score_prepared(prep, keys, return_logits=True)
    logits = logits[:, 0].cpu()
    assert not bool(torch.isinf(logits).any()), (backend, logits)
    assert bool(torch.isnan(logits[:, 2]).all()), (backend, logits)
    assert bool(torch.isfinite(logits[:, [0, 1, 3, 4]]).all()), (backend, logits)
    assert not bool(topk_mask(torch.sigmoid(logits.max(0).values)[None], 1)[0, 2])


# --- max_position and positions of every integer dtype -------------------------------------------
def test_max_position_bool_is_refused(device):
    states = make_layer_states(hidden=HIDDEN, rank=RANK, n_heads=4)
    for bad in (True, False, 0, -1, 4096.0):
        with pytest.raises(ValueError, match="max_position"):
            FlashMemoryRetriever(states, device=device, max_position=bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_max_position_clamps_nothing(backend, device):
    hidden, ck, pos = _far_inputs(device)
    want = _model(device, backend, ).logits(hidden, ck, pos)  # positions < the release table
    states = make_layer_states(hidden=HIDDEN, rank=RANK, n_heads=4)
    for huge in (2 ** 62, 2 ** 63, 2 ** 64, 10 ** 30):
        model = FlashMemoryRetriever(states, device=device, backend=backend, max_position=huge)
        assert torch.equal(model.logits(hidden, ck, pos), want), huge
        q = torch.randn(1, 2, 4, C.HEAD_DIM).to(device)
        w = torch.randn(1, 2, 4).to(device)
        a = ops.prepare_queries(q, w, pos, max_position=huge, backend=backend)
        b = ops.prepare_queries(q, w, pos, max_position=2 ** 40, backend=backend)
        assert torch.equal(a.q, b.q)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_positions_of_every_integer_dtype(dtype, backend, device):
    model = _model(device, backend)
    hidden, ck, _ = inputs(device, 3, 7)
    pos = torch.tensor([0, 5, 100], device=device)
    want = model.logits(hidden, ck, pos)
    assert torch.equal(model.logits(hidden, ck, pos.to(dtype)), want), dtype
    small = FlashMemoryRetriever(make_layer_states(hidden=HIDDEN, rank=RANK, n_heads=4),
                                 device=device, backend=backend, max_position=50)
    clamped = small.logits(hidden, ck, torch.tensor([0, 5, 49], device=device))
    assert torch.equal(small.logits(hidden, ck, pos.to(dtype)), clamped), dtype


def test_huge_selection_counts_act_as_every_chunk():
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(2, 20, generator=g)
    n = torch.tensor([20, 7])
    big = 2 ** 63 - 1
    for mode, kw, same in (
            ("chunk", dict(recent=big), dict(recent=20)),
            ("chunk", dict(sink=big, recent=0), dict(sink=20, recent=0)),
            ("chunk", dict(max_resident=big, recent=0), dict(max_resident=20, recent=0)),
            ("page", dict(page_size=big, recent=0), dict(page_size=20, recent=0)),
            ("topk", dict(top_k=big), dict(top_k=20)),
            ("chunk", dict(threshold=2 ** 2000), dict(threshold=float("inf")))):
        a = select_resident(scores, mode=mode, n_chunks=n, **kw)
        b = select_resident(scores, mode=mode, n_chunks=n, **same)
        assert torch.equal(a.mask, b.mask), (mode, kw)
        if mode == "page":
            assert torch.equal(a.pages, b.pages) and a.page_size == big
    for name in ("recent", "sink", "max_pages", "page_size"):
        with pytest.raises(ValueError, match=f"{name} must be .* below 2\\*\\*63"):
            select_resident(scores, mode="page", **{name: 2 ** 64})
    with pytest.raises(ValueError, match="top_k must be"):
        select_resident(scores, mode="topk", top_k=2 ** 64)


def _odd_offset(keys):
    buf = torch.zeros(keys.numel() + 1, dtype=torch.uint8, device=keys.device)
    odd = buf[1:].view(keys.shape)
    odd.copy_(keys)
    return odd


@pytest.mark.parametrize("shape", [(1, 1), (2, 6)])
def test_odd_offset_keys_on_torch_backend_and_torch_fast(shape, device):
    g = torch.Generator().manual_seed(5)
    keys = make_keys(shape, g).to(device)
    odd = _odd_offset(keys)
    assert odd.storage_offset() % 4 and torch.equal(odd, keys)
    q = torch.randn(3, shape[0], 4, C.HEAD_DIM, generator=g).to(device)
    w = torch.randn(3, shape[0], 4, generator=g).to(device)
    pos = torch.arange(shape[0], device=device)
    want = score_chunks_fast(q, w, pos, keys, return_logits=True)
    got = score_chunks_fast(q, w, pos, odd, return_logits=True)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert torch.equal(ref.nonfinite_chunks(odd), ref.nonfinite_chunks(keys))
    model = _model(device, "torch")
    hidden = torch.randn(shape[0], HIDDEN, generator=g).to(device)
    assert torch.equal(model.logits(hidden, odd, pos), model.logits(hidden, keys, pos))


def test_decode_with_zero_page_budget_and_offload_runs_cleanly(monkeypatch, capsys):
    """``--max-pages 0 --offload``: a zero-cell reserve and empty resident sets, exit 0."""
    from flashmemory_triton import cli
    monkeypatch.setattr(cli, "SUBCOMMANDS", {"decode": cli.SUBCOMMANDS["decode"]})
    rc = cli.main(["decode", "--offload", "--max-pages", "0", "--n-chunks", "100", "--steps",
                   "8", "--interval", "4", "--page-size", "16", "--recent", "16"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Traceback" not in err and "summary: 8 tokens" in out


# --- the hub, offline: fail (or use the cache) fast -----------------------------------------------
@pytest.fixture
def unreachable_hub(monkeypatch):
    """Offline mode OFF (the hub client would retry for ~25 s), every connection refused at once
    and counted; no request ever leaves the machine."""
    import socket

    import huggingface_hub.constants as hub_constants
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY",
                "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    attempts = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise ConnectionRefusedError(f"no network in this test ({address})")

    def never(*args, **kwargs):
        raise AssertionError("a connection other than the reachability probe was attempted")
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", never)
    monkeypatch.setattr(socket.socket, "connect_ex", never)
    return attempts


def test_hub_offline_fails_fast_without_retries(tmp_path, unreachable_hub, monkeypatch):
    import time

    import huggingface_hub

    from flashmemory_triton.checkpoint import resolve_pretrained
    real = huggingface_hub.hf_hub_download
    modes = []

    def recording(*args, **kwargs):
        modes.append(kwargs.get("local_files_only"))
        return real(*args, **kwargs)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording)
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError, match="the hub was unreachable"):
        resolve_pretrained("libertywing/FlashMemory-Deepseek-V4", cache_dir=tmp_path)
    assert time.monotonic() - t0 < 10  # the hub client's retries alone take ~25 s
    assert unreachable_hub and modes and all(modes)  # the probe failed: cache lookups only


def test_demo_hub_offline_is_one_line_and_fast(tmp_path, unreachable_hub, monkeypatch, capsys):
    import time

    from flashmemory_triton import cli
    monkeypatch.setattr(cli, "SUBCOMMANDS", {"demo": cli.SUBCOMMANDS["demo"]})
    t0 = time.monotonic()
    rc = cli.main(["demo", "--hub", "libertywing/FlashMemory-Deepseek-V4", "--cache-dir",
                   str(tmp_path)])
    err = capsys.readouterr().err
    assert time.monotonic() - t0 < 10
    assert rc == 2 and "unreachable" in err and "Traceback" not in err


# --- absurd sizes: a named refusal, not torch's "Storage size calculation overflowed" ----------
def _one_request():
    return [make_keys((3,), torch.Generator().manual_seed(0))]


def _absurd_size_cases():
    from flashmemory_triton import deepgemm as dg
    from flashmemory_triton import paged as P
    from flashmemory_triton.offload import ChunkHistory, OffloadEngine
    from flashmemory_triton.selection import ThresholdFallback
    from flashmemory_triton.synthetic import make_layer_states, mock_compressed_k, mock_hidden
    huge = 2 ** 62
    return {  # id: (call, the argument the refusal must name, with its value)
        "engine-batch": (lambda: OffloadEngine(huge, reserve_pages=1), "batch"),
        "engine-capacity": (lambda: OffloadEngine(2, reserve_pages=1, capacity=huge), "capacity"),
        "engine-page-size": (lambda: OffloadEngine(2, reserve_pages=0, page_size=huge,
                                                   capacity=1), "page_size"),
        "engine-row-shape": (lambda: OffloadEngine(2, row_shape=(huge,), reserve_pages=0),
                             r"row_shape \(4611686018427387904,\)"),
        "history-batch": (lambda: ChunkHistory(huge, 8), "batch"),
        "history-capacity": (lambda: ChunkHistory(2, 8, capacity=huge), "capacity"),
        "fallback-batch": (lambda: ThresholdFallback(huge, 0.5), "batch"),
        "pack-num-pages": (lambda: P.pack_pool(_one_request(), num_pages=huge), "num_pages"),
        "pack-max-pages": (lambda: P.pack_pool(_one_request(), max_pages=huge), "max_pages"),
        "pack-page-ids": (lambda: P.pack_pool(_one_request(), page_ids=[[huge]]), "page_ids"),
        "schedule-num-sms": (lambda: dg.get_paged_mqa_logits_metadata(
            torch.ones(2, dtype=torch.int32), 64, huge), "num_sms"),
        "mock-hidden-batch": (lambda: mock_hidden(huge), "batch"),
        "mock-keys-n-chunks": (lambda: mock_compressed_k(2, huge), "n_chunks"),
        "layer-states-hidden": (lambda: make_layer_states(hidden=huge, rank=4, n_heads=2),
                                "hidden"),
        "layer-states-n-heads": (lambda: make_layer_states(hidden=8, rank=4, n_heads=huge),
                                 "n_heads"),
    }


@pytest.mark.parametrize("case", list(_absurd_size_cases()))
def test_absurd_sizes_are_refused_by_name(case):
    """A size whose tensor would pass 2**63 bytes cannot exist: refused before any allocation
    with a ValueError naming the argument and its value (it was torch's internal overflow)."""
    call, name = _absurd_size_cases()[case]
    with pytest.raises(ValueError, match="too large") as info:
        call()
    assert re.search(name, str(info.value)), str(info.value)
    value = "4611686018427387905" if case == "pack-page-ids" else "4611686018427387904"
    assert value in str(info.value)


def test_large_but_addressable_sizes_pass_the_size_check():
    """The bound is addressability, not a guess at memory: one element below 2**63 bytes
    passes (a real out-of-memory stays torch's), and ordinary sizes allocate."""
    from flashmemory_triton import _validate as V
    from flashmemory_triton import paged as P
    from flashmemory_triton.selection import ThresholdFallback
    V.addressable("x", (2 ** 60 - 1,), 8, n=1)
    V.addressable("x", (0, 2 ** 61), 2, n=1)  # empty dims count as 1: 2**62 bytes
    with pytest.raises(ValueError, match="n = 1"):
        V.addressable("x", (2 ** 60,), 8, n=1)
    assert ThresholdFallback(1 << 16, 0.5).active.shape == (1 << 16,)
    batch = P.pack_pool(_one_request(), num_pages=1 << 10, max_pages=1 << 10)
    assert batch.pool.shape == (1 << 10, C.PAGE_BYTES) and batch.page_table.shape == (1, 1 << 10)
