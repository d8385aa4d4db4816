"""The split launch of the v2 dense scorer (``kernels/dense_split.py``, design §12): short
contexts spread over (tile, layer) or (tile, layer, head half) programs and combined exactly.

Two checks on every case: the split modes give the fused kernel's scores and logits BIT FOR
BIT (same operands, same order of operations: no tolerance applies; NaN positions equal, every
other element's float32 bits equal, so -0.0 and 0.0 differ), and both agree with float64
arithmetic on the same prepared inputs within fp32 accumulation error. Outputs are
NaN-poisoned before every launch (FLASHMEMORY_POISON=1, conftest), so an element the combining
program forgot to write fails the bit comparison against the fused kernel (which writes it).
"""

from __future__ import annotations

import pytest
import torch

from flashmemory_triton import constants as C
from flashmemory_triton import ops
from flashmemory_triton import reference as ref
from flashmemory_triton.kernels import dense_split
from flashmemory_triton.kernels.dense import dense_score_launch
from flashmemory_triton.utils import _device
from kernel_cases import assert_close, logits_f64, make_keys

pytestmark = pytest.mark.interpreter

# fp32 accumulation over D = 128 products and up to 128 heads against float64: RMS error
# ~sqrt(128 * 128) * 6e-8 = 7.6e-6 relative (as tests/test_kernels.py FP32_RTOL).
FP32_RTOL = 1e-5
SPLITS = ("layers", "heads")


