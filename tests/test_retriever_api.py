"""The release API of design §9 on ``FlashMemoryRetriever(backend="torch")``, plus its extensions
(dtype, logit_offset, per-layer hidden/keys, head counts) and its input errors.

The math itself is checked against a float64 oracle in ``test_reference.py``; here every
comparison is between two routes through the same fp32 code on the same tensors, so equality
is exact (``torch.equal``) unless a comment says otherwise.
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict

import pytest
import torch

import flashmemory_triton as fm
from _helpers import describe_error, joint_state_dict, make_layer_states, random_compressed_k
from flashmemory_triton import FlashMemoryRetriever, topk_mask
from flashmemory_triton import reference as ref

HIDDEN, RANK, MAXPOS = 64, 32, 4096


def build(device, n_heads=4, seed=0, layers=("l10", "l12", "l20"), **kw):
    states = make_layer_states(hidden=HIDDEN, rank=RANK, n_heads=n_heads, layers=layers, seed=seed)
    kw.setdefault("backend", "torch")
    return FlashMemoryRetriever(states, device=device, max_position=MAXPOS, **kw), states


def inputs(device, B=3, N=65, seed=1, L=None, per_layer_hidden=False, per_layer_keys=False):
    g = torch.Generator().manual_seed(seed)
    lead = (L,) if per_layer_hidden else ()
    hidden = torch.randn(*lead, B, HIDDEN, generator=g).to(device)
    klead = (L,) if per_layer_keys else ()
    ck, _, _ = random_compressed_k(*klead, B, n=N, generator=g, device=device)
    pos = torch.tensor([0, 1, MAXPOS - 1, MAXPOS, 10 * MAXPOS][:B] if B <= 5 else list(range(B)),
                       dtype=torch.int64, device=device)
    return hidden, ck, pos


def assert_sigmoid_of(scores, logits, name):
    """``scores == sigmoid(logits)`` up to 2 ulp: torch's elementwise sigmoid may take its
    vectorized body or scalar tail path depending on the tensor's length and offset, which can
    differ by an ulp; anything more is a real difference."""
    want = torch.sigmoid(logits)
    assert scores.shape == want.shape and scores.dtype == want.dtype
    bound = 2 * 2.0 ** -23 * want.abs()
    assert bool(((scores - want).abs() <= bound).all()), \
        f"{name}: scores != sigmoid(logits) beyond 2 ulp ({describe_error(scores, want)})"


def assert_equal(actual, expected, name):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, \
        f"{name}: {tuple(actual.shape)} {actual.dtype} vs {tuple(expected.shape)} {expected.dtype}"
    assert torch.equal(actual, expected), (
        f"{name}: not identical ({describe_error(actual, expected)})")


SHAPES = [pytest.param(1, 1, id="B1-N1"), pytest.param(3, 63, id="B3-N63"),
          pytest.param(3, 65, id="B3-N65"), pytest.param(1, 1000, id="B1-N1000"),
          pytest.param(3, 0, id="B3-N0")]


# --- forward / score_layer / ensemble -------------------------------------------------------------
@pytest.mark.parametrize("B,N", SHAPES)
def test_forward_is_ordered_dict_of_scores(B, N, device):
    model, _ = build(device)
    hidden, ck, pos = inputs(device, B, N)
    scores = model(hidden, ck, pos)  # release call: positional, apply_sigmoid=True by default
    logits = model(hidden, ck, pos, apply_sigmoid=False)
    assert isinstance(scores, OrderedDict) and isinstance(logits, OrderedDict)
    assert list(scores) == list(logits) == model.layer_names == ["l10", "l12", "l20"]
    for name in model.layer_names:
        s, lg = scores[name], logits[name]
        assert s.shape == (B, N) and s.dtype == torch.float32
        assert s.device.type == torch.device(device).type
        assert lg.shape == (B, N) and lg.dtype == torch.float32
        assert bool(((s > 0) & (s < 1)).all()), f"{name}: scores outside (0, 1)"
        assert_sigmoid_of(s, lg, f"{name} sigmoid(logits)")
        # sigmoid of a [B, N] tensor vs. of the stacked [L, B, N] one: <= 2 ulp apart
        assert_sigmoid_of(model.score_layer(name, hidden, ck, pos), lg, f"score_layer({name})")
        assert_equal(model.score_layer(name, hidden, ck, pos, apply_sigmoid=False), lg,
                     f"score_layer({name}, logits)")
        i = model.layer_names.index(name)
        assert_equal(ref.layer_logits(hidden, ck, pos, model.layer_weights(name), MAXPOS), lg,
                     f"{name} vs reference.layer_logits")
        assert_equal(model.logits(hidden, ck, pos)[i], lg, f"logits()[{i}]")
    if N:  # the three layers are different scorers
        assert not torch.equal(logits["l10"], logits["l12"])


@pytest.mark.parametrize("B,N", SHAPES)
def test_ensemble_max_and_mean(B, N, device):
    model, _ = build(device)
    hidden, ck, pos = inputs(device, B, N)
    stacked = torch.stack(list(model(hidden, ck, pos).values()))
    ens_max = model.ensemble(hidden, ck, pos)  # default mode "max"
    assert_equal(ens_max, stacked.max(0).values, "ensemble max")
    assert_equal(model.ensemble(hidden, ck, pos, mode="max"), ens_max, "ensemble mode='max'")
    assert_equal(model.ensemble(hidden, ck, pos, mode="mean"), stacked.mean(0), "ensemble mean")
    assert ens_max.shape == (B, N) and ens_max.dtype == torch.float32


# --- select_topk / topk_mask ----------------------------------------------------------------------
@pytest.mark.parametrize("kwargs",
                         [{}, {"top_k": 3, "threshold": 0.5}, {"top_k": None, "threshold": None}],
                         ids=["neither", "both", "both-None"])
def test_select_topk_needs_exactly_one(kwargs, device):
    model, _ = build(device)
    hidden, ck, pos = inputs(device)
    with pytest.raises(ValueError, match="top_k.*threshold"):
        model.select_topk(hidden, ck, pos, **kwargs)


@pytest.mark.parametrize("B,N", SHAPES)
def test_select_topk_counts_and_order(B, N, device):
    model, _ = build(device)
    hidden, ck, pos = inputs(device, B, N)
    for mode in ("max", "mean"):
        scores = model.ensemble(hidden, ck, pos, mode=mode)
        for k in (0, 1, 5, 64, 2000):
            mask = model.select_topk(hidden, ck, pos, top_k=k, mode=mode)
            assert mask.dtype == torch.bool and mask.shape == (B, N)
            assert mask.sum(1).tolist() == [min(k, N)] * B, f"mode={mode} k={k}: keep counts"
            for b in range(B):  # every kept score >= every dropped score
                if 0 < min(k, N) < N:
                    assert float(scores[b][mask[b]].min()) >= float(scores[b][~mask[b]].max())
            assert_equal(mask, topk_mask(scores, k), f"select_topk vs topk_mask ({mode}, k={k})")


@pytest.mark.parametrize("B,N", SHAPES)
def test_select_threshold_is_strict(B, N, device):
    model, _ = build(device)
    hidden, ck, pos = inputs(device, B, N)
    scores = model.ensemble(hidden, ck, pos)
    for t in (0.3, 0.5, 0.7):
        assert_equal(model.select_topk(hidden, ck, pos, threshold=t), scores > t, f"threshold {t}")
    if N:
        # A threshold exactly equal to a chunk's score (a float32 value, exact as a python
        # float) must not keep that chunk: strict '>'.
        t = float(scores[0, N // 2])
        mask = model.select_topk(hidden, ck, pos, threshold=t)
        assert not bool(mask[0, N // 2])
        assert_equal(mask, scores > t, "threshold equal to a score")
        assert int(mask.sum()) == int((scores > t).sum()) < int((scores >= t).sum())


def test_all_tied_scores_threshold_and_topk(device):
    """weights_proj = 0 makes every logit exactly 0, every score exactly sigmoid(0) = 0.5."""
    states = make_layer_states(hidden=HIDDEN, rank=RANK, n_heads=4)
    for p in states.values():
        p["weights_proj.weight"] = torch.zeros_like(p["weights_proj.weight"])
    model = FlashMemoryRetriever(states, device=device, max_position=MAXPOS, backend="torch")
    hidden, ck, pos = inputs(device, 3, 65)
    scores = model.ensemble(hidden, ck, pos)
    assert bool((scores == 0.5).all())
    assert not bool(model.select_topk(hidden, ck, pos, threshold=0.5).any())  # strict >
    assert bool(model.select_topk(hidden, ck, pos, threshold=0.4999).all())
    mask = model.select_topk(hidden, ck, pos, top_k=7)  # all tied: the lowest indices win
    want = torch.zeros(3, 65, dtype=torch.bool, device=mask.device)
    want[:, :7] = True
    assert_equal(mask, want, "tied top-k")


def test_topk_mask_ties_nan_and_errors(device):
    s = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0], [float("nan"), 5.0, 5.0, -1.0, float("nan")]],
                     device=device)
    assert topk_mask(s, 2).tolist() == [[False, True, True, False, False],
                                        [False, True, True, False, False]]
    assert topk_mask(s, 4).tolist() == [[True, True, True, True, False],
                                        [False, True, True, True, False]]  # NaN never kept
    assert topk_mask(s, 0).sum() == 0 and topk_mask(s, 100)[0].all()
    assert topk_mask(torch.empty(2, 0, device=device), 3).shape == (2, 0)
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match="top_k"):
            topk_mask(s, bad)


# --- attributes, head counts, layer layouts -------------------------------------------------------
@pytest.mark.parametrize("H", [4, 16, 64, 128])
def test_attributes_and_head_count_from_wq_b(H, device):
    model, _ = build(device, n_heads=H)
    assert model.n_heads == H and model.head_dim == 128 and model.max_position == MAXPOS
    assert model.layer_names == ["l10", "l12", "l20"]
    hidden, ck, pos = inputs(device, 3, 63)
    out = model(hidden, ck, pos, apply_sigmoid=False)
    assert all(v.shape == (3, 63) for v in out.values())
    # The per-head weight scale follows H (D**-0.5 * H**-0.5), checked through the reference
    # formula with an explicit scale:
    name = "l12"
    wts = model.layer_weights(name)
    q, w = ref.query_side(hidden, wts, pos, MAXPOS)
    w_manual = (hidden @ wts["weights_proj.weight"].T) / math.sqrt(128 * H)
    rel = float((w - w_manual).abs().max() / w_manual.abs().max())
    assert rel < 1e-6, f"H={H}: head weights not scaled by 1/sqrt(128 H): rel err {rel:.2e}"


def test_layer_names_order_and_subsets(device):
    model, states = build(device, layers=("l20", "l10"))
    assert model.layer_names == ["l20", "l10"]
    hidden, ck, pos = inputs(device)
    assert list(model(hidden, ck, pos)) == ["l20", "l10"]
    one = FlashMemoryRetriever({"l12": make_layer_states(HIDDEN, RANK, 4, layers=("l12",))["l12"]},
                               device=device, max_position=MAXPOS, backend="torch")
    assert one.layer_names == ["l12"]
    assert_equal(one.ensemble(hidden, ck, pos), one(hidden, ck, pos)["l12"], "1-layer ensemble")


def test_joint_state_dict_and_freqs_cis_ignored(device):
    model, states = build(device)
    joint = joint_state_dict(states)
    for name in states:  # a bogus checkpoint RoPE table must be ignored (design §8)
        joint[f"retrievers.{name}.freqs_cis"] = torch.full((MAXPOS, 32), 7 + 7j,
                                                           dtype=torch.complex64)
    model2 = FlashMemoryRetriever(joint, device=device, max_position=MAXPOS, backend="torch")
    assert model2.layer_names == model.layer_names
    hidden, ck, pos = inputs(device)
    for name, v in model2(hidden, ck, pos, apply_sigmoid=False).items():
        assert_equal(v, model(hidden, ck, pos, apply_sigmoid=False)[name], f"joint {name}")


# --- dtype, logit_offset, per-layer inputs, N = 0 ------------------------------------------------
def test_bf16_weights_match_fp32_holding_bf16_values(device):
    states = make_layer_states(hidden=HIDDEN, rank=RANK, n_heads=16)
    bf16 = OrderedDict((n, {k: v.to(torch.bfloat16) for k, v in p.items()}) for n,
                       p in states.items())
    rounded = OrderedDict((n, {k: v.float() for k, v in p.items()}) for n, p in bf16.items())
    kw = dict(device=device, max_position=MAXPOS, backend="torch")
    m_rounded = FlashMemoryRetriever(rounded, **kw)
    m_dtype = FlashMemoryRetriever(states, dtype=torch.bfloat16, **kw)  # fp32 in, stored bf16
    m_bf16in = FlashMemoryRetriever(bf16, **kw)  # bf16 tensors in, stored fp32
    m_both = FlashMemoryRetriever(bf16, dtype=torch.bfloat16, **kw)
    assert m_dtype.dtype == torch.bfloat16 and m_rounded.dtype == torch.float32
    hidden, ck, pos = inputs(device, 3, 65)
    want = m_rounded(hidden, ck, pos, apply_sigmoid=False)
    # The math runs in fp32 on the same values, so the logits are identical, not just close.
    for label, m in (("dtype=bf16", m_dtype), ("bf16 tensors", m_bf16in), ("both", m_both)):
        got = m(hidden, ck, pos, apply_sigmoid=False)
        for name in want:
            assert_equal(got[name], want[name], f"{label} {name}")
    # ...and they really differ from the unrounded fp32 weights (the test is not vacuous).
    full = FlashMemoryRetriever(states, **kw)(hidden, ck, pos, apply_sigmoid=False)
    assert not torch.equal(full["l10"], want["l10"])


def test_logit_offset_shifts_logits(device):
    base, states = build(device)
    c = 0.75  # exactly representable
    shifted = FlashMemoryRetriever(states, device=device, max_position=MAXPOS, backend="torch",
                                   logit_offset=c)
    hidden, ck, pos = inputs(device, 3, 65)
    lb = base(hidden, ck, pos, apply_sigmoid=False)
    ls = shifted(hidden, ck, pos, apply_sigmoid=False)
    sc = shifted(hidden, ck, pos)
    for name in lb:
        # The offset is one fp32 add after the head sum: exactly fl(logit + c).
        assert_equal(ls[name], lb[name] + c, f"offset logits {name}")
        assert_sigmoid_of(sc[name], lb[name] + c, f"offset scores {name}")
    stack = torch.stack(list(sc.values()))
    assert_equal(shifted.ensemble(hidden, ck, pos), stack.max(0).values, "offset ensemble")


@pytest.mark.parametrize("per_h,per_k", [(True, True), (True, False), (False, True)],
                         ids=["both-per-layer", "hidden-per-layer", "keys-per-layer"])
@pytest.mark.parametrize("B,N", [pytest.param(1, 1, id="B1-N1"), pytest.param(3, 65, id="B3-N65"),
                                 pytest.param(3, 0, id="B3-N0")])
def test_per_layer_inputs_equal_looping_score_layer(per_h, per_k, B, N, device):
    model, _ = build(device)
    L = model.n_layers
    hidden, ck, pos = inputs(device, B, N, L=L, per_layer_hidden=per_h, per_layer_keys=per_k)
    out = model(hidden, ck, pos, apply_sigmoid=False)
    for i, name in enumerate(model.layer_names):
        h_i = hidden[i] if per_h else hidden
        k_i = ck[i] if per_k else ck
        want = model.score_layer(name, h_i, k_i, pos, apply_sigmoid=False)
        assert_equal(out[name], want, f"per-layer {name}")
        # score_layer given the per-layer tensors picks its own slice too.
        assert_equal(model.score_layer(name, hidden, ck, pos, apply_sigmoid=False), want,
                     f"score_layer per-layer {name}")
    if N:  # each layer really reads its own slice: layer 1 on layer 0's inputs differs
        h0 = hidden[0] if per_h else hidden
        k0 = ck[0] if per_k else ck
        other = model.score_layer(model.layer_names[1], h0, k0, pos, apply_sigmoid=False)
        assert not torch.equal(other, out[model.layer_names[1]])
    stack = torch.stack(list(model(hidden, ck, pos).values()))
    assert_equal(model.ensemble(hidden, ck, pos, mode="mean"), stack.mean(0), "per-layer ensemble")


def test_empty_history(device):
    model, _ = build(device)
    hidden, ck, pos = inputs(device, 3, 0)
    assert ck.shape == (3, 0, 132)
    for v in model(hidden, ck, pos).values():
        assert v.shape == (3, 0) and v.dtype == torch.float32
    assert model.score_layer("l20", hidden, ck, pos).shape == (3, 0)
    assert model.ensemble(hidden, ck, pos, mode="mean").shape == (3, 0)
    for kw in ({"top_k": 3}, {"threshold": 0.5}):
        m = model.select_topk(hidden, ck, pos, **kw)
        assert m.shape == (3, 0) and m.dtype == torch.bool


def test_nan_key_chunks_are_never_selected(device):
    """A chunk with an e4m3 NaN byte gets a NaN score and is never kept, by either rule."""
    model, _ = build(device)
    hidden, ck, pos = inputs(device, 3, 65)
    ck = ck.clone()
    ck[:, 10, 5] = 0x7F
    scores = model.ensemble(hidden, ck, pos)
    assert bool(torch.isnan(scores[:, 10]).all())
    assert not bool(torch.isnan(scores[:, 11:]).any())
    assert not bool(model.select_topk(hidden, ck, pos, top_k=65)[:, 10].any())
    assert not bool(model.select_topk(hidden, ck, pos, threshold=0.0)[:, 10].any())


def test_module_level_helpers():
    for name in ("dequant_compressed_k", "precompute_freqs_cis", "apply_rope",
                 "hadamard_transform"):
        assert getattr(fm, name) is getattr(ref, name), name
        assert name in fm.__all__
    assert "FlashMemoryRetriever" in fm.__all__ and "topk_mask" in fm.__all__
    assert inspect.signature(fm.dequant_compressed_k).parameters["head_dim"].default == 128
    assert inspect.signature(fm.apply_rope).parameters["rope_dim"].default == 64
    assert list(inspect.signature(fm.apply_rope).parameters)[:3] == ["q", "freqs_cis", "positions"]
    sig = inspect.signature(FlashMemoryRetriever.__init__).parameters
    assert list(sig)[1:5] == ["layer_states", "device", "max_position", "head_dim"]
    assert sig["max_position"].default == 524288 and sig["device"].default == "cpu"
    st = inspect.signature(FlashMemoryRetriever.select_topk).parameters
    assert st["top_k"].default is None and st["threshold"].default is None
    assert st["mode"].default == "max"
    assert inspect.signature(FlashMemoryRetriever.ensemble).parameters["mode"].default == "max"
    forward = inspect.signature(FlashMemoryRetriever.forward).parameters
    assert forward["apply_sigmoid"].default is True


# --- bad inputs -----------------------------------------------------------------------------------
def _other_device(device):
    """A device different from the retriever's: meta on CPU (no data, never computed on)."""
    return torch.device("cpu") if torch.device(device).type != "cpu" else torch.device("meta")


