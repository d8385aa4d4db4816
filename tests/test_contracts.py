"""The input contract of every public entry point, property-based (issue 14).

For each entry point hypothesis draws dtypes, shapes, memory layouts (storage order, strides,
storage offsets, with the bytes around a view poisoned) and values, then asserts only the
contract:

* a valid input gives exactly (``torch.equal``, NaN equal to NaN) the answer of the canonical
  input: the same values, contiguous, at storage offset 0 (positions as int64);
* an invalid input (one drawn fault applied to a valid one) raises ``TypeError`` or
  ``ValueError`` whose message names the faulty argument, before any kernel launches (the
  launchers are wrapped and counted);
* either way no object's state changes: the retriever's buffers, the offload engine's history,
  tables and reserve, and every input tensor the caller passed.

Settings: tiny shapes, a few dozen derandomized examples (the Triton interpreter is slow; CI
runs on two cores), no example database. ``FLASHMEMORY_FUZZ_EXAMPLES`` raises the counts.
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _helpers import make_layer_states
from flashmemory_triton import FlashMemoryRetriever, ops, select_resident
from flashmemory_triton import constants as C
from flashmemory_triton import paged as P
from flashmemory_triton.offload import OffloadEngine
from flashmemory_triton.torch_fast import score_chunks_fast
from kernel_cases import make_keys

EXAMPLES = int(os.environ.get("FLASHMEMORY_FUZZ_EXAMPLES", "0")) or None
HIDDEN, RANK, HEADS, LAYERS = 64, 32, 4, 3
BACKENDS = ("torch", "cpu", "triton")


def contract(examples: int):
    return settings(max_examples=EXAMPLES or examples, deadline=None, derandomize=True,
                    database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


# --- layouts ------------------------------------------------------------------------------------
def _poison(dtype):
    if dtype.is_floating_point:
        return float("nan")
    if dtype == torch.bool:
        return True
    return 0x7F if dtype == torch.uint8 else -1  # 0x7F: an e4m3 NaN byte


@st.composite
def layouts(draw, ndim: int):
    """(storage order, per-dim step, storage offset in elements) for a tensor of ``ndim``."""
    perm = draw(st.permutations(range(ndim))) if ndim else []
    steps = [draw(st.sampled_from([1, 1, 2])) for _ in range(ndim)]
    return list(perm), steps, draw(st.sampled_from([0, 0, 1, 3]))


def relayout(t: torch.Tensor, layout) -> torch.Tensor:
    """``t``'s values in another memory layout, the elements around it poisoned."""
    perm, steps, offset = layout
    if t.dim() == 0:
        return t.clone()
    shape = [t.shape[d] * steps[d] for d in perm]
    buf = torch.full((math.prod(shape) + offset,), _poison(t.dtype), dtype=t.dtype,
                     device=t.device)
    base = buf[offset:].view(shape)[tuple(slice(None, None, steps[d]) for d in perm)]
    inverse = sorted(range(len(perm)), key=lambda i: perm[i])
    view = base.permute(inverse)
    view.copy_(t)
    assert torch.equal(view, t) or (t.is_floating_point() and
                                    torch.equal(view.nan_to_num(), t.nan_to_num()))
    return view


