"""Every public entry point refuses bad input clearly, before any kernel launches (issue 7.1),
non-finite hidden states follow one documented policy in both backends (7.2), and strided or
non-contiguous inputs give exactly the contiguous answer (7.1).

The torch-backend retriever's bad-input table lives in ``test_retriever_api.py``; it is reused
here for the triton backend rather than restated. ``docs/validation.md`` lists every check.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from _helpers import joint_state_dict, make_layer_states
from flashmemory_triton import FlashMemoryRetriever, ThresholdFallback, cli, ops, select_resident
from flashmemory_triton import _validate as V
from flashmemory_triton import constants as C
from flashmemory_triton.checkpoint import CheckpointError
from flashmemory_triton.offload import OffloadEngine
from flashmemory_triton.synthetic import write_checkpoint
from kernel_cases import assert_close, make_keys
from test_kernels import FP32_RTOL
from test_retriever_api import CALL_ERRORS, _other_device, build, call_method, inputs

L, B, H, N = 3, 2, 4, 40


@pytest.fixture
def no_launch(monkeypatch):
    """Any kernel launch fails the test: errors must come from validation, before launching."""
    from flashmemory_triton.kernels import query_prep, score

    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched on invalid input")

    monkeypatch.setattr(query_prep, "prepare_query_launch", launched)
    monkeypatch.setattr(score, "fused_score_launch", launched)


def _q_inputs(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(L, B, H, C.HEAD_DIM, generator=g).to(device)
    w = (torch.randn(L, B, H, generator=g) / 64).to(device)
    pos = torch.tensor([5, 70000], device=device)
    keys = make_keys((B, N), g).to(device)
    return q, w, pos, keys


# --- ops.prepare_queries ------------------------------------------------------------------------
PREPARE_ERRORS = [
    # (id, mutate(q, w, pos, dev) -> (q, w, pos, kwargs), exception, message regex)
    ("q-int", lambda q, w, p, d: (q.long(), w, p, {}), TypeError, "q_proj.*floating"),
    ("q-2d", lambda q, w, p, d: (q[0, 0], w, p, {}), ValueError, "q_proj.*dims"),
    ("q-head-dim", lambda q, w, p, d: (q[..., :64], w, p, {}), ValueError, "q_proj.*128.*64"),
    ("q-list", lambda q, w, p, d: (q.tolist(), w, p, {}), TypeError, "q_proj.*Tensor"),
    ("w-int", lambda q, w, p, d: (q, w.long(), p, {}), TypeError, "w must be a floating"),
    ("w-heads", lambda q, w, p, d: (q, w[..., :-1], p, {}), ValueError,
     r"w must be \[L=3, B=2, H=4\]"),
    ("w-batch", lambda q, w, p, d: (q, w[:, :1], p, {}), ValueError, r"w must be \[L=3, B=2"),
    ("w-layers", lambda q, w, p, d: (q, w[:2], p, {}), ValueError, r"w must be \[L=3"),
    ("pos-float", lambda q, w, p, d: (q, w, p.float(), {}), TypeError, "positions.*integer"),
    ("pos-bool", lambda q, w, p, d: (q, w, p > 0, {}), TypeError, "positions.*integer"),
    ("pos-2d", lambda q, w, p, d: (q, w, p[:, None], {}), ValueError, "positions.*1 dims"),
    ("pos-length", lambda q, w, p, d: (q, w, p[:1], {}), ValueError, r"positions.*\(2,\)"),
    ("pos-negative", lambda q, w, p, d: (q, w, p - 6, {}), ValueError,
     "positions.*non-negative.*-1"),
    ("pos-device", lambda q, w, p, d: (q, w, p.to(_other_device(d)), {}), ValueError,
     "positions is on"),
    ("w-device", lambda q, w, p, d: (q, w.to(_other_device(d)), p, {}), ValueError, "w is on"),
    ("max-position-0", lambda q, w, p, d: (q, w, p, {"max_position": 0}), ValueError,
     "max_position.*0"),
    ("max-position-float", lambda q, w, p, d: (q, w, p, {"max_position": 4096.0}), ValueError,
     "max_position"),
    ("rope-freqs-shape", lambda q, w, p, d: (q, w, p, {"rope_freqs": torch.ones(64, device=d)}),
     ValueError, "rope_freqs.*32"),
    ("precision", lambda q, w, p, d: (q, w, p, {"precision": "fp16"}), ValueError,
     "precision.*fp16"),
    ("backend", lambda q, w, p, d: (q, w, p, {"backend": "cuda"}), ValueError, "backend.*cuda"),
]


@pytest.mark.parametrize("mutate,exc,msg", [pytest.param(*c[1:], id=c[0]) for c in PREPARE_ERRORS])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prepare_queries_refuses(mutate, exc, msg, backend, device, no_launch):
    q, w, pos, _ = _q_inputs(device)
    q, w, pos, kw = mutate(q, w, pos, device)
    kw.setdefault("backend", backend)
    with pytest.raises(exc, match=msg):
        ops.prepare_queries(q, w, pos, **kw)


# --- ops.score_prepared / score_chunks ------------------------------------------------------------
def _hand_built(prepared, **changes):
    return ops.PreparedQueries(**{**prepared._asdict(), **changes})


SCORE_ERRORS = [
    # (id, mutate(prepared, keys, dev) -> (prepared, keys, kwargs), exception, message regex)
    ("not-prepared", lambda p, k, d: (tuple(p), k, {}), TypeError, "prepared must come from"),
    ("keys-int8", lambda p, k, d: (p, k.to(torch.int8), {}), TypeError, "compressed_k.*uint8"),
    ("keys-float", lambda p, k, d: (p, k.float(), {}), TypeError, "compressed_k.*uint8"),
    ("keys-131", lambda p, k, d: (p, k[..., :131], {}), ValueError,
     "compressed_k last dim must be 132"),
    ("keys-133", lambda p, k, d: (p, torch.cat([k, k[..., :1]], -1), {}), ValueError,
     "compressed_k last dim must be 132"),
    ("keys-2d", lambda p, k, d: (p, k[0], {}), ValueError, "compressed_k.*dims"),
    ("keys-5d", lambda p, k, d: (p, k[None, None], {}), ValueError, "compressed_k.*dims"),
    ("keys-batch", lambda p, k, d: (p, k[:1], {}), ValueError, "compressed_k batch must be 2"),
    ("keys-layers", lambda p, k, d: (p, k.expand(2, -1, -1, -1), {}), ValueError,
     r"per-layer compressed_k must be \[L=3"),
    ("keys-device", lambda p, k, d: (p, k.to(_other_device(d)), {}), ValueError,
     "compressed_k is on"),
    ("ensemble", lambda p, k, d: (p, k, {"ensemble": "min"}), ValueError, "ensemble.*min"),
    ("offset-nan", lambda p, k, d: (p, k, {"logit_offset": float("nan")}), ValueError,
     "logit_offset.*nan"),
    ("offset-inf", lambda p, k, d: (p, k, {"logit_offset": float("inf")}), ValueError,
     "logit_offset.*finite"),
    ("offset-str", lambda p, k, d: (p, k, {"logit_offset": "0.5"}), TypeError,
     "logit_offset.*real"),
    ("hand-w-shape", lambda p, k, d: (_hand_built(p, w=p.w[..., :-1]), k, {}), ValueError,
     r"prepared\.w must be \[L=3, B=2, H=4\]"),
    ("hand-q-dim", lambda p, k, d: (_hand_built(p, q=p.q[..., :64]), k, {}), ValueError,
     "prepared.q last dim must be head_dim 128"),
    ("hand-q-3d", lambda p, k, d: (_hand_built(p, q=p.q[0]), k, {}), ValueError,
     "prepared.q.*4 dims"),
    ("hand-w-device", lambda p, k, d: (_hand_built(p, w=p.w.to(_other_device(d))), k, {}),
     ValueError,
     "prepared.w is on"),
    ("hand-precision", lambda p, k, d: (_hand_built(p, precision="int4"), k, {}), ValueError,
     "prepared.precision"),
    ("hand-backend", lambda p, k, d: (_hand_built(p, backend="auto"), k, {}), ValueError,
     "prepared.backend"),
]


@pytest.mark.parametrize("mutate,exc,msg", [pytest.param(*c[1:], id=c[0]) for c in SCORE_ERRORS])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_score_prepared_refuses(mutate, exc, msg, backend, device, monkeypatch):
    q, w, pos, keys = _q_inputs(device)
    prepared = ops.prepare_queries(q, w, pos, backend=backend, precision="fp32")
    prepared, keys, kw = mutate(prepared, keys, device)
    from flashmemory_triton.kernels import score

    def launched(*args, **kwargs):
        raise AssertionError("the scoring kernel was launched on invalid input")

    monkeypatch.setattr(score, "fused_score_launch", launched)
    with pytest.raises(exc, match=msg):
        ops.score_prepared(prepared, keys, **kw)


def test_hand_built_q_dtype_must_match_precision(device, no_launch):
    """The kernels read q in the precision's storage dtype; a float32 q labelled bf16 would be
    misread, so it is refused (TypeError) rather than scored."""
    q, w, pos, keys = _q_inputs(device)
    bad = ops.PreparedQueries(q.float(), w, "bf16", "triton")
    with pytest.raises(TypeError, match=r"prepared\.q for precision 'bf16'.*torch\.bfloat16"):
        ops.score_prepared(bad, keys)


@pytest.mark.parametrize("case", ["keys-131", "keys-batch", "ensemble", "offset-nan"])
def test_score_chunks_checks_keys_before_preparing(case, device, no_launch):
    """score_chunks must not run the query kernel and only then find the keys are wrong."""
    q, w, pos, keys = _q_inputs(device)
    mutate, exc, msg = next(c[1:] for c in SCORE_ERRORS if c[0] == case)
    _, keys, kw = mutate(None, keys, device)
    with pytest.raises(exc, match=msg):
        ops.score_chunks(q, w, pos, keys, backend="triton", **kw)


def test_values_unreadable_on_meta_are_skipped_not_misreported():
    """Value checks need a host read; on meta they are skipped (shape/dtype still checked),
    which is the same rule CUDA graph capture uses (docs/validation.md)."""
    meta = torch.empty(3, dtype=torch.int64, device="meta")
    assert V.positions("positions", meta, 3) is meta
    with pytest.raises(ValueError, match=r"\(2,\)"):
        V.positions("positions", meta, 2)
    with pytest.raises(ValueError, match="non-negative"):
        V.positions("positions", torch.tensor([0, -1, 2]), 3)
    assert V.values_readable(torch.device("cpu")) and not V.values_readable(torch.device("meta"))


# --- the retriever on the triton backend ----------------------------------------------------------
@pytest.mark.parametrize("mutate,exc,msg", [pytest.param(*c[1:], id=c[0]) for c in CALL_ERRORS])
@pytest.mark.parametrize("method", ["forward", "score_layer", "ensemble", "select_topk"])
def test_triton_retriever_refuses_like_torch(mutate, exc, msg, method, device, no_launch):
    """The whole bad-call table of the torch backend, on backend='triton', with launches
    forbidden: the checks run before any projection or kernel."""
    model, _ = build(device, backend="triton")
    assert model.resolved_backend() == "triton"
    hidden, ck, pos = mutate(*inputs(device, 3, 5), device)
    with pytest.raises(exc, match=msg):
        call_method(model, method, hidden, ck, pos)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_retriever_selection_and_option_errors(backend, device, no_launch):
    model, states = build(device, backend=backend)
    hidden, ck, pos = inputs(device, 3, 5)
    for bad, exc in ((float("nan"), ValueError), ("0.5", TypeError)):
        with pytest.raises(exc, match="threshold"):
            model.select_topk(hidden, ck, pos, threshold=bad)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="top_k"):
            model.select_topk(hidden, ck, pos, top_k=bad)
    for bad, exc in ((float("nan"), ValueError), (float("-inf"), ValueError), ("1", TypeError)):
        with pytest.raises(exc, match="logit_offset"):
            FlashMemoryRetriever(states, device=device, backend=backend, logit_offset=bad)
    with pytest.raises(ValueError, match="precision"):
        FlashMemoryRetriever(states, device=device, backend=backend, precision="fp4")


def test_head_dim_other_than_128_never_reaches_the_kernels(device, no_launch):
    """The kernels tile D = 128: backend='triton' with head_dim 64 is refused by name, and
    'auto' falls back to a torch path (the CPU path on a CPU) instead of failing."""
    states = make_layer_states(hidden=16, rank=8, n_heads=2, head_dim=64)
    strict = FlashMemoryRetriever(states, device=device, head_dim=64, backend="triton")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 16, generator=g).to(device)
    keys = make_keys((2, 7), g)[..., 64:].contiguous().to(device)  # 64 e4m3 bytes + scale
    pos = torch.tensor([0, 9], device=device)
    with pytest.raises(ValueError, match="head_dim 128 only.*head_dim 64"):
        strict.ensemble(hidden, keys, pos)
    auto = FlashMemoryRetriever(states, device=device, head_dim=64, backend="auto")
    assert auto.resolved_backend() == ("cpu" if device.type == "cpu" else "torch")
    assert auto.ensemble(hidden, keys, pos).shape == (2, 7)
    with pytest.raises(ValueError, match="compressed_k last dim must be 68"):
        auto.ensemble(hidden, make_keys((2, 7), g).to(device), pos)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_checkpoint_from_another_model(backend, tmp_path, device, no_launch):
    """A checkpoint of a different model size loads (it is a valid retriever), and the first
    call with this model's hidden states is refused naming both sizes; a checkpoint whose
    shapes cannot be a retriever at all is refused at load time naming the key."""
    other = make_layer_states(hidden=48, rank=16, n_heads=2)
    path = write_checkpoint(tmp_path / "other.safetensors", other)
    model = FlashMemoryRetriever.from_checkpoint(path, device=device, backend=backend)
    assert model.hidden_size == 48
    hidden, ck, pos = inputs(device, 2, 5)  # this suite's model: hidden 64
    with pytest.raises(ValueError, match=r"hidden last dim must be the weights' hidden size 48, "
                                         r"got shape \(2, 64\)"):
        model.ensemble(hidden, ck, pos)
    broken = joint_state_dict(other)
    broken["retrievers.l12.weights_proj.weight"] = torch.zeros(3, 48)  # 3 heads vs wq_b's 2
    bad_path = tmp_path / "broken.safetensors"
    save_file(dict(broken), str(bad_path))
    with pytest.raises(CheckpointError, match=r"retrievers\.l12\.weights_proj\.weight' has shape "
                                              r"\(3, 48\), expected \[2, 48\]"):
        FlashMemoryRetriever.from_checkpoint(bad_path, device=device, backend=backend)


# --- select_resident (cases beyond test_selection.py's table) -------------------------------------
SELECT_ERRORS = [
    pytest.param(dict(threshold=float("nan")), ValueError, "threshold must be a number",
                 id="threshold-nan"),
    pytest.param(dict(n_chunks=torch.tensor([-1, 2])), ValueError, r"n_chunks values.*min -1",
                 id="n-negative-tensor"),
    pytest.param(dict(n_chunks=5), ValueError, r"n_chunks must be in \[0, N=4\]",
                 id="n-int-too-big"),
    pytest.param(dict(n_chunks=torch.tensor([True, False])), TypeError, "n_chunks.*integer",
                 id="n-bool"),
    pytest.param(dict(n_chunks=torch.tensor([1, 2], device="meta")), ValueError,
                 "n_chunks is on meta",
                 id="n-device"),
    pytest.param(dict(sink=-1), ValueError, "sink", id="sink-negative"),
    pytest.param(dict(max_pages=-1), ValueError, "max_pages", id="max-pages-negative"),
    pytest.param(dict(mode="chunk", max_resident=-2), ValueError, "max_resident",
                 id="cap-negative"),
    pytest.param(dict(mode="topk", top_k=-1), ValueError, "top_k", id="topk-negative"),
    pytest.param(dict(fallback=object()), TypeError, "ThresholdFallback", id="fallback-type"),
    pytest.param(dict(fallback=ThresholdFallback(2, 0.5, device="meta")), ValueError,
                 "fallback state",
                 id="fallback-device"),
    pytest.param(dict(scores=torch.zeros(1, 2, 4)), ValueError, "scores.*2 dims", id="scores-3d"),
    pytest.param(dict(scores=[[0.1, 0.2]]), TypeError, "scores.*Tensor", id="scores-list"),
    # Below 2**63 but the pages output [B, max_pages] int64 cannot be addressed: named, not a
    # torch storage-size overflow.
    pytest.param(dict(max_pages=2 ** 62), ValueError,
                 "max_pages = 4611686018427387904 is too large",
                 id="max-pages-huge"),
]


@pytest.mark.parametrize("kwargs,exc,match", SELECT_ERRORS)
def test_select_resident_refuses(kwargs, exc, match):
    kwargs = dict(kwargs)
    scores = kwargs.pop("scores", torch.zeros(2, 4))
    kwargs.setdefault("mode", "page")
    with pytest.raises(exc, match=match):
        select_resident(scores, **kwargs)


# --- OffloadEngine (cases beyond test_offload.py's table) -----------------------------------------
def _engine():
    g = torch.Generator().manual_seed(0)
    hist = torch.randint(0, 256, (2, 20, 8), dtype=torch.uint8, generator=g)
    return OffloadEngine.from_history(hist, reserve_pages=4, page_size=4)


ENGINE_ERRORS = [
    pytest.param(lambda e: e.append(torch.zeros(2, 3, 8, dtype=torch.uint8), counts=[1.5, 2]),
                 TypeError, "counts must be integers", id="counts-float"),
    pytest.param(lambda e: e.append(torch.zeros(2, 3, 8, dtype=torch.uint8), counts=[-1, 2]),
                 ValueError, "counts must be in", id="counts-negative"),
    pytest.param(lambda e: e.append(torch.zeros(2, 3, 8, dtype=torch.uint8), counts=[1, 2, 3]),
                 ValueError, r"counts must have shape \(2,\)", id="counts-shape"),
    pytest.param(lambda e: e.append(torch.zeros(2, 3, 8, dtype=torch.uint8), counts=[2 ** 64, 2]),
                 ValueError, "counts must be", id="counts-past-int64"),
    pytest.param(lambda e: e.append(torch.zeros(2, 3, 8, dtype=torch.uint8), counts=["a", 2]),
                 TypeError, "counts must be integers", id="counts-str"),
    pytest.param(lambda e: OffloadEngine(1, (8,), reserve_pages=2 ** 64), ValueError,
                 "reserve_pages", id="reserve-past-int64"),
    pytest.param(lambda e: OffloadEngine(1, (8,), reserve_pages=2 ** 62), ValueError,
                 "reserve_pages = 4611686018427387904 x page_size = 64", id="reserve-too-large"),
    pytest.param(lambda e: OffloadEngine(1, (8,), reserve_pages=1, page_size=2 ** 64), ValueError,
                 "page_size = 18446744073709551616 chunks", id="reserve-page-size-huge"),
    pytest.param(lambda e: e.append(torch.zeros(3, 3, 8, dtype=torch.uint8)), ValueError,
                 r"payload must be \[2, n, 8\]", id="append-batch"),
    pytest.param(lambda e: e.append(torch.zeros(2, 8, dtype=torch.uint8)), ValueError, "payload",
                 id="append-2d"),
    pytest.param(lambda e: e.apply(torch.ones(20, dtype=torch.bool)), ValueError,
                 "resident mask.*2 dims",
                 id="mask-1d"),
    pytest.param(lambda e: e.apply("all"), TypeError, "resident mask", id="mask-str"),
    pytest.param(lambda e: e.apply(torch.ones(2, 8, dtype=torch.bool, device="meta")), ValueError,
                 "resident mask is on the meta device", id="mask-meta"),
    pytest.param(lambda e: e.read(torch.zeros(2, 3, dtype=torch.int64, device="meta")), ValueError,
                 "chunks is on the meta device", id="read-meta"),
    pytest.param(lambda e: e.read(torch.zeros(2, 3)), TypeError, "chunks.*integer",
                 id="read-float"),
    pytest.param(lambda e: e.read(torch.zeros(2, dtype=torch.int64)), ValueError, "chunks.*2 dims",
                 id="read-1d"),
    pytest.param(lambda e: OffloadEngine(0, (8,), reserve_pages=1), ValueError, "batch",
                 id="batch-0"),
    pytest.param(lambda e: OffloadEngine(1, (8,), reserve_pages=1, page_size=0), ValueError,
                 "page_size", id="page-size-0"),
    pytest.param(lambda e: OffloadEngine.from_history(torch.zeros(2, 5), reserve_pages=1),
                 ValueError,
                 r"history must be \[B, N, \*row_shape\]", id="history-2d"),
]


@pytest.mark.parametrize("call,exc,match", ENGINE_ERRORS)
def test_offload_engine_refuses_and_keeps_state(call, exc, match):
    eng = _engine()
    eng.apply(torch.ones(2, 8, dtype=torch.bool))
    before = (eng.n_chunks.clone(), eng._lookup.clone(), eng.reserve.clone(), eng.cycle)
    with pytest.raises(exc, match=match):
        call(eng)
    assert torch.equal(eng.n_chunks, before[0]) and torch.equal(eng._lookup, before[1])
    assert torch.equal(eng.reserve, before[2]) and eng.cycle == before[3]
    eng.check_consistency()


def test_offload_read_out_of_range_ids_are_absent_not_wrapped():
    """Chunk ids < 0 or past the history are handled, not refused: they read as absent zeros
    (-1 is the documented padding), never as another chunk's bytes (no negative wrap)."""
    eng = _engine()
    eng.apply(torch.ones(2, 20, dtype=torch.bool) & (torch.arange(20) >= 16))  # one page a row
    ids = torch.tensor([[-1, -5, 19, 20, 10 ** 9], [-(2 ** 40), 16, 3, 21, 2 ** 40]])
    rows, present = eng.read(ids)
    assert present.tolist() == [[False, False, True, False, False],
                                [False, True, False, False, False]]
    assert not bool(rows[~present].any())
    assert torch.equal(rows[0, 2], eng.history.data[0, 19])