CALL_ERRORS = [
    # (id, mutate(hidden, ck, pos, device) -> (hidden, ck, pos), exception, message regex)
    ("keys-int8", lambda h, k, p, d: (h, k.to(torch.int8), p), TypeError, "compressed_k.*uint8"),
    ("keys-float", lambda h, k, p, d: (h, k.float(), p), TypeError, "compressed_k"),
    ("keys-131", lambda h, k, p, d: (h, k[..., :131], p), ValueError, "compressed_k.*132"),
    ("keys-2d", lambda h, k, p, d: (h, k[0], p), ValueError, "compressed_k"),
    ("batch-mismatch", lambda h, k, p, d: (h, k[:2], p), ValueError, "compressed_k.*batch"),
    ("hidden-size", lambda h, k, p, d: (h[:, :48], k, p), ValueError, "hidden.*64"),
    ("hidden-int", lambda h, k, p, d: (h.long(), k, p), TypeError, "hidden"),
    ("hidden-1d", lambda h, k, p, d: (h[0], k, p), ValueError, "hidden"),
    ("hidden-L-mismatch", lambda h, k, p, d: (h.expand(2, -1, -1), k, p), ValueError,
     "hidden.*L=3"),
    ("keys-L-mismatch", lambda h, k, p, d: (h, k.expand(4, -1, -1, -1), p), ValueError,
     "compressed_k.*L=3"),
    ("positions-float", lambda h, k, p, d: (h, k, p.float()), TypeError, "positions"),
    ("positions-2d", lambda h, k, p, d: (h, k, p[:, None]), ValueError, "positions"),
    ("positions-negative", lambda h, k, p, d: (h, k, p - 2), ValueError, "positions"),
    ("positions-length", lambda h, k, p, d: (h, k, p[:2]), ValueError, "positions"),
    ("positions-list", lambda h, k, p, d: (h, k, p.tolist()), TypeError, "positions"),
    ("hidden-device", lambda h, k, p, d: (h.to(_other_device(d)), k, p), ValueError, "hidden"),
    ("keys-device", lambda h, k, p, d: (h, k.to(_other_device(d)), p), ValueError, "compressed_k"),
    ("positions-device", lambda h, k, p, d: (h, k, p.to(_other_device(d))), ValueError,
     "positions"),
]