def same(a, b) -> bool:
    """Bitwise equality of results (tensors, tuples, dicts, NamedTuples), NaN equal to NaN."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point():
            return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
        return torch.equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def snapshot(*objs):
    """Clones of every tensor reachable in ``objs`` (tensors, lists, modules, engines)."""
    out = []
    for o in objs:
        if isinstance(o, torch.Tensor):
            out.append(o.clone() if o.device.type != "meta" else (o.shape, o.dtype, o.stride()))
        elif isinstance(o, (list, tuple)):
            out.append(snapshot(*o))
        elif isinstance(o, torch.nn.Module):
            out.append({k: v.clone() for k, v in list(o.state_dict().items()) +
                        [("rope_freqs", o.rope_freqs)]})
        elif isinstance(o, OffloadEngine):
            out.append(dict(data=o.history.data.clone(), lengths=o.history.lengths.clone(),
                            page_cell=o.page_cell.clone(), lookup=o._lookup.clone(),
                            reserve=o.reserve.clone(), cells=torch.stack(
                                [o.cell_row, o.cell_page, o.cell_valid, o.cell_loaded,
                                 o.cell_used]).clone(), cycle=o.cycle, totals=dict(o.totals)))
        else:
            out.append(o)
    return out


def refused(call, exc_names, launches, state, *objs):
    """``call`` raises TypeError/ValueError naming one of ``exc_names``, nothing launched,
    nothing changed."""
    before = launches["n"]
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    msg = str(info.value)
    assert any(re.search(name, msg) for name in exc_names), \
        f"the error does not name {exc_names}: {type(info.value).__name__}: {msg}"
    assert launches["n"] == before, f"a kernel launched before the refusal: {msg}"
    assert same(snapshot(*objs), state), f"state changed by a refused call: {msg}"


# --- the retriever --------------------------------------------------------------------------------
_MODELS: dict = {}


def model(backend: str) -> FlashMemoryRetriever:
    if backend not in _MODELS:
        states = make_layer_states(hidden=HIDDEN, rank=RANK, n_heads=HEADS)
        _MODELS[backend] = FlashMemoryRetriever(states, backend=backend, max_position=4096,
                                                logit_offset=0.125)
    return _MODELS[backend]


def _keys(shape, g, raw: bool) -> torch.Tensor:
    """Row-format keys: realistic (make_keys) or raw random bytes (NaN bytes, huge, infinite
    and NaN scales included)."""
    if raw:
        return torch.randint(0, 256, (*shape, C.CHUNK_BYTES), dtype=torch.uint8, generator=g)
    return make_keys(shape, g)


_POS_RANGE = {torch.int8: 127, torch.uint8: 255, torch.int16: 32767, torch.int32: 10 ** 6,
              torch.int64: 10 ** 7}

RETRIEVER_FAULTS = {
    "hidden-int": ("hidden", lambda a: a.update(hidden=a["hidden"].long())),
    "hidden-width": ("hidden", lambda a: a.update(hidden=a["hidden"][..., :-1])),
    "hidden-1d": ("hidden", lambda a: a.update(hidden=a["hidden"].flatten())),
    "hidden-list": ("hidden", lambda a: a.update(hidden=a["hidden"].tolist())),
    "keys-int8": ("compressed_k",
                  lambda a: a.update(compressed_k=a["compressed_k"].view(torch.int8))),
    "keys-width": ("compressed_k", lambda a: a.update(compressed_k=a["compressed_k"][..., :-4])),
    "keys-batch": ("compressed_k", lambda a: a.update(compressed_k=torch.cat(
        [a["compressed_k"], a["compressed_k"].new_zeros(
            *a["compressed_k"].shape[:-3], 1, *a["compressed_k"].shape[-2:])], dim=-3))),
    "keys-meta": ("compressed_k|meta",
                  lambda a: a.update(compressed_k=a["compressed_k"].to("meta"))),
    "pos-float": ("positions", lambda a: a.update(positions=a["positions"].float())),
    "pos-bool": ("positions", lambda a: a.update(positions=a["positions"] > 0)),
    "pos-2d": ("positions", lambda a: a.update(positions=a["positions"][:, None])),
    "pos-length": ("positions", lambda a: a.update(positions=torch.cat(
        [a["positions"], a["positions"][:1] * 0]))),
    "pos-negative": ("positions", lambda a: a.update(positions=a["positions"].long() - 10 ** 8)),
    "mode": ("mode", lambda a: a.update(mode="min")),
    "top-k": ("top_k", lambda a: a.update(top_k=-1)),
    "layer-name": ("layer|l99", lambda a: a.update(name="l99")),
}


@st.composite
def retriever_cases(draw):
    B, N = draw(st.integers(0, 3)), draw(st.integers(0, 9))
    pdtype = draw(st.sampled_from(list(_POS_RANGE)))
    case = dict(
        backend=draw(st.sampled_from(BACKENDS)), B=B, N=N,
        method=draw(st.sampled_from(["logits", "ensemble", "score_layer", "forward",
                                     "select_topk"])),
        per_h=draw(st.booleans()), per_k=draw(st.booleans()),
        hdtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        pdtype=pdtype, raw=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 31 - 1)),
        pos=draw(st.lists(st.integers(0, _POS_RANGE[pdtype]), min_size=B, max_size=B)),
        mode=draw(st.sampled_from(["max", "mean"])), top_k=draw(st.integers(0, 12)),
        layer=draw(st.sampled_from(list(C.LAYER_NAMES))),
    )
    case["lh"] = draw(layouts(3 if case["per_h"] else 2))
    case["lk"] = draw(layouts(4 if case["per_k"] else 3))
    case["lp"] = draw(layouts(1))
    faults = [k for k in RETRIEVER_FAULTS
              if not (k == "pos-negative" and B == 0)
              and not (k == "mode" and case["method"] not in ("ensemble", "select_topk"))
              and not (k == "top-k" and case["method"] != "select_topk")
              and not (k == "layer-name" and case["method"] != "score_layer")]
    case["fault"] = draw(st.none() | st.sampled_from(faults))
    return case


def _retriever_call(m, method, a):
    h, k, p = a["hidden"], a["compressed_k"], a["positions"]
    if method == "logits":
        return m.logits(h, k, p)
    if method == "forward":
        return m(h, k, p, apply_sigmoid=a["mode"] == "max")
    if method == "score_layer":
        return m.score_layer(a["name"], h, k, p)
    if method == "ensemble":
        return m.ensemble(h, k, p, mode=a["mode"])
    return m.select_topk(h, k, p, top_k=a["top_k"], mode=a["mode"])


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN/overflow in the interpreter's numpy
@contract(45)
@given(case=retriever_cases())
def test_retriever_calls_keep_the_contract(case, launches):
    m = model(case["backend"])
    g = torch.Generator().manual_seed(case["seed"])
    B, N = case["B"], case["N"]
    lead = (LAYERS,) if case["per_h"] else ()
    hidden = (torch.randn(*lead, B, HIDDEN, generator=g) * 3).to(case["hdtype"])
    keys = _keys(((LAYERS,) if case["per_k"] else ()) + (B, N), g, case["raw"])
    pos = torch.tensor(case["pos"], dtype=torch.int64)
    canon = dict(hidden=hidden, compressed_k=keys, positions=pos, mode=case["mode"],
                 top_k=case["top_k"], name=case["layer"])
    args = dict(canon, hidden=relayout(hidden, case["lh"]),
                compressed_k=relayout(keys, case["lk"]),
                positions=relayout(pos.to(case["pdtype"]), case["lp"]))
    if case["fault"] is not None:
        name, mutate = RETRIEVER_FAULTS[case["fault"]]
        mutate(args)
        state = snapshot(m, args["hidden"], args["compressed_k"], args["positions"])
        refused(lambda: _retriever_call(m, case["method"], args), name.split("|"), launches,
                state, m, args["hidden"], args["compressed_k"], args["positions"])
        return
    state = snapshot(m, args["hidden"], args["compressed_k"], args["positions"])
    want = _retriever_call(m, case["method"], canon)
    got = _retriever_call(m, case["method"], args)
    assert same(got, want), f"{case['method']} on a relayout differs from the contiguous call"
    assert same(snapshot(m, args["hidden"], args["compressed_k"], args["positions"]), state)


# --- ops: prepare_queries / score_prepared / score_chunks, and torch_fast ------------------------
OPS_FAULTS = {
    "q-int": ("q_proj", lambda a: a.update(q_proj=a["q_proj"].long())),
    "q-head-dim": ("q_proj", lambda a: a.update(q_proj=a["q_proj"][..., :64])),
    "w-shape": ("w", lambda a: a.update(w=a["w"][..., :-1])),
    "w-int": ("w", lambda a: a.update(w=a["w"].int())),
    "pos-float": ("positions", lambda a: a.update(positions=a["positions"].double())),
    "pos-negative": ("positions", lambda a: a.update(positions=a["positions"].long() - 10 ** 8)),
    "keys-float": ("compressed_k", lambda a: a.update(compressed_k=a["compressed_k"].float())),
    "keys-batch": ("compressed_k",
                   lambda a: a.update(compressed_k=a["compressed_k"][..., :0, :, :])),
    "max-position": ("max_position", lambda a: a.update(max_position=True)),
    "ensemble": ("ensemble", lambda a: a.update(ensemble="sum")),
    "logit-offset": ("logit_offset", lambda a: a.update(logit_offset=float("nan"))),
}


@st.composite
def ops_cases(draw):
    B = draw(st.integers(1, 3))
    pdtype = draw(st.sampled_from(list(_POS_RANGE)))
    per_k = draw(st.booleans())
    case = dict(
        entry=draw(st.sampled_from(["score_chunks", "prepare+score", "torch_fast"])),
        backend=draw(st.sampled_from(BACKENDS)),
        precision=draw(st.sampled_from(["bf16", "fp32", "fp8", "tf32"])),
        L=draw(st.integers(1, 3)), B=B, H=draw(st.integers(1, 5)), N=draw(st.integers(0, 9)),
        per_k=per_k, qdtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        pdtype=pdtype, raw=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 31 - 1)),
        pos=draw(st.lists(st.integers(0, _POS_RANGE[pdtype]), min_size=B, max_size=B)),
        ensemble=draw(st.sampled_from(["max", "mean"])),
        offset=draw(st.sampled_from([0.0, -1.5])),
        max_position=draw(st.sampled_from([4096, C.MAX_POSITION_RELEASE, 2 ** 64])),
        lq=draw(layouts(4)), lw=draw(layouts(3)), lk=draw(layouts(4 if per_k else 3)),
        lp=draw(layouts(1)),
    )
    faults = [k for k in OPS_FAULTS if not (case["entry"] == "torch_fast" and k == "logit-offset")]
    case["fault"] = draw(st.none() | st.sampled_from(faults))
    return case


def _ops_call(case, a):
    kw = dict(max_position=a["max_position"], ensemble=a["ensemble"], return_logits=True)
    if case["entry"] == "torch_fast":
        precision = "fp32" if case["precision"] in ("fp32", "tf32") else "bf16"
        return score_chunks_fast(a["q_proj"], a["w"], a["positions"], a["compressed_k"],
                                 precision=precision, **kw)
    kw["logit_offset"] = a["logit_offset"]
    if case["entry"] == "score_chunks":
        return ops.score_chunks(a["q_proj"], a["w"], a["positions"], a["compressed_k"],
                                precision=case["precision"], backend=case["backend"], **kw)
    prep = ops.prepare_queries(a["q_proj"], a["w"], a["positions"],
                               max_position=a["max_position"], precision=case["precision"],
                               backend=case["backend"])
    kw.pop("max_position")
    return prep, ops.score_prepared(prep, a["compressed_k"], **kw)


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@contract(40)
@given(case=ops_cases())
def test_ops_keep_the_contract(case, launches):
    g = torch.Generator().manual_seed(case["seed"])
    L, B, H, N = case["L"], case["B"], case["H"], case["N"]
    q = torch.randn(L, B, H, C.HEAD_DIM, generator=g).to(case["qdtype"])
    w = (torch.randn(L, B, H, generator=g) / 8).to(case["qdtype"])
    keys = _keys(((L,) if case["per_k"] else ()) + (B, N), g, case["raw"])
    pos = torch.tensor(case["pos"], dtype=torch.int64)
    canon = dict(q_proj=q, w=w, positions=pos, compressed_k=keys, ensemble=case["ensemble"],
                 logit_offset=case["offset"], max_position=case["max_position"])
    args = dict(canon, q_proj=relayout(q, case["lq"]), w=relayout(w, case["lw"]),
                positions=relayout(pos.to(case["pdtype"]), case["lp"]),
                compressed_k=relayout(keys, case["lk"]))
    tensors = lambda: [args[k] for k in ("q_proj", "w", "positions", "compressed_k")]  # noqa: E731
    if case["fault"] is not None:
        name, mutate = OPS_FAULTS[case["fault"]]
        mutate(args)
        if case["entry"] == "prepare+score" and name in ("compressed_k", "ensemble",
                                                         "logit_offset"):
            # score_prepared's own arguments: the query kernel of prepare_queries ran first
            # (legitimately); score_prepared itself must refuse before its launch.
            prep = ops.prepare_queries(args["q_proj"], args["w"], args["positions"],
                                       precision=case["precision"], backend=case["backend"])
            call = lambda: ops.score_prepared(prep, args["compressed_k"],  # noqa: E731
                                              ensemble=args["ensemble"],
                                              logit_offset=args["logit_offset"])
        else:
            call = lambda: _ops_call(case, args)  # noqa: E731
        refused(call, [name], launches, snapshot(*tensors()), *tensors())
        return
    state = snapshot(*tensors())
    want = _ops_call(case, canon)
    got = _ops_call(case, args)
    assert same(got, want), f"{case['entry']} on a relayout differs from the contiguous call"
    assert same(snapshot(*tensors()), state)


# --- serving batches: the retriever's score_paged / score_varlen --------------------------------
PAGED_FAULTS = {
    "pools-int8": ("pools", lambda a: a.update(pools=[p.view(torch.int8) for p in a["pools"]])),
    "pools-rows": ("pools|ROW", lambda a: a.update(pools=a["pools"][0].view(-1, 64, 132))),
    "pools-count": ("pools", lambda a: a.update(pools=a["pools"][:2])),
    "pools-meta": ("pools", lambda a: a.update(pools=[p.to("meta") for p in a["pools"]])),
    "table-int16": ("page_table", lambda a: a.update(page_table=a["page_table"].to(torch.int16))),
    "table-1d": ("page_table", lambda a: a.update(page_table=a["page_table"].flatten())),
    "table-id": ("page_table", lambda a: a.update(page_table=a["page_table"].masked_fill(
        a["page_table"] >= 0, 10 ** 6))),
    "n-long": ("n_chunks", lambda a: a.update(n_chunks=a["n_chunks"] + 10 ** 4)),
    "n-negative": ("n_chunks", lambda a: a.update(n_chunks=a["n_chunks"] - 10 ** 4)),
    "n-int16": ("n_chunks", lambda a: a.update(n_chunks=a["n_chunks"].to(torch.int16))),
    "max-chunks": ("max_chunks|n_chunks", lambda a: a.update(max_chunks=-1)),
    "cu-decreasing": ("cu_chunks", lambda a: a.update(cu_chunks=torch.cat(
        [a["cu_chunks"][1:2] + 1, a["cu_chunks"][1:]]))),
    "cu-float": ("cu_chunks", lambda a: a.update(cu_chunks=a["cu_chunks"].double())),
    "cu-empty": ("cu_chunks", lambda a: a.update(cu_chunks=a["cu_chunks"][:0])),
    "cu-beyond": ("cu_chunks", lambda a: a.update(cu_chunks=a["cu_chunks"] + 10 ** 4)),
    "keys-count": ("keys", lambda a: a.update(keys=a["keys"][:1])),
    "keys-int8": ("keys", lambda a: a.update(keys=[k.view(torch.int8) for k in a["keys"]])),
    "hidden-batch": ("hidden|requests|B=|positions", lambda a: a.update(hidden=a["hidden"][:, :0])),
    "positions": ("positions", lambda a: a.update(positions=a["positions"].float())),
}
_VARLEN_ONLY = ("cu-", "keys-")
_PAGED_ONLY = ("pools-", "table-", "n-", "max-chunks")


@st.composite
def serving_cases(draw):
    B = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["paged", "varlen"]))
    case = dict(kind=kind, backend=draw(st.sampled_from(BACKENDS)), B=B,
                lengths=draw(st.lists(st.integers(0, 70), min_size=B, max_size=B)),
                index=draw(st.sampled_from([torch.int32, torch.int64])),
                seed=draw(st.integers(0, 2 ** 31 - 1)), mode=draw(st.sampled_from(["max", "mean"])),
                lp=draw(layouts(2)), lt=draw(layouts(2)), ln=draw(layouts(1)),
                lk=draw(layouts(2)), lh=draw(layouts(3)))
    skip = _VARLEN_ONLY if kind == "paged" else _PAGED_ONLY
    faults = [k for k in PAGED_FAULTS if not k.startswith(skip)]
    case["fault"] = draw(st.none() | st.sampled_from(faults))
    return case


def _serving_call(m, case, a):
    if case["kind"] == "paged":
        return m.score_paged(a["hidden"], a["pools"], a["page_table"], a["n_chunks"],
                             a["positions"], mode=case["mode"], return_logits=True,
                             max_chunks=a["max_chunks"])
    return m.score_varlen(a["hidden"], a["keys"], a["cu_chunks"], a["positions"],
                          mode=case["mode"], return_logits=True, max_chunks=a["max_chunks"])


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@contract(30)
@given(case=serving_cases())
def test_serving_batches_keep_the_contract(case, launches):
    m = model(case["backend"])
    g = torch.Generator().manual_seed(case["seed"])
    reqs = [make_keys((LAYERS, n), g) for n in case["lengths"]]
    pb = P.pack_pool(reqs, index_dtype=case["index"])
    vb = P.pack_varlen(reqs)
    hidden = torch.randn(LAYERS, case["B"], HIDDEN, generator=g)
    canon = dict(hidden=hidden, pools=list(pb.pool.unbind(0)), page_table=pb.page_table,
                 n_chunks=pb.n_chunks.to(case["index"]), keys=list(vb.keys.unbind(0)),
                 cu_chunks=vb.cu_chunks.to(case["index"]),
                 positions=torch.arange(case["B"]) * 1000, max_chunks=None)
    args = dict(canon, hidden=relayout(hidden, case["lh"]),
                pools=[relayout(p, case["lp"]) for p in canon["pools"]],
                page_table=relayout(canon["page_table"], case["lt"]),
                n_chunks=relayout(canon["n_chunks"], case["ln"]),
                keys=[relayout(k, case["lk"]) for k in canon["keys"]],
                cu_chunks=relayout(canon["cu_chunks"], case["ln"]))
    names = ("hidden", "pools", "page_table", "n_chunks", "keys", "cu_chunks", "positions")
    tensors = lambda: [args[k] for k in names]  # noqa: E731
    if case["fault"] is not None:
        name, mutate = PAGED_FAULTS[case["fault"]]
        mutate(args)
        refused(lambda: _serving_call(m, case, args), name.split("|"), launches,
                snapshot(m, *tensors()), m, *tensors())
        return
    state = snapshot(m, *tensors())
    want = _serving_call(m, case, canon)
    try:
        got = _serving_call(m, case, args)
    except ValueError as exc:  # documented: the kernel reads pools in place, 8448-byte pages
        assert case["backend"] == "triton" and case["kind"] == "paged", exc
        assert re.search("pool", str(exc)), exc
        return
    assert same(got, want), f"{case['kind']} on a relayout differs from the contiguous call"
    assert same(snapshot(m, *tensors()), state)


# --- selection ----------------------------------------------------------------------------------
SELECT_FAULTS = {
    "scores-int": ("scores", lambda a: a.update(scores=(a["scores"] * 8).long())),
    "scores-1d": ("scores", lambda a: a.update(scores=a["scores"].flatten())),
    "n-long": ("n_chunks", lambda a: a.update(n_chunks=a["n_chunks"].long() + 10 ** 4)),
    "n-float": ("n_chunks", lambda a: a.update(n_chunks=a["n_chunks"].float())),
    "recent": ("recent", lambda a: a.update(recent=2 ** 64)),
    "page-size": ("page_size", lambda a: a.update(page_size=0)),
    "threshold": ("threshold", lambda a: a.update(threshold=float("nan"))),
}


@st.composite
def selection_cases(draw):
    B, N = draw(st.integers(0, 3)), draw(st.integers(0, 40))
    grid = st.one_of(st.integers(0, 8).map(lambda i: i / 8), st.just(float("nan")))
    return dict(
        scores=draw(st.lists(st.lists(grid, min_size=N, max_size=N), min_size=B, max_size=B)),
        B=B, N=N, lengths=draw(st.lists(st.integers(0, N), min_size=B, max_size=B)),
        sdtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16,
                                     torch.float64])),
        ndtype=draw(st.sampled_from([torch.int8, torch.uint8, torch.int16, torch.int32,
                                     torch.int64])) if N < 127 else torch.int64,
        mode=draw(st.sampled_from(["chunk", "page", "topk"])),
        recent=draw(st.integers(0, N + 3) | st.just(2 ** 63 - 1)), sink=draw(st.integers(0, 5)),
        page_size=draw(st.integers(1, 20) | st.just(2 ** 62)), max_pages=draw(st.integers(0, 6)),
        top_k=draw(st.integers(0, N + 3)), ls=draw(layouts(2)), ln=draw(layouts(1)),
        fault=draw(st.none() | st.sampled_from(list(SELECT_FAULTS))))


@contract(60)
@given(case=selection_cases())
def test_select_resident_keeps_the_contract(case, launches):
    scores = torch.tensor(case["scores"], dtype=torch.float32).view(case["B"], case["N"])
    scores = scores.to(case["sdtype"])
    n = torch.tensor(case["lengths"], dtype=torch.int64)
    kw = dict(recent=case["recent"], sink=case["sink"], page_size=case["page_size"],
              max_pages=case["max_pages"], threshold=0.5)
    if case["mode"] == "topk":
        kw = dict(top_k=case["top_k"])
    canon = dict(scores=scores, n_chunks=n, **kw)
    args = dict(canon, scores=relayout(scores, case["ls"]),
                n_chunks=relayout(n.to(case["ndtype"]), case["ln"]))
    call = lambda a: select_resident(a["scores"], mode=case["mode"],  # noqa: E731
                                     **{k: v for k, v in a.items() if k != "scores"})
    if case["fault"] is not None:
        name, mutate = SELECT_FAULTS[case["fault"]]
        mutate(args)
        if case["mode"] == "topk" and name in ("recent", "page_size", "threshold"):
            args.pop(name)  # topk takes its own arguments; the fault is for the others
            args["top_k"] = -1
            name = "top_k"
        if name == "n_chunks" and case["B"] == 0 and case["fault"] == "n-long":
            return  # no value to be out of range
        refused(lambda: call(args), [name], launches,
                snapshot(args["scores"], args["n_chunks"]), args["scores"], args["n_chunks"])
        return
    state = snapshot(args["scores"], args["n_chunks"])
    got, want = call(args), call(canon)
    for field in ("mask", "pages", "n_selected", "n_real", "n_hits", "fallback"):
        assert same(getattr(got, field), getattr(want, field)), field
    assert same(snapshot(args["scores"], args["n_chunks"]), state)


# --- the offload engine -------------------------------------------------------------------------
ENGINE_FAULTS = {
    "payload-dtype": ("payload", lambda a: a.update(payload=a["payload"].to(torch.int16))),
    "payload-meta": ("payload", lambda a: a.update(payload=a["payload"].to("meta"))),
    "payload-width": ("payload", lambda a: a.update(payload=a["payload"][..., :-1])),
    "counts-range": ("counts", lambda a: a.update(counts=[10 ** 4] * len(a["counts"]))),
    "counts-float": ("counts", lambda a: a.update(counts=[0.5] * len(a["counts"]))),
    "mask-float": ("resident mask", lambda a: a.update(mask=a["mask"].float())),
    "mask-past": ("resident mask|past", lambda a: a.update(mask=torch.ones(
        a["mask"].shape[0], a["mask"].shape[1] + 200, dtype=torch.bool))),
    "mask-meta": ("resident mask", lambda a: a.update(mask=a["mask"].to("meta"))),
    "mask-too-big": ("reserve_pages", lambda a: a.update(mask=a["real"].clone())),
}


@st.composite
def engine_cases(draw):
    B = draw(st.integers(1, 3))
    return dict(B=B, N0=draw(st.integers(0, 20)), n=draw(st.integers(0, 12)),
                counts=draw(st.lists(st.integers(0, 12), min_size=B, max_size=B)),
                reserve=draw(st.integers(0, 4)), page=draw(st.sampled_from([1, 4, 8])),
                row=draw(st.sampled_from([(8,), (2, 3)])),
                dtype=draw(st.sampled_from([torch.uint8, torch.float32, torch.bfloat16])),
                density=draw(st.floats(0, 1)), seed=draw(st.integers(0, 2 ** 31 - 1)),
                lpay=draw(layouts(4)), lmask=draw(layouts(2)),
                fault=draw(st.none() | st.sampled_from(list(ENGINE_FAULTS))))


def _engine_run(case, hist, a):
    eng = OffloadEngine.from_history(hist, reserve_pages=case["reserve"], page_size=case["page"])
    return eng, lambda: (eng.append(a["payload"], counts=a["counts"]),
                         eng.apply(a["mask"]))


@contract(50)
@given(case=engine_cases())
def test_offload_engine_keeps_the_contract(case, launches):
    g = torch.Generator().manual_seed(case["seed"])
    B, row = case["B"], case["row"]

    def data(n):
        x = torch.randn(B, n, *row, generator=g) * 100
        return x.to(case["dtype"]) if case["dtype"].is_floating_point else \
            x.abs().to(torch.uint8)
    hist = data(case["N0"])
    payload = data(case["n"])
    payload4 = payload if payload.dim() == 4 else payload.unsqueeze(-1)
    counts = [min(c, case["n"]) for c in case["counts"]]
    total = torch.tensor(counts) + case["N0"]
    width = int(total.max())
    mask = torch.rand(B, width, generator=g) < case["density"]
    mask &= torch.arange(width)[None, :] < total[:, None]
    # keep the set within the reserve: the first pages only, fewest first
    pages = -(-torch.arange(1, width + 1) // case["page"])
    budget = case["reserve"] // B
    mask &= (pages <= budget)[None, :]
    lay = relayout(payload4, case["lpay"])
    canon = dict(payload=payload, counts=counts, mask=mask)
    args = dict(canon, real=torch.arange(width)[None, :] < total[:, None],
                payload=lay if payload.dim() == 4 else lay[..., 0],
                mask=relayout(mask, case["lmask"]))
    if case["fault"] is not None:
        name, mutate = ENGINE_FAULTS[case["fault"]]
        mutate(args)
        eng = OffloadEngine.from_history(hist, reserve_pages=case["reserve"],
                                         page_size=case["page"])
        if name.startswith("resident mask") or name == "reserve_pages":
            eng.append(canon["payload"], counts=canon["counts"])
            need = int((-(-total // case["page"])).sum())  # pages of every chunk of every row
            if name == "reserve_pages" and need <= case["reserve"]:
                return  # every page fits: no fault to refuse
            call = lambda: eng.apply(args["mask"])  # noqa: E731
        else:
            call = lambda: eng.append(args["payload"], counts=args["counts"])  # noqa: E731
        refused(call, name.split("|"), launches, snapshot(eng, args["payload"], args["mask"]),
                eng, args["payload"], args["mask"])
        eng.check_consistency()
        return
    a, run_a = _engine_run(case, hist, args)
    b, run_b = _engine_run(case, hist, canon)
    state = snapshot(args["payload"], args["mask"])
    run_a()
    run_b()
    assert same(snapshot(a), snapshot(b)), "a relayout payload or mask changed the engine's state"
    assert same(snapshot(args["payload"], args["mask"]), state)
    a.check_consistency()


# --- converters and small helpers ---------------------------------------------------------------
def _converters(a):
    """Every format converter and small public helper on the arguments ``a``."""
    from flashmemory_triton import dequant_compressed_k, topk_mask
    from flashmemory_triton.selection import engine_page_ids, pages_from_mask
    out = dict(dequant=dequant_compressed_k(a["rows"]),
               pages=P.rows_to_pages(a["rows"]),
               back=P.pages_to_rows(a["pages"], a["n"]),
               varlen_rows=P.varlen_to_rows(a["varlen"], a["cu_chunks"]),
               unpacked=P.unpack_varlen(a["varlen"], a["cu_chunks"]),
               topk=topk_mask(a["scores"], a["top_k"]),
               page_mask=pages_from_mask(a["mask"], a["page_size"]),
               engine=engine_page_ids(a["page_ids"], a["page_table"]))
    return out


CONVERTER_FAULTS = {
    "rows-int8": ("compressed_k|rows", lambda a: a.update(rows=a["rows"].view(torch.int8))),
    "rows-width": ("compressed_k|rows", lambda a: a.update(rows=a["rows"][..., :-1])),
    "pages-width": ("pages", lambda a: a.update(pages=a["pages"][..., :-1])),
    "pages-n": ("n_chunks", lambda a: a.update(n=10 ** 6)),
    "varlen-float": ("keys", lambda a: a.update(varlen=a["varlen"].float())),
    "cu-beyond": ("cu_chunks", lambda a: a.update(cu_chunks=a["cu_chunks"] + 10 ** 4)),
    "top-k": ("top_k", lambda a: a.update(top_k=-2)),
    "mask-int": ("mask", lambda a: a.update(mask=a["mask"].int())),
    "page-size": ("page_size", lambda a: a.update(page_size=0)),
    "page-table-float": ("page_table", lambda a: a.update(page_table=a["page_table"].float())),
    "page-ids-past": ("page_table|pages", lambda a: a.update(page_ids=a["page_ids"] + 10 ** 3)),
}


@st.composite
def converter_cases(draw):
    N, P_ = draw(st.integers(0, 130)), draw(st.integers(1, 3))
    return dict(N=N, P=P_, B=draw(st.integers(1, 3)), lead=draw(st.sampled_from([(), (2,)])),
                seed=draw(st.integers(0, 2 ** 31 - 1)), top_k=draw(st.integers(0, 6)),
                page_size=draw(st.integers(1, 9)), lr=draw(layouts(3)), lpg=draw(layouts(2)),
                lv=draw(layouts(2)), ls=draw(layouts(2)), lm=draw(layouts(2)),
                lt=draw(layouts(2)), li=draw(layouts(2)),
                fault=draw(st.none() | st.sampled_from(list(CONVERTER_FAULTS))))


@contract(40)
@given(case=converter_cases())
def test_converters_and_helpers_keep_the_contract(case, launches):
    g = torch.Generator().manual_seed(case["seed"])
    B, N = case["B"], case["N"]
    rows = _keys((2, N), g, raw=True)
    pages = torch.randint(0, 256, (case["P"], C.PAGE_BYTES), dtype=torch.uint8, generator=g)
    lengths = torch.randint(0, 5, (B,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    varlen = _keys((int(cu[-1]),), g, raw=True)
    scores = torch.rand(B, N, generator=g)
    mask = torch.rand(B, N, generator=g) < 0.3
    table = torch.randint(0, 50, (B, 4), generator=g, dtype=torch.int32)
    ids = torch.randint(-1, 4, (B, 3), generator=g)
    canon = dict(rows=rows, pages=pages, n=min(N, 64 * case["P"]), varlen=varlen, cu_chunks=cu,
                 scores=scores, top_k=case["top_k"], mask=mask, page_size=case["page_size"],
                 page_table=table, page_ids=ids)
    args = dict(canon, rows=relayout(rows, case["lr"]), pages=relayout(pages, case["lpg"]),
                varlen=relayout(varlen, case["lv"]), scores=relayout(scores, case["ls"]),
                mask=relayout(mask, case["lm"]), page_table=relayout(table, case["lt"]),
                page_ids=relayout(ids, case["li"]))
    names = ("rows", "pages", "varlen", "cu_chunks", "scores", "mask", "page_table", "page_ids")
    tensors = lambda: [args[k] for k in names]  # noqa: E731
    if case["fault"] is not None:
        name, mutate = CONVERTER_FAULTS[case["fault"]]
        mutate(args)
        refused(lambda: _converters(args), name.split("|"), launches, snapshot(*tensors()),
                *tensors())
        return
    state = snapshot(*tensors())
    assert same(_converters(args), _converters(canon))
    assert same(snapshot(*tensors()), state)


# --- the DeepGEMM drop-in: fp8_mqa_logits, fp8_paged_mqa_logits, get_paged_mqa_logits_metadata --
# Its contract differs in one way: q, kv and the paged weights must be contiguous (DeepGEMM's
# rule), so their layouts vary only in storage offset (a strided one is a fault, refused); the
# other tensors take any layout. fp8 tensors are relaid and snapshotted as their uint8 bytes.
FP8 = torch.float8_e4m3fn
DG_BACKENDS = ("torch", "triton")


def contiguous_at(offset: int):
    """A layout that keeps a tensor contiguous, at ``offset`` elements into a poisoned buffer."""
    return lambda t: relayout(t, (list(range(t.dim())), [1] * t.dim(), offset))


def _fp8_relayout(t: torch.Tensor, offset: int) -> torch.Tensor:
    return contiguous_at(offset)(t.view(torch.uint8)).view(FP8)


def _bytes(t):
    return t.view(torch.uint8) if isinstance(t, torch.Tensor) and t.dtype == FP8 else t


def _fp8(shape, g, raw: bool) -> torch.Tensor:
    """e4m3 values: raw random bytes (NaN bytes included) or quantized normals."""
    if raw:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).view(FP8)
    return (torch.randn(*shape, generator=g) * 2).to(FP8)


def _specified(out: torch.Tensor, inside: torch.Tensor, clean: bool) -> torch.Tensor:
    """The entries the contract fixes: every one when ``clean`` (-inf outside the keys), else
    those inside each row's keys (the rest is unspecified, as in DeepGEMM)."""
    return out if clean else torch.where(inside, out, torch.zeros_like(out))


