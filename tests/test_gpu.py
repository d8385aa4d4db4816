"""Full-size numerical checks on a GPU (``pytest --device cuda -m gpu``; skipped elsewhere).

The headline shape of the product: N = 262144 chunks (1M tokens), the released model size
(hidden 4096, rank 2048, H = 128) with the deterministic synthetic weights, every precision
and key layout, against the fp32 reference on the same card. The same derived tolerances and
near-tie proofs as the interpreter tests (tests/test_kernels.py), at the real size.
"""

from __future__ import annotations

import pytest
import torch

from flashmemory_triton import FlashMemoryRetriever, synthetic
from flashmemory_triton import constants as C
from flashmemory_triton.kernels import PRECISIONS
from kernel_cases import assert_close, logit_of
from test_kernels import MODE_RTOL

pytestmark = pytest.mark.gpu

N_FULL = 262144


@pytest.fixture(scope="module")
def full_model(device):
    states = synthetic.make_layer_states(seed=0)
    torch_model = FlashMemoryRetriever(states, device=device, backend="torch",
                                       max_position=C.MAX_POSITION_SERVING)
    return states, torch_model


@pytest.fixture(scope="module")
def full_inputs(device):
    gen = torch.Generator().manual_seed(0)
    B = 2
    hidden = synthetic.mock_hidden(B, generator=gen).to(device)
    keys = synthetic.mock_compressed_k(3 * B, N_FULL, generator=gen)
    keys = keys.view(3, B, N_FULL, -1).to(device)
    positions = torch.tensor([4 * N_FULL - 1, 1234567], device=device)
    return hidden, keys, positions


@pytest.mark.parametrize("layout", ["shared", "per_layer"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_full_size_matches_reference(full_model, full_inputs, precision, layout, device):
    states, torch_model = full_model
    hidden, keys, pos = full_inputs
    k = keys[0] if layout == "shared" else keys
    h = hidden if layout == "shared" else hidden.expand(3, *hidden.shape)
    model = FlashMemoryRetriever(states, device=device, backend="triton", precision=precision,
                                 max_position=C.MAX_POSITION_SERVING)
    want = torch_model.logits(h, k, pos)
    got = model.logits(h, k, pos)
    assert_close(got, want, MODE_RTOL[precision], f"full-size {precision}/{layout} logits")
    # Threshold decisions: every flip must sit within the mode's error of the boundary;
    # the mode's RMS error (rtol * RMS logit) times 6 bounds all but ~1e-9 of a Gaussian.
    t = C.DEFAULT_THRESHOLD
    got_hit = model.ensemble(h, k, pos) > t
    want_hit = torch.sigmoid(want).max(0).values > t
    margin = 6 * MODE_RTOL[precision] * float(want.pow(2).mean().sqrt())
    near = ((want - logit_of(t)).abs() <= margin).any(0)
    flips = got_hit != want_hit
    assert bool((~flips | near).all()), f"{int((flips & ~near).sum())} flips are not near-ties"
    print(f"{precision}/{layout}: keep {float(want_hit.float().mean()):.3f}, "
          f"agreement {1 - float(flips.float().mean()):.5f}")


def test_full_size_no_extra_memory(full_model, full_inputs, device):
    """Scoring allocates its outputs and the small query tensors only: no [B, N, H] or
    dequantized-key intermediate (which would be 256 MB here)."""
    states, _ = full_model
    hidden, keys, pos = full_inputs
    model = FlashMemoryRetriever(states, device=device, backend="triton", precision="bf16")
    model.ensemble(hidden, keys[0], pos)  # compile and warm up
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    scores = model.ensemble(hidden, keys[0], pos)
    torch.cuda.synchronize(device)
    extra = torch.cuda.max_memory_allocated(device) - base
    outputs = scores.numel() * 4
    # projections: [B, L*(R+H)] + q_lora + q [L,B,H,D] twice (raw and prepared) + w: < 2 MB
    assert extra <= outputs + 2 * 2 ** 20, (
        f"extra device memory {extra} B for {outputs} B of output")


# --- the opt-in PTX e4m3 -> bf16 decoder (kernels/numerics.py, FLASHMEMORY_BF16_ASM) ------------
# Both decoders give every e4m3 byte its exact bf16 value in the same column order (the PTX one
# negates through its multiplier where the other flips sign bits: the same values), so the
# scores and logits must be the same bits. The keys are random e4m3 (randn * 0.5: about 2.5% of
# bytes subnormal, the case a flush-to-zero would break) with negative and zero scales.
def _same_bits(a: torch.Tensor, b: torch.Tensor, name: str):
    assert torch.equal(a.isnan(), b.isnan()), f"{name}: NaN positions differ"
    assert torch.equal(a.nan_to_num(), b.nan_to_num()), (
        f"{name}: PTX decoder differs from the default, max |diff| "
        f"{(a.nan_to_num() - b.nan_to_num()).abs().max().item():.3e}")


def _with_and_without_ptx(monkeypatch, call):
    from flashmemory_triton.kernels.numerics import BF16_ASM_ENV
    monkeypatch.setenv(BF16_ASM_ENV, "0")
    default = call()
    monkeypatch.setenv(BF16_ASM_ENV, "1")
    return default, call()


@pytest.mark.parametrize("n", [4096, 65536])  # the split launch on an H100/H200, the fused one
def test_bf16_ptx_decoder_dense_same_bits(full_model, device, monkeypatch, n):
    from kernel_cases import make_keys
    states, _ = full_model
    gen = torch.Generator().manual_seed(n)
    hidden = synthetic.mock_hidden(2, generator=gen).to(device)
    keys = make_keys((2, n), gen).to(device)
    pos = torch.tensor([4 * n - 1, 77], device=device)
    model = FlashMemoryRetriever(states, device=device, backend="triton", precision="bf16",
                                 max_position=C.MAX_POSITION_SERVING)
    a, b = _with_and_without_ptx(monkeypatch, lambda: model.logits(hidden, keys, pos))
    _same_bits(a, b, f"dense N={n} logits")
    a, b = _with_and_without_ptx(monkeypatch, lambda: model.ensemble(hidden, keys, pos))
    _same_bits(a, b, f"dense N={n} scores")


def test_bf16_ptx_decoder_paged_same_bits(device, monkeypatch):
    from flashmemory_triton import paged as P
    from test_paged import LENGTHS, _gen, _paged, _prepared, _requests
    gen = _gen(5)
    reqs = _requests(LENGTHS, gen)
    prep = _prepared(3, len(LENGTHS), 128, gen, device, "bf16")
    pool, table, n_chunks, _ = _paged(reqs, gen)
    pool, table, n_chunks = pool.to(device), table.to(device), n_chunks.to(device)
    a, b = _with_and_without_ptx(
        monkeypatch, lambda: P.score_paged(prep, pool, table, n_chunks).scores)
    _same_bits(a, b, "paged scores")