@pytest.mark.parametrize("mutate,exc,msg", [pytest.param(*c[1:], id=c[0]) for c in CALL_ERRORS])
@pytest.mark.parametrize("method", ["forward", "score_layer", "ensemble", "select_topk"])
def test_bad_call_inputs(mutate, exc, msg, method, device):
    model, _ = build(device)
    hidden, ck, pos = mutate(*inputs(device, 3, 5), device)
    with pytest.raises(exc, match=msg):
        call_method(model, method, hidden, ck, pos)


def call_method(model, method, hidden, ck, pos):
    """One of the release API's scoring calls by name (``score_layer`` on layer l12)."""
    return {"forward": lambda: model(hidden, ck, pos),
            "score_layer": lambda: model.score_layer("l12", hidden, ck, pos),
            "ensemble": lambda: model.ensemble(hidden, ck, pos),
            "select_topk": lambda: model.select_topk(hidden, ck, pos, top_k=2)}[method]()


def test_bad_layer_name_and_mode(device):
    model, _ = build(device)
    hidden, ck, pos = inputs(device)
    with pytest.raises(KeyError, match="l11"):
        model.score_layer("l11", hidden, ck, pos)
    with pytest.raises(KeyError, match="l99"):
        model.layer_weights("l99")
    for bad in ("min", "union", None):
        with pytest.raises(ValueError, match="mode"):
            model.ensemble(hidden, ck, pos, mode=bad)
        with pytest.raises(ValueError, match="mode"):
            model.select_topk(hidden, ck, pos, top_k=1, mode=bad)
    with pytest.raises(ValueError, match="top_k"):
        model.select_topk(hidden, ck, pos, top_k=-1)