MQA_FAULTS = {
    "q-strided": ("q", lambda a: a.update(q=torch.cat([a["q"], a["q"]], -1)[..., :C.HEAD_DIM])),
    "q-dtype": ("q", lambda a: a.update(q=a["q"].view(torch.uint8))),
    "q-head-dim": ("q", lambda a: a.update(q=a["q"][..., :64])),
    "kv-single": ("kv", lambda a: a.update(kv=a["kv"][0])),
    "kv-strided": ("kv", lambda a: a.update(kv=(torch.cat([a["kv"][0]] * 2, -1)[:, :C.HEAD_DIM],
                                                a["kv"][1]))),
    "kv-scale-length": (r"kv\[1\]", lambda a: a.update(kv=(a["kv"][0],
                                                          torch.cat([a["kv"][1], torch.ones(1)])))),
    "kv-scale-dtype": (r"kv\[1\]", lambda a: a.update(kv=(a["kv"][0], a["kv"][1].double()))),
    "weights-shape": ("weights", lambda a: a.update(
        weights=torch.cat([a["weights"], a["weights"][:, :1] * 0 + 1], 1))),
    "weights-dtype": ("weights", lambda a: a.update(weights=a["weights"].half())),
    "ks-float": ("cu_seq_len_k_start", lambda a: a.update(ks=a["ks"].float())),
    "ke-length": ("cu_seq_len_k_end",
                  lambda a: a.update(ke=torch.cat([a["ke"], a["ke"].new_zeros(1)]))),
    "ks-meta": ("cu_seq_len_k_start", lambda a: a.update(ks=a["ks"].to("meta"))),
    "max-seqlen-negative": ("max_seqlen_k", lambda a: a.update(max_seqlen_k=-1)),
    "max-seqlen-huge": ("max_seqlen_k", lambda a: a.update(max_seqlen_k=2 ** 62, clean=False)),
    "max-seqlen-bool": ("max_seqlen_k", lambda a: a.update(max_seqlen_k=True)),
    "clean-with-width": ("clean_logits", lambda a: a.update(max_seqlen_k=5, clean=True)),
    "clean-int": ("clean_logits", lambda a: a.update(clean=1)),
}