# --- CLIs: exit 2 with one line naming the problem ------------------------------------------------
DECODE_FAST = ["--n-chunks", "40", "--steps", "2", "--interval", "2", "--page-size", "8",
               "--max-pages", "2", "--recent", "4"]


@pytest.mark.parametrize("args,message", [
    pytest.param(["--device", "meta"], "device must be 'cpu' or 'cuda[:N]'", id="device-meta"),
    pytest.param(["--device", "tpu:0"], "device must be 'cpu' or 'cuda[:N]', got 'tpu:0'",
                 id="device-bad"),
    pytest.param(["--threshold", "nan"], "threshold must be a number, got nan", id="threshold-nan"),
    pytest.param(["--fallback-bound", "1.5"], "fallback_bound must be in [0, 1), got 1.5",
                 id="bound"),
    pytest.param(["--steps", "-1"], "steps must be an int >= 0, got -1", id="steps"),
    pytest.param(["--batch", "0"], "batch must be an int >= 1, got 0", id="batch"),
    pytest.param(["--n-chunks", "-5"], "n_chunks must be an int >= 0, got -5", id="n-chunks"),
    pytest.param(["--page-size", "0"], "page_size must be an int >= 1, got 0", id="page-size"),
    pytest.param(["--top-k", "3"], "top_k applies to --select topk only", id="topk-in-page"),
    pytest.param(["--offload", "--reserve-pages", "1"], "reserve_pages=1", id="reserve-too-small"),
])
def test_decode_cli_bad_values(args, message, monkeypatch, capsys):
    monkeypatch.setattr(cli, "SUBCOMMANDS", {"decode": cli.SUBCOMMANDS["decode"]})
    rc = cli.main(["decode", *DECODE_FAST, *args])
    out, err = capsys.readouterr()
    assert rc == 2, err
    assert err.startswith("flashmemory-triton decode: error: ") and err.count("\n") == 1, err
    assert message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_decode_cli_cuda_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(cli, "SUBCOMMANDS", {"decode": cli.SUBCOMMANDS["decode"]})
    rc = cli.main(["decode", *DECODE_FAST, "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == 2 and "CUDA is not available" in err and err.count("\n") == 1


def test_demo_cli_wrong_model_checkpoint(tmp_path, monkeypatch, capsys):
    """The demo on a checkpoint whose shapes do not form a retriever: one line naming the key."""
    broken = joint_state_dict(make_layer_states(hidden=32, rank=16, n_heads=2))
    broken["retrievers.l20.q_norm_weight"] = torch.ones(17)
    path = tmp_path / "wrong.safetensors"
    save_file(dict(broken), str(path))
    monkeypatch.setenv("FLASHMEMORY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli, "SUBCOMMANDS", {"demo": cli.SUBCOMMANDS["demo"]})
    rc = cli.main(["demo", "--ckpt", str(path), "--backend", "torch", "--n-chunks", "8"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert "'retrievers.l20.q_norm_weight' has shape (17,), expected [16]" in err


# --- non-finite hidden states (issue 7.2) ---------------------------------------------------------
NONFINITE = [pytest.param(v, p, id=f"{v}-{p}") for v, p in
             ((float("nan"), "bf16"), (float("inf"), "fp8"), (float("-inf"), "tf32"),
              (float("nan"), "fp32"))]


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("value,precision", NONFINITE)
def test_nonfinite_hidden_rows_score_nan_in_both_backends(value, precision, device):
    """Policy: a NaN/Inf anywhere in a row's hidden state makes that row's logits NaN for every
    chunk of every layer reading it (RMSNorm spreads it over q; NaN-aware ReLU keeps it), so
    the row's ensemble scores are NaN and no hit is ever drawn from it. Other rows are
    untouched. Both backends give the same NaN pattern, bit for bit."""
    models = {b: build(device, backend=b, precision=precision if b == "triton" else None)[0]
              for b in ("torch", "triton")}
    hidden, ck, pos = inputs(device, 3, 33)
    shared = hidden.clone()
    shared[1, 7] = value
    per_layer = hidden.expand(3, -1, -1).clone()
    per_layer[2, 0, 11] = value  # layer l20's hidden of row 0 only
    want_shared = torch.zeros(3, 3, 33, dtype=torch.bool)
    want_shared[:, 1] = True
    want_layer = torch.zeros(3, 3, 33, dtype=torch.bool)
    want_layer[2, 0] = True
    for backend, model in models.items():
        for h, want, mode in ((shared, want_shared, "max"), (per_layer, want_layer, "mean")):
            logits = model.logits(h, ck, pos).cpu()
            assert torch.equal(torch.isnan(logits), want), f"{backend}: NaN pattern of the logits"
            assert not bool(torch.isinf(logits).any())
            rows = want.any(0).any(1)  # max and mean of sigmoids both keep a NaN
            scores = model.ensemble(h, ck, pos, mode=mode).cpu()
            assert torch.equal(torch.isnan(scores).all(1), rows), f"{backend}/{mode}"
            assert not bool(torch.isnan(scores[~rows]).any())
    # Consequences for selection, on the NaN row (row 1 of `shared`); the scores are the same
    # NaN pattern in both backends (above), so the cheap one is used.
    model = models["torch"]
    scores = model.ensemble(shared, ck, pos)
    assert not bool(model.select_topk(shared, ck, pos, top_k=33)[1].any())  # NaN never kept
    assert not bool(model.select_topk(shared, ck, pos, threshold=0.0)[1].any())
    chunk = select_resident(scores, mode="chunk", recent=4, sink=2)
    assert chunk.n_hits.tolist()[1] == 0
    assert chunk.mask[1].nonzero().flatten().tolist() == [0, 1, 29, 30, 31, 32]  # forced only
    page = select_resident(scores, mode="page", recent=4, page_size=8, max_pages=3)
    assert page.pages[1].tolist() == [0, 3, 4]  # tail chunks 29-32: pages 3, 4; then page 0
    topk = select_resident(scores, mode="topk", top_k=5)
    assert topk.n_selected.tolist()[1] == 0


def test_huge_finite_hidden_overflows_to_offset_in_both_backends(device):
    """Finite but huge hidden values (|x| ~ 1e30) overflow fp32 in RMSNorm's mean of squares:
    q_lora / inf = 0, so q = 0 and every logit of the row is exactly logit_offset, in both
    backends (documented; the release's fp32 math does the same). Not NaN, not a hit at the
    default threshold (sigmoid(0) = 0.5 and hits are strictly greater)."""
    hidden, ck, pos = inputs(device, 2, 17)
    hidden = hidden.clone()
    hidden[0] = hidden[0] * 1e30
    for backend in ("torch", "triton"):
        model, _ = build(device, backend=backend, logit_offset=0.25)
        logits = model.logits(hidden, ck, pos).cpu()
        assert bool((logits[:, 0] == 0.25).all()), backend
        assert not bool((logits[:, 1] == 0.25).all()), backend


# --- strided and non-contiguous inputs (handled, not refused) -------------------------------------
# key_views() must COPY a contiguous view at an odd byte offset (its own .contiguous()).


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of uint8 ``t`` whose storage offset is odd (not 4-byte aligned)."""
    buf = torch.zeros(t.numel() + 1, dtype=torch.uint8, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


def _key_views(keys: torch.Tensor):
    """Equal-valued views of ``keys [..., B, N, 132]`` in layouts a serving engine produces."""
    g = torch.Generator().manual_seed(3)
    big = torch.stack([keys, make_keys(keys.shape[:-1], g).to(keys.device)], dim=-2)
    yield "every-other-chunk", big.flatten(-3, -2)[..., ::2, :]  # strided rows, in place
    yield "chunk-major", keys.transpose(-3, -2).contiguous().transpose(-3, -2)  # [N, B] storage
    yield "odd-offset", _misaligned(keys)  # must be copied by the launcher
    yield "bytes-strided", keys.transpose(-1, -2).contiguous().transpose(-1, -2)  # stride(-1) != 1


@pytest.mark.parametrize("layout", ["shared", "per_layer"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_keys_give_the_contiguous_answer(layout, backend, device):
    q, w, pos, _ = _q_inputs(device, seed=4)
    g = torch.Generator().manual_seed(5)
    keys = make_keys((L, B, N) if layout == "per_layer" else (B, N), g).to(device)
    prepared = ops.prepare_queries(q, w, pos, backend=backend, precision="bf16")
    want_s, want_l = ops.score_prepared(prepared, keys, return_logits=True)
    for name, view in _key_views(keys):
        assert torch.equal(view, keys) and (name == "odd-offset" or not view.is_contiguous())
        got_s, got_l = ops.score_prepared(prepared, view, return_logits=True)
        assert torch.equal(got_l, want_l) and torch.equal(got_s, want_s), (
            f"{backend}/{layout}/{name}")
    if layout == "shared":  # one buffer viewed as L per-layer buffers (stride 0 over layers)
        got_s, got_l = ops.score_prepared(prepared, keys.expand(L, -1, -1, -1), return_logits=True)
        if device.type == "cpu":
            assert torch.equal(got_l, want_l), f"{backend}: expanded per-layer keys"
        else:  # per-layer keys take another code path on a GPU: fp32 summation order may differ
            assert_close(got_l.cpu(), want_l.cpu(), FP32_RTOL, f"{backend}: expanded keys")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_hidden_positions_and_queries(backend, device):
    model, _ = build(device, backend=backend)
    hidden, ck, pos = inputs(device, 3, 20)
    want = model.logits(hidden, ck, pos)
    hidden_t = hidden.T.contiguous().T  # column-major [B, hidden]
    pos_s = torch.stack([pos, pos], dim=1)[:, 0]  # stride 2
    assert not hidden_t.is_contiguous() and not pos_s.is_contiguous()
    got = model.logits(hidden_t, ck, pos_s)
    assert torch.equal(got, want)  # both backends copy a strided hidden before the GEMM
    per_layer = hidden.expand(3, -1, -1)  # stride 0 over layers
    assert torch.equal(model.logits(per_layer, ck, pos), want)
    q, w, p, _ = _q_inputs(device, seed=6)
    prep = ops.prepare_queries(q, w, p, backend=backend)
    q_t = q.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)
    w_t = w.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    prep_t = ops.prepare_queries(q_t, w_t, p, backend=backend)
    assert torch.equal(prep.q, prep_t.q) and torch.equal(prep.w, prep_t.w)


def test_strided_scores_and_lengths_select_the_same(device):
    g = torch.Generator().manual_seed(8)
    scores = (torch.randint(0, 9, (3, 50), generator=g).float() / 8).to(device)
    n = torch.tensor([50, 13, 0], device=device)
    scores_t = scores.T.contiguous().T
    n_s = torch.stack([n, n], 1)[:, 1]
    for mode, kw in (("page", dict(page_size=8, max_pages=3)), ("chunk", dict(max_resident=9)),
                     ("topk", dict(top_k=7))):
        a = select_resident(scores, mode=mode, n_chunks=n, recent=5, **kw)
        b = select_resident(scores_t, mode=mode, n_chunks=n_s, recent=5, **kw)
        assert torch.equal(a.mask, b.mask), mode


# --- serving batches: every bad argument refused before ANY launch (issue 14) ---------------------


def _serving_batch(device):
    from flashmemory_triton import paged as P
    g = torch.Generator().manual_seed(9)
    reqs = [make_keys((3, n), g) for n in (70, 5)]
    pb = P.pack_pool(reqs)
    vb = P.pack_varlen(reqs)
    hidden, _, _ = inputs(device, 2, 1)
    return dict(hidden=hidden, pools=[p.to(device) for p in pb.pool.unbind(0)],
                table=pb.page_table.to(device), n=pb.n_chunks.to(device),
                keys=[k.to(device) for k in vb.keys.unbind(0)], cu=vb.cu_chunks.to(device),
                pos=torch.tensor([3, 9], device=device))


PAGED_BAD = [
    # (id, mutate(batch) -> (pools, table, n, kwargs), exception, message regex)
    ("pools-row-shape", lambda b: (b["pools"][0].view(-1, 64, 132), b["table"], b["n"], {}),
     ValueError, r"pools must be split-format.*ROW layout"),
    ("pools-int8", lambda b: ([p.view(torch.int8) for p in b["pools"]], b["table"], b["n"], {}),
     TypeError, r"pools\[0\].*uint8"),
    ("pools-list-length", lambda b: (b["pools"][:2], b["table"], b["n"], {}), ValueError,
     "per-layer pools hold 2 layers"),
    ("pools-meta", lambda b: ([p.to("meta") for p in b["pools"]], b["table"], b["n"], {}),
     ValueError, r"pools are on meta .*move the pools"),
    ("page-id-range",
     lambda b: (b["pools"], b["table"].masked_fill(b["table"] == 1, 99), b["n"], {}),
     ValueError, r"page_table\[0, 1\] = 99"),
    ("page-id-minus-1",
     lambda b: (b["pools"], b["table"].masked_fill(b["table"] == 1, -1), b["n"], {}),
     ValueError, r"page_table\[0, 1\] = -1"),
    ("n-chunks-long", lambda b: (b["pools"], b["table"], b["n"] + 200, {}), ValueError,
     "n_chunks must be in"),
    ("n-chunks-negative", lambda b: (b["pools"], b["table"], b["n"] - 6, {}), ValueError,
     "n_chunks must be in"),
    ("n-chunks-int16", lambda b: (b["pools"], b["table"], b["n"].to(torch.int16), {}), TypeError,
     "n_chunks must have one of dtypes"),
    ("table-1d", lambda b: (b["pools"], b["table"][0], b["n"], {}), ValueError,
     "page_table must have 2 dims"),
    ("table-int16", lambda b: (b["pools"], b["table"].to(torch.int16), b["n"], {}), TypeError,
     "page_table must have one of dtypes"),
    ("table-batch", lambda b: (b["pools"], b["table"][:1], b["n"][:1], {}), ValueError,
     "page_table has 1 requests"),
    ("max-chunks-short", lambda b: (b["pools"], b["table"], b["n"], {"max_chunks": 10}), ValueError,
     "max_chunks = 10"),
    ("max-chunks-bool", lambda b: (b["pools"], b["table"], b["n"], {"max_chunks": True}),
     ValueError,
     "max_chunks must be"),
    # Past int64 / too large to allocate: refused by name, not a torch overflow after a launch.
    ("max-chunks-2**64", lambda b: (b["pools"], b["table"], b["n"], {"max_chunks": 2 ** 64}),
     ValueError, "max_chunks = 18446744073709551616 is too large"),
    ("max-chunks-2**60", lambda b: (b["pools"], b["table"], b["n"], {"max_chunks": 2 ** 60}),
     ValueError, "max_chunks = 1152921504606846976 is too large"),
]

VARLEN_BAD = [
    ("cu-decreasing", lambda b: (b["keys"], b["cu"].flip(0), {}), ValueError, "non-decreasing"),
    ("cu-range", lambda b: (b["keys"], b["cu"] + 1, {}), ValueError,
     r"cu_chunks\[-1\] = 76 exceeds"),
    ("cu-float", lambda b: (b["keys"], b["cu"].float(), {}), TypeError,
     "cu_chunks must have one of"),
    ("cu-empty", lambda b: (b["keys"], b["cu"][:0], {}), ValueError,
     r"cu_chunks must be \[B \+ 1\]"),
    ("cu-batch", lambda b: (b["keys"], b["cu"][:2], {}), ValueError,
     "cu_chunks describes 1 requests"),
    ("keys-list-length", lambda b: (b["keys"][:1], b["cu"], {}), ValueError,
     "per-layer keys hold 1 layers"),
    ("keys-meta", lambda b: ([k.to("meta") for k in b["keys"]], b["cu"], {}), ValueError,
     "keys are on meta"),
    ("keys-int8", lambda b: ([k.view(torch.int8) for k in b["keys"]], b["cu"], {}), TypeError,
     r"keys\[0\].*uint8"),
    ("max-chunks-short", lambda b: (b["keys"], b["cu"], {"max_chunks": 10}), ValueError,
     "shorter than the longest"),
    ("max-chunks-2**64", lambda b: (b["keys"], b["cu"], {"max_chunks": 2 ** 64}), ValueError,
     "max_chunks = 18446744073709551616 is too large"),
    ("max-chunks-2**60", lambda b: (b["keys"], b["cu"], {"max_chunks": 2 ** 60}), ValueError,
     "max_chunks = 1152921504606846976 is too large"),
]


@pytest.mark.parametrize("mutate,exc,msg", [pytest.param(*c[1:], id=c[0]) for c in PAGED_BAD])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_retriever_score_paged_refuses_before_any_launch(mutate, exc, msg, backend, device,
                                                         launches):
    model, _ = build(device, backend=backend)
    b = _serving_batch(device)
    pools, table, n, kw = mutate(b)
    with pytest.raises(exc, match=msg):
        model.score_paged(b["hidden"], pools, table, n, b["pos"], **kw)
    assert launches["n"] == 0
    model.score_paged(b["hidden"], b["pools"], b["table"], b["n"], b["pos"])  # the valid call
    assert launches["n"] == (2 if backend == "triton" else 0)


@pytest.mark.parametrize("mutate,exc,msg", [pytest.param(*c[1:], id=c[0]) for c in VARLEN_BAD])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_retriever_score_varlen_refuses_before_any_launch(mutate, exc, msg, backend, device,
                                                          launches):
    model, _ = build(device, backend=backend)
    b = _serving_batch(device)
    keys, cu, kw = mutate(b)
    with pytest.raises(exc, match=msg):
        model.score_varlen(b["hidden"], keys, cu, b["pos"], **kw)
    assert launches["n"] == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch_returns_empty_on_both_backends(backend, device):
    model, _ = build(device, backend=backend)
    hidden, ck, pos = inputs(device, 2, 9)
    e_h, e_k, e_p = hidden[:0], ck[:0], pos[:0]
    assert model.ensemble(e_h, e_k, e_p).shape == (0, 9)
    assert model.logits(e_h, e_k, e_p).shape == (3, 0, 9)
    assert model.select_topk(e_h, e_k, e_p, top_k=2).shape == (0, 9)
    from flashmemory_triton import paged as P
    pb = P.pack_pool([])
    out = model.score_paged(e_h, torch.zeros(1, C.PAGE_BYTES, dtype=torch.uint8, device=device),
                            pb.page_table.to(device), pb.n_chunks.to(device), e_p,
                            return_logits=True)
    assert out.scores.shape == (0, 0) and out.logits.shape == (3, 0, 0)