@pytest.fixture
def v2(device):
    if device.type == "cuda" and _device.capability(device) < (9, 0):
        pytest.skip("v2 runs on sm_90+ (before Hopper the launcher keeps v1)")
    return device


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _prepared(L, B, H, precision, gen, device):
    q = torch.randn(L, B, H, C.HEAD_DIM, generator=gen)
    w = torch.randn(L, B, H, generator=gen) / 64
    pos = torch.randint(0, 2 * C.MAX_POSITION_RELEASE, (B,), generator=gen)
    return ops.prepare_queries(q.to(device), w.to(device), pos.to(device), precision=precision,
                               backend="triton")


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """NaN where ``expected`` is NaN, identical float32 bits everywhere else."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == torch.float32
    an, en = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(an, en), f"{name}: NaN at {int((an != en).sum())} differing positions"
    a, e = actual[~an].view(torch.int32), expected[~en].view(torch.int32)
    differ = int((a != e).sum())
    assert differ == 0, (f"{name}: {differ} of {a.numel()} elements differ in their bits (max "
                         f"abs {float((actual[~an] - expected[~en]).abs().max()):.3e})")


def _launch(prepared, keys, precision, hw_fp8, split, **kw):
    return dense_score_launch(prepared.q, prepared.w, keys, precision=precision, hw_fp8=hw_fp8,
                              split=split, **kw)


def _check_modes(prepared, keys, precision, hw_fp8, tag, **kw):
    """Every split mode against the fused kernel, bit for bit; returns the fused results."""
    fused = _launch(prepared, keys, precision, hw_fp8, "fused", **kw)
    H = prepared.q.shape[2]
    for split in SPLITS:
        if split == "heads" and max(16, 1 << (H - 1).bit_length()) < 32:
            continue
        got = _launch(prepared, keys, precision, hw_fp8, split, **kw)
        assert_same_bits(got[0], fused[0], f"scores {tag}/{split}")
        if fused[1] is None:
            assert got[1] is None
        else:
            assert_same_bits(got[1], fused[1], f"logits {tag}/{split}")
    return fused


# B, N, H: a full and a partial tile in each of two rows (20 heads: padded to 32, halves of
# 16); fewer chunks than one tile, all 128 heads.
SHAPES = [pytest.param(2, 150, 20, id="B2-N150-H20"), pytest.param(1, 40, 128, id="B1-N40-H128")]


@pytest.mark.parametrize("B,N,H", SHAPES)
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_split_equals_fused_and_f64(B, N, H, precision, v2):
    """Both ensembles, logits on and off, a logit offset: bit-identical to the fused kernel,
    and within fp32 accumulation error of float64 (negative and zero scales mixed in)."""
    gen = _gen(100 * B + N + H)
    L = 3
    prepared = _prepared(L, B, H, precision, gen, v2)
    keys = make_keys((B, N), gen).to(v2)
    want = logits_f64(prepared.q.float(), prepared.w, keys, logit_offset=-0.5)
    hw = _device.has_hw_fp8(v2) if v2.type == "cuda" else True
    for ensemble, return_logits in (("max", False), ("max", True), ("mean", True)):
        tag = f"{precision}/{ensemble}/logits={return_logits}"
        scores, logits = _check_modes(prepared, keys, precision, hw, tag, ensemble=ensemble,
                                      logit_offset=-0.5, return_logits=return_logits)
        assert not bool(torch.isnan(scores).any()), f"{tag}: unwritten scores"
        assert_close(scores.cpu(), ref.ensemble_scores(torch.sigmoid(want), ensemble),
                     FP32_RTOL, f"scores {tag}")
        if return_logits:
            assert_close(logits.cpu(), want, FP32_RTOL, f"logits {tag}")


def test_split_layer_counts_and_decoders(device):
    """L = 1, 2 and 4 (the fused kernel's groups of four layers), and on the CPU both e4m3
    decoders (bit operations, hardware type) feeding the same dot."""
    if device.type == "cuda" and _device.capability(device) < (9, 0):
        pytest.skip("v2 runs on sm_90+")
    hw_options = (False, True) if device.type == "cpu" else (_device.has_hw_fp8(device),)
    for L, ensemble in ((1, "max"), (2, "mean"), (4, "mean")):
        gen = _gen(L)
        prepared = _prepared(L, 2, 32, "bf16", gen, device)
        keys = make_keys((2, 70), gen).to(device)
        for hw in hw_options if L == 1 else hw_options[-1:]:
            _check_modes(prepared, keys, "bf16", hw, f"L={L}/hw={hw}/{ensemble}",
                         ensemble=ensemble, logit_offset=0.25, return_logits=True)


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_split_nonfinite_inputs_equal_fused(precision, v2):
    """Chunks with an e4m3 NaN byte, NaN / infinite / overflowing scales, NaN in one row's q
    and in another layer's head weight, and logits that overflow past float32 (pinned to
    NaN): the same NaN positions and the same bits elsewhere, both ensembles."""
    gen = _gen(5)
    L, B, N, H = 3, 3, 90, 40
    prepared = _prepared(L, B, H, precision, gen, v2)
    keys = make_keys((B, N), gen)
    keys[0, 1, 5] = 0x7F  # e4m3 NaN, positive
    keys[2, 80, 100] = 0xFF  # e4m3 NaN, negative
    scales = keys[..., C.HEAD_DIM:].view(torch.float32)  # [B, N, 1], a view into keys
    for n, value in ((3, float("nan")), (4, float("inf")), (5, float("-inf")),
                     (6, 2 * C.MAX_KEY_SCALE)):
        scales[1, n, 0] = value
    scales[0, 10:20, 0] = 7e35  # finite (<= C.MAX_KEY_SCALE): with the offset 3.4e38 below,
    keys = keys.to(v2)  # a positive logit overflows float32 and is pinned to NaN
    q, w = prepared.q.clone(), prepared.w.clone()
    q[1, 1, 3, 7] = float("nan")  # layer 1, row 1, head 3 (first half of the heads)
    w[2, 2, 35] = float("nan")  # layer 2, row 2, head 35 (second half)
    poisoned = prepared._replace(q=q, w=w)
    hw = _device.has_hw_fp8(v2) if v2.type == "cuda" else True
    for ensemble, offset in (("max", 0.0), ("mean", 3.4e38)):
        scores, logits = _check_modes(poisoned, keys, precision, hw, f"{ensemble}/{offset}",
                                      ensemble=ensemble, logit_offset=offset,
                                      return_logits=True)
        bad = torch.isnan(scores).cpu()
        assert bool(bad[1, 3:7].all() and bad[0, 1] and bad[2, 80]), "bad chunks not NaN"
        assert bool(bad[2].all()), "NaN in w did not reach every score of its row"
        if precision == "bf16" or v2.type == "cuda":  # the interpreter casts a NaN to e4m3 384
            assert bool(bad[1].all()), "NaN in q did not reach every score of its row"
        if offset:  # some logits overflowed, others (negative sums) did not
            big = torch.isnan(logits[:, 0, 10:20]).cpu()
            assert bool(big.any()) and not bool(big.all()), big


def test_counters_are_left_zero_and_reused(device, monkeypatch):
    """Every launch leaves its tile counters zero (the last unit of each tile resets its
    own), so one buffer serves the next call: two calls on one buffer give the same bits."""
    if device.type == "cuda" and _device.capability(device) < (9, 0):
        pytest.skip("v2 runs on sm_90+")
    gen = _gen(9)
    L, B, N, H = 2, 2, 130, 32
    prepared = _prepared(L, B, H, "bf16", gen, device)
    keys = make_keys((B, N), gen).to(device)
    shared = torch.zeros(64, dtype=torch.int32, device=device)
    monkeypatch.setattr(dense_split, "_counters", lambda dev, n: shared)
    hw = _device.has_hw_fp8(device) if device.type == "cuda" else True
    for split in SPLITS:
        first = _launch(prepared, keys, "bf16", hw, split, ensemble="mean", return_logits=True)
        assert int(shared.abs().sum()) == 0, f"{split}: counters left {shared.tolist()}"
        again = _launch(prepared, keys, "bf16", hw, split, ensemble="mean", return_logits=True)
        assert_same_bits(again[0], first[0], f"{split} scores, second call")
        assert_same_bits(again[1], first[1], f"{split} logits, second call")


def test_counter_buffer_per_stream_grows():
    """Off the GPU every call gets a fresh zeroed buffer of the requested size."""
    buf = dense_split._counters(torch.device("cpu"), 10)
    assert buf.dtype == torch.int32 and buf.numel() >= 10 and int(buf.abs().sum()) == 0


# --- the launch rule ------------------------------------------------------------------------
def test_pick_mode_rule():
    """On 132 SMs with L = 3: single rows of 2048 and 4096 chunks (32 and 64 tiles) split by
    layer (96 and 192 units: at most two to an SM); the headline, B = 8 at N = 4096 and rows
    whose layer units would not all be resident stay fused; heads are never picked."""
    pick = dense_split.pick_mode
    assert pick(1, 64, 3, 132) == "layers"  # N = 4096
    assert pick(1, 32, 3, 132) == "layers"  # N = 2048
    assert pick(1, 1, 3, 132) == "layers"
    assert pick(1, 4096, 3, 132) == "fused"  # the headline
    assert pick(8, 64, 3, 132) == "fused"  # B = 8, N = 4096: as before
    assert pick(1, 132, 3, 132) == "fused"  # every SM busy
    assert pick(1, 89, 3, 132) == "fused"  # 267 layer units: more than two an SM
    assert pick(1, 88, 3, 132) == "layers"  # 264: exactly two an SM
    for B in (1, 2, 3, 8, 32):
        for tiles in range(1, 300, 7):
            mode = pick(B, tiles, 3, 132)
            assert mode in ("fused", "layers")
            if mode == "layers":  # the fused grid left SMs idle, every unit resident at once
                assert B * tiles < 132 and B * tiles * 3 <= 2 * 132, (B, tiles)


def test_launch_mode_off_gpu_and_bad_split():
    cpu = torch.device("cpu")
    assert dense_split.launch_mode(cpu, 1, 4096, 3, 128) == "fused"  # no SMs to fill
    assert dense_split.launch_mode(cpu, 1, 4096, 3, 128, "heads") == "heads"
    with pytest.raises(ValueError, match="split"):
        dense_split.launch_mode(cpu, 1, 4096, 3, 128, "rows")
    with pytest.raises(ValueError, match="split='heads'.*H = 16"):
        dense_split.launch_mode(cpu, 1, 4096, 3, 16, "heads")


@pytest.mark.gpu
def test_split_in_cuda_graph_and_streams(device):
    """GPU only: a captured split launch replays to the eager bits (its counters are zeroed
    inside the graph), and eager calls on two streams (one counter buffer each) agree too."""
    if device.type != "cuda" or _device.capability(device) < (9, 0):
        pytest.skip("needs an sm_90+ GPU")
    gen = _gen(21)
    prepared = _prepared(3, 1, 128, "bf16", gen, device)
    keys = make_keys((1, 4096), gen).to(device)
    hw = _device.has_hw_fp8(device)

    def call():
        return _launch(prepared, keys, "bf16", hw, "layers", ensemble="mean",
                       return_logits=True)
    eager = call()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            on_side = call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(captured, eager):
            assert_same_bits(got, want, "graph replay")
    for got, want in zip(on_side, eager):
        assert_same_bits(got, want, "side stream")