@st.composite
def mqa_cases(draw, fault=None):
    """A valid call, or (``fault``) one made invalid by that fault; sizes where the fault
    exists (a slice of one row or head is still contiguous)."""
    M = draw(st.integers(1 if fault == "q-strided" else 0, 3))
    N = draw(st.integers(2 if fault == "kv-strided" else 0, 9))
    H = draw(st.integers(2 if fault == "q-strided" else 1, 5))
    width = draw(st.sampled_from([0, 0, 1, 4, 11]))
    case = dict(backend=draw(st.sampled_from(DG_BACKENDS)), M=M, N=N, H=H, width=width,
                clean=draw(st.booleans()) and width == 0, raw=draw(st.booleans()),
                seed=draw(st.integers(0, 2 ** 31 - 1)),
                ks=draw(st.lists(st.integers(-3, N + 3), min_size=M, max_size=M)),
                ke=draw(st.lists(st.integers(-3, N + 3), min_size=M, max_size=M)),
                idtype=draw(st.sampled_from([torch.int32, torch.int64])),
                oq=draw(st.sampled_from([0, 1, 5])), ok=draw(st.sampled_from([0, 2])),
                os=draw(st.sampled_from([0, 3])), lw=draw(layouts(2)), lks=draw(layouts(1)),
                lke=draw(layouts(1)))
    case["lw"] = ([0, 1], case["lw"][1][:1] + [1], case["lw"][2])  # unit head stride (rule)
    case["fault"] = fault
    return case