def _states(**changes):
    """Release-shaped tiny states with per-layer edits: {layer: {param: tensor or None (drop)}}."""
    states = make_layer_states(hidden=HIDDEN, rank=RANK, n_heads=4)
    for layer, params in changes.items():
        for k, v in params.items():
            if v is None:
                del states[layer][k]
            else:
                states[layer][k] = v
    return states


CTOR_ERRORS = [
    ("backend", lambda: (_states(), {"backend": "cuda"}), ValueError, "backend"),
    ("dtype", lambda: (_states(), {"dtype": torch.int8}), TypeError, "dtype"),
    ("max_position-0", lambda: (_states(), {"max_position": 0}), ValueError, "max_position"),
    ("max_position-float", lambda: (_states(), {"max_position": 4096.0}), ValueError,
     "max_position"),
    ("empty", lambda: ({}, {}), TypeError, "layer_states"),
    ("not-mapping", lambda: ([1, 2], {}), TypeError, "layer_states"),
    ("flat-without-prefix", lambda: ({"wq_a.weight": torch.zeros(2, 2)}, {}), ValueError,
     "retrievers"),
    ("missing-key", lambda: (_states(l12={"q_norm_weight": None}), {}), ValueError,
     "l12.*q_norm_weight"),
    ("int-weight",
     lambda: (_states(l10={"wq_a.weight": torch.zeros(RANK, HIDDEN, dtype=torch.int32)}), {}),
     TypeError, "l10.*wq_a"),
    ("wq_b-rank", lambda: (_states(l20={"wq_b.weight": torch.zeros(512, RANK + 1)}), {}),
     ValueError,
     "l20.*wq_b"),
    ("wq_b-rows", lambda: (_states(l20={"wq_b.weight": torch.zeros(500, RANK)}), {}), ValueError,
     "l20.*wq_b.*head_dim"),
    ("q_norm-shape", lambda: (_states(l10={"q_norm_weight": torch.ones(RANK + 1)}), {}), ValueError,
     "l10.*q_norm_weight"),
    ("weights_proj-heads",
     lambda: (_states(l10={"weights_proj.weight": torch.zeros(5, HIDDEN)}), {}),
     ValueError, "l10.*weights_proj"),
    ("inconsistent-layers",
     lambda: (OrderedDict(list(make_layer_states(HIDDEN, RANK, 4, layers=("l10",)).items())
                          + list(make_layer_states(HIDDEN, RANK, 8, layers=("l12",)).items())),
              {}),
     ValueError, "l12"),
]


@pytest.mark.parametrize("make,exc,msg", [pytest.param(*c[1:], id=c[0]) for c in CTOR_ERRORS])
def test_bad_constructor_arguments(make, exc, msg, device):
    states, kw = make()
    kw.setdefault("backend", "torch")
    kw.setdefault("max_position", MAXPOS)
    with pytest.raises(exc, match=msg):
        FlashMemoryRetriever(states, device=device, **kw)