def _mqa_call(case, a):
    from flashmemory_triton import deepgemm as dg
    return dg.fp8_mqa_logits(a["q"], a["kv"], a["weights"], a["ks"], a["ke"], a["clean"],
                             a["max_seqlen_k"], backend=case["backend"])


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@contract(40)
@given(case=mqa_cases())
def test_deepgemm_mqa_logits_keeps_the_contract(case, launches):
    _check_mqa(case, launches)


@pytest.mark.parametrize("fault", list(MQA_FAULTS))
@contract(3)
@given(data=st.data())
def test_deepgemm_mqa_logits_refuses_by_name(fault, data, launches):
    _check_mqa(data.draw(mqa_cases(fault)), launches)


def _check_mqa(case, launches):
    g = torch.Generator().manual_seed(case["seed"])
    M, N, H, width = case["M"], case["N"], case["H"], case["width"]
    q, k8 = _fp8((M, H, C.HEAD_DIM), g, case["raw"]), _fp8((N, C.HEAD_DIM), g, case["raw"])
    scale = torch.randn(N, generator=g) / 8
    w = torch.randn(M, H, generator=g)
    ks = torch.tensor(case["ks"], dtype=torch.int64).to(case["idtype"])
    ke = torch.tensor(case["ke"], dtype=torch.int64).to(case["idtype"])
    canon = dict(q=q, kv=(k8, scale), weights=w, ks=ks, ke=ke, clean=case["clean"],
                 max_seqlen_k=width)
    args = dict(canon, q=_fp8_relayout(q, case["oq"]),
                kv=(_fp8_relayout(k8, case["ok"]), contiguous_at(case["os"])(scale)),
                weights=relayout(w, case["lw"]), ks=relayout(ks, case["lks"]),
                ke=relayout(ke, case["lke"]))
    tensors = lambda: [_bytes(args["q"]), *map(_bytes, args["kv"]),  # noqa: E731
                       args["weights"], args["ks"], args["ke"]] \
        if isinstance(args["kv"], tuple) else [_bytes(args["q"]), _bytes(args["kv"])]
    if case["fault"] is not None:
        name, mutate = MQA_FAULTS[case["fault"]]
        mutate(args)
        refused(lambda: _mqa_call(case, args), [name], launches, snapshot(*tensors()),
                *tensors())
        return
    state, before = snapshot(*tensors()), launches["n"]
    want, got = _mqa_call(case, canon), _mqa_call(case, args)
    assert launches["n"] - before == 2 * (case["backend"] == "triton"), "not the backend asked"
    assert got.shape == want.shape == (M, width or N)
    lo = ks.long().clamp(0, N)
    hi = torch.maximum(ke.long().clamp(0, N), lo)
    j = torch.arange(width or N)
    inside = ((j[None] >= lo[:, None]) & (j[None] < hi[:, None]) if width == 0
              else j[None] < (hi - lo)[:, None])
    assert same(_specified(got, inside, case["clean"]), _specified(want, inside, case["clean"])), \
        "fp8_mqa_logits on a relayout differs from the contiguous call"
    assert same(snapshot(*tensors()), state)


PAGED_MQA_FAULTS = {
    "q-strided": ("q", lambda a: a.update(q=torch.cat([a["q"], a["q"]], -1)[..., :C.HEAD_DIM])),
    "q-dtype": ("q", lambda a: a.update(q=a["q"].view(torch.uint8))),
    "cache-int8": ("kv_cache", lambda a: a.update(kv_cache=a["kv_cache"].view(torch.int8))),
    "cache-block": ("kv_cache", lambda a: a.update(kv_cache=a["kv_cache"][:, :32])),
    "cache-width": ("kv_cache", lambda a: a.update(kv_cache=a["kv_cache"][..., :68])),
    "cache-misaligned": ("kv_cache", lambda a: a.update(kv_cache=a["misaligned"])),
    "weights-strided": ("weights", lambda a: a.update(
        weights=torch.cat([a["weights"]] * 2, 1)[:, ::2])),
    "weights-dtype": ("weights", lambda a: a.update(weights=a["weights"].double())),
    "lens-float": ("context_lens", lambda a: a.update(context_lens=a["context_lens"].float())),
    "lens-batch": ("context_lens", lambda a: a.update(
        context_lens=torch.cat([a["context_lens"], a["context_lens"][:1]]))),
    "table-int16": ("block_table", lambda a: a.update(block_table=a["block_table"].short())),
    "table-batch": ("block_table", lambda a: a.update(block_table=a["block_table"][:0])),
    "meta-int64": ("schedule_meta", lambda a: a.update(schedule_meta=a["schedule_meta"].long())),
    "meta-short": ("schedule_meta", lambda a: a.update(schedule_meta=a["schedule_meta"][:1])),
    "width-negative": ("max_context_len", lambda a: a.update(max_context_len=-1)),
    "width-huge": ("max_context_len", lambda a: a.update(max_context_len=2 ** 62)),
    "width-float": ("max_context_len", lambda a: a.update(max_context_len=8.0)),
    "clean-int": ("clean_logits", lambda a: a.update(clean=0)),
    "indices-length": ("indices", lambda a: a.update(
        indices=torch.zeros(a["weights"].shape[0] + 1, dtype=torch.int32))),
}


@st.composite
def paged_mqa_cases(draw, fault=None):
    B = draw(st.integers(1, 3))
    next_n = draw(st.integers(1, 1 if fault == "indices-length" else 2))
    H = draw(st.integers(2 if fault in ("q-strided", "weights-strided") else 1, 4))
    case = dict(backend=draw(st.sampled_from(DG_BACKENDS)), B=B, next_n=next_n, H=H,
                lengths=draw(st.lists(st.integers(0, 70), min_size=B, max_size=B)),
                two_d=draw(st.booleans()),  # an empty cache has no address to misalign:
                spare=draw(st.integers(1 if fault == "cache-misaligned" else 0, 2)),
                width=draw(st.sampled_from([0, 1, 40, 64, 80, 150])),
                clean=draw(st.booleans()), raw=draw(st.booleans()),
                idtype=draw(st.sampled_from([torch.int32, torch.int64])),
                num_sms=draw(st.integers(1, 5)), seed=draw(st.integers(0, 2 ** 31 - 1)),
                stride_pad=draw(st.sampled_from([0, 4, 16])), offset=draw(st.sampled_from([0, 4])),
                oq=draw(st.sampled_from([0, 1])), ow=draw(st.sampled_from([0, 3])),
                lc=draw(layouts(2)), lt=draw(layouts(2)), lm=draw(layouts(2)),
                with_indices=draw(st.booleans()))
    case["fault"] = fault
    return case


def _paged_pool(pages: torch.Tensor, stride: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``pages [P, 8448]`` as a ``[P, 64, 1, 132]`` cache with page stride ``stride`` bytes at
    byte ``offset`` of a poisoned buffer, and the same cache one byte further (misaligned)."""
    P = pages.shape[0]
    buf = torch.full((offset + P * stride + 1,), 0x7F, dtype=torch.uint8)
    view = buf[offset:offset + P * stride].view(P, stride)[:, :C.PAGE_BYTES]
    view.copy_(pages)
    shape, strides = (P, 64, 1, C.CHUNK_BYTES), (stride, C.CHUNK_BYTES, C.CHUNK_BYTES, 1)
    return (buf.as_strided(shape, strides, offset), buf.as_strided(shape, strides, offset + 1))


def _paged_mqa_call(case, a):
    from flashmemory_triton import deepgemm as dg
    return dg.fp8_paged_mqa_logits(a["q"], a["kv_cache"], a["weights"], a["context_lens"],
                                   a["block_table"], a["schedule_meta"], a["max_context_len"],
                                   a["clean"], a["indices"], backend=case["backend"])


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@contract(40)
@given(case=paged_mqa_cases())
def test_deepgemm_paged_mqa_logits_keeps_the_contract(case, launches):
    _check_paged_mqa(case, launches)


@pytest.mark.parametrize("fault", list(PAGED_MQA_FAULTS))
@contract(3)
@given(data=st.data())
def test_deepgemm_paged_mqa_logits_refuses_by_name(fault, data, launches):
    _check_paged_mqa(data.draw(paged_mqa_cases(fault)), launches)


def _check_paged_mqa(case, launches):
    from flashmemory_triton import deepgemm as dg
    g = torch.Generator().manual_seed(case["seed"])
    B, next_n, H, R = case["B"], case["next_n"], case["H"], case["B"] * case["next_n"]
    need = [-(-n // 64) for n in case["lengths"]]
    P = sum(need) + case["spare"]
    order = torch.randperm(P, generator=g)
    table = torch.full((B, max(need, default=0) + 1), -1, dtype=torch.int64)
    at = 0
    for b, k in enumerate(need):
        table[b, :k] = order[at:at + k]
        at += k
    table = table.to(case["idtype"])
    if case["raw"]:
        pages = torch.randint(0, 256, (P, C.PAGE_BYTES), dtype=torch.uint8, generator=g)
    else:
        fp8 = _fp8((P, 64 * C.HEAD_DIM), g, raw=False).view(torch.uint8)
        scales = (torch.rand(P, 64, generator=g) / 8).view(torch.uint8)
        pages = torch.cat([fp8, scales], 1)
    lens1 = torch.tensor(case["lengths"], dtype=torch.int64)
    if case["two_d"]:
        ctx = (torch.rand(B, next_n, generator=g) * (lens1[:, None] + 1)).long()
    else:
        ctx = lens1
    ctx = ctx.to(case["idtype"])
    q = _fp8((B, next_n, H, C.HEAD_DIM), g, case["raw"])
    w = torch.randn(R, H, generator=g)
    meta = dg.get_paged_mqa_logits_metadata(ctx, 64, case["num_sms"])
    indices = torch.arange(R, dtype=torch.int32) if case["with_indices"] and next_n == 1 \
        else None
    cache0, _ = _paged_pool(pages, C.PAGE_BYTES, 0)
    canon = dict(q=q, kv_cache=cache0, weights=w, context_lens=ctx, block_table=table,
                 schedule_meta=meta, max_context_len=case["width"], clean=case["clean"],
                 indices=indices)
    cache, misaligned = _paged_pool(pages, C.PAGE_BYTES + case["stride_pad"], case["offset"])
    args = dict(canon, q=_fp8_relayout(q, case["oq"]), kv_cache=cache, misaligned=misaligned,
                weights=contiguous_at(case["ow"])(w), context_lens=relayout(ctx, case["lc"])
                if ctx.dim() == 2 else relayout(ctx, ([0], case["lc"][1][:1], 3)),
                block_table=relayout(table, case["lt"]), schedule_meta=relayout(meta, case["lm"]))
    names = ("q", "kv_cache", "weights", "context_lens", "block_table", "schedule_meta")
    tensors = lambda: [_bytes(args[k]) for k in names]  # noqa: E731
    if case["fault"] is not None:
        name, mutate = PAGED_MQA_FAULTS[case["fault"]]
        mutate(args)
        refused(lambda: _paged_mqa_call(case, args), [name], launches, snapshot(*tensors()),
                *tensors())
        return
    state, before = snapshot(*tensors()), launches["n"]
    want, got = _paged_mqa_call(case, canon), _paged_mqa_call(case, args)
    assert launches["n"] - before == 2 * (case["backend"] == "triton"), "not the backend asked"
    width = case["width"]
    assert got.shape == want.shape == (R, width)
    rows = dg.row_lengths(ctx, next_n).long().clamp(0, table.shape[1] * 64)
    inside = torch.arange(width)[None] < rows[:, None]
    assert same(_specified(got, inside, case["clean"]), _specified(want, inside, case["clean"])), \
        "fp8_paged_mqa_logits on a relayout differs from the contiguous call"
    assert same(snapshot(*tensors()), state)


METADATA_FAULTS = {
    "block-kv": ("block_kv", lambda a: a.update(block_kv=32)),
    "num-sms-zero": ("num_sms", lambda a: a.update(num_sms=0)),
    "num-sms-huge": ("num_sms", lambda a: a.update(num_sms=2 ** 62)),
    "num-sms-bool": ("num_sms", lambda a: a.update(num_sms=True)),
    "lens-float": ("context_lens", lambda a: a.update(context_lens=a["context_lens"].float())),
    "lens-3d": ("context_lens",
                lambda a: a.update(context_lens=a["context_lens"].reshape(1, 1, -1))),
    "indices-length": ("indices", lambda a: a.update(
        indices=torch.zeros(a["context_lens"].numel() + 1, dtype=torch.int32))),
}


@st.composite
def metadata_cases(draw, fault=None):
    B, next_n = draw(st.integers(0, 4)), draw(st.integers(1, 3))
    two_d = draw(st.booleans())
    return dict(B=B, next_n=next_n, two_d=two_d,
                lengths=draw(st.lists(st.integers(-5, 300), min_size=B * next_n,
                                      max_size=B * next_n)),
                idtype=draw(st.sampled_from([torch.int32, torch.int64])),
                num_sms=draw(st.integers(1, 9)), lc=draw(layouts(2 if two_d else 1)),
                with_indices=draw(st.booleans()) and (next_n == 1 or not two_d),
                fault=fault)


@contract(40)
@given(case=metadata_cases())
def test_deepgemm_metadata_keeps_the_contract(case, launches):
    _check_metadata(case, launches)


@pytest.mark.parametrize("fault", list(METADATA_FAULTS))
@contract(3)
@given(data=st.data())
def test_deepgemm_metadata_refuses_by_name(fault, data, launches):
    _check_metadata(data.draw(metadata_cases(fault)), launches)


def _check_metadata(case, launches):
    from flashmemory_triton import deepgemm as dg
    lens = torch.tensor(case["lengths"], dtype=torch.int64).to(case["idtype"])
    lens = lens.view(case["B"], case["next_n"]) if case["two_d"] else lens[:case["B"]]
    indices = torch.zeros(lens.numel() if case["two_d"] else case["B"], dtype=torch.int32) \
        if case["with_indices"] else None
    canon = dict(context_lens=lens, block_kv=64, num_sms=case["num_sms"], indices=indices)
    args = dict(canon, context_lens=relayout(lens, case["lc"]))
    call = lambda a: dg.get_paged_mqa_logits_metadata(  # noqa: E731
        a["context_lens"], a["block_kv"], a["num_sms"], a["indices"])
    if case["fault"] is not None:
        name, mutate = METADATA_FAULTS[case["fault"]]
        mutate(args)
        refused(lambda: call(args), [name], launches, snapshot(args["context_lens"]),
                args["context_lens"])
        return
    state = snapshot(args["context_lens"])
    got, want = call(args), call(canon)
    assert got.dtype == torch.int32 and got.shape == (case["num_sms"] + 1, 2)
    assert same(got, want), "the schedule of a relayout differs from the contiguous call's"
    assert same(snapshot(args["context_lens"]), state)
