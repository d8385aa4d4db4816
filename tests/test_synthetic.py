"""Synthetic checkpoints: determinism, the release format, realistic score spread, the cache."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from flashmemory_triton import FlashMemoryRetriever
from flashmemory_triton import constants as C
from flashmemory_triton import synthetic as S
from flashmemory_triton.checkpoint import load_layer_states
from flashmemory_triton.reference import dequant_compressed_k

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden=9, rank=4, n_heads=2, head_dim=4, seed=3)  # odd hidden on purpose
# sha256 of TINY's tensors. The weights must be bitwise stable across machines and releases
# (cached files are named by SYNTHETIC_VERSION). If this fails you changed the generator:
# bump SYNTHETIC_VERSION and update the hash.
TINY_SHA256 = "463be7f6359e6cb3b6c04341af1cc1e8a046bdb9143d16ecce8cea8dfbe15ae3"


def digest(states) -> str:
    h = hashlib.sha256()
    for params in states.values():
        for p in C.PARAM_NAMES:
            h.update(params[p].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --- weights ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_shapes_and_dtypes(dtype):
    states = S.make_layer_states(hidden=24, rank=8, n_heads=3, dtype=dtype)
    assert list(states) == list(C.LAYER_NAMES)
    D = C.HEAD_DIM
    want = {"wq_a.weight": (8, 24), "wq_b.weight": (3 * D, 8), "q_norm_weight": (8,),
            "weights_proj.weight": (3, 24)}
    for params in states.values():
        assert {p: tuple(t.shape) for p, t in params.items()} == want
        assert all(t.dtype == dtype and bool(torch.isfinite(t).all()) for t in params.values())
        assert bool((params["q_norm_weight"] > 0).all())  # RMSNorm gains stay positive


def test_golden_hash():
    assert digest(S.make_layer_states(**TINY)) == TINY_SHA256


def test_deterministic_and_seeded():
    a = S.make_layer_states(hidden=16, rank=8, n_heads=2, seed=5)
    b = S.make_layer_states(hidden=16, rank=8, n_heads=2, seed=5)
    c = S.make_layer_states(hidden=16, rank=8, n_heads=2, seed=6)
    assert digest(a) == digest(b) != digest(c)
    # Layers are independent draws, and a layer does not depend on which others are made.
    assert not torch.equal(a["l10"]["wq_a.weight"], a["l12"]["wq_a.weight"])
    alone = S.make_layer_states(hidden=16, rank=8, n_heads=2, seed=5, layers=["l20"])
    assert digest(alone) == digest({"l20": a["l20"]})


def test_head_weights_have_exact_negative_mean():
    # The mean over heads of x . weights_proj[h] on the shared hidden component is what keeps
    # a minority of chunks: it must be exactly -KAPPA/sqrt(H) * LOGIT_GAIN, no sampling noise.
    # The only error is the fp32 rounding of the elementwise build and of this dot product.
    hidden, H = 64, 16
    states = S.make_layer_states(hidden=hidden, rank=8, n_heads=H, layers=["l10"])
    wp = states["l10"]["weights_proj.weight"]
    per_head = wp.double() @ S.shared_hidden_component(hidden).double()
    expected = -S.KAPPA / math.sqrt(H) * S.LOGIT_GAIN
    assert abs(per_head.mean().item() - expected) < 1e-4 * S.LOGIT_GAIN
    assert per_head.std().item() == pytest.approx(S.LOGIT_GAIN, rel=0.1)  # unit spread * S


@pytest.mark.parametrize("kwargs,err,match", [
    pytest.param(dict(hidden=0), ValueError, "hidden", id="hidden-zero"),
    pytest.param(dict(rank=2.5), ValueError, "rank", id="rank-float"),
    pytest.param(dict(n_heads=True), ValueError, "n_heads", id="heads-bool"),
    pytest.param(dict(seed=-1), ValueError, "seed", id="negative-seed"),
    pytest.param(dict(dtype=torch.int32), TypeError, "dtype", id="int-dtype"),
    pytest.param(dict(layers=[]), ValueError, "layers", id="no-layers"),
    pytest.param(dict(layers=["l1", "l1"]), ValueError, "layers", id="duplicate-layers"),
    pytest.param(dict(layers=["a.b"]), ValueError, "layers", id="dotted-layer"),
])
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        S.make_layer_states(**{"hidden": 8, "rank": 4, "n_heads": 1, **kwargs})


# --- score spread: the reason the generator exists ------------------------------------------
@pytest.mark.parametrize("hidden,rank,n_heads", [
    pytest.param(256, 64, 128, id="h256-r64-H128"),
    pytest.param(64, 16, 16, id="h64-r16-H16"),
])
def test_threshold_keeps_a_minority(device, hidden, rank, n_heads):
    """With the mock inputs, score > 0.5 keeps 5-30% of chunks (max ensemble), not all or none.

    Measured over seeds and sizes (full size included) the union keeps 13-19% and each layer
    4-8%; 2 x 1024 chunks give a sampling error below 1%, so the bounds are the issue's own
    5-30% for the ensemble and a loose 1-15% per layer.
    """
    states = S.make_layer_states(hidden=hidden, rank=rank, n_heads=n_heads, seed=1)
    model = FlashMemoryRetriever(states, device=device, backend="torch")
    g = torch.Generator().manual_seed(1)
    keys = S.mock_compressed_k(2, 1024, generator=g, device=device)
    x = S.mock_hidden(2, hidden, generator=g, device=device)
    positions = torch.full((2,), 4 * 1024 - 1, device=device)
    with torch.inference_mode():
        logits = model.logits(x, keys, positions)
    per_layer_keep = (logits > 0).float().mean(dim=(1, 2))
    assert bool(((per_layer_keep > 0.01) & (per_layer_keep < 0.15)).all()), per_layer_keep
    ensemble = torch.sigmoid(logits).max(0).values
    ensemble_keep = (ensemble > C.DEFAULT_THRESHOLD).float().mean().item()
    assert 0.05 <= ensemble_keep <= 0.30
    # Scores vary across chunks (a logit spread of ~2.7 by design, 1 at the very least) ...
    assert bool((logits.std(dim=2) > 1.0).all())
    # ... and spread over the sigmoid's range instead of saturating at 0 or 1.
    scores = torch.sigmoid(logits)
    assert 0.02 < scores.median().item() < 0.5 and scores.max().item() > 0.8


# --- mock inputs ------------------------------------------------------------------------------
def test_mock_compressed_k_is_the_release_recipe(device):
    B, N = 2, 512
    keys = S.mock_compressed_k(B, N, generator=torch.Generator().manual_seed(7), device=device)
    assert keys.dtype == torch.uint8 and keys.shape == (B, N, C.CHUNK_BYTES)
    assert keys.device.type == torch.device(device).type
    # The release demo, step by step: keys first, then scales, from one generator.
    g = torch.Generator().manual_seed(7)
    fp8 = (torch.randn(B, N, C.HEAD_DIM, generator=g) * 0.5).to(torch.float8_e4m3fn)
    scale = 0.05 + 0.15 * torch.rand(B, N, 1, generator=g)
    keys = keys.cpu()
    assert torch.equal(keys[..., :C.HEAD_DIM], fp8.view(torch.uint8))
    # Bytes 128..131 are the little-endian float32 scale, whatever the host byte order.
    assert bytes(keys[0, 0, C.HEAD_DIM:].tolist()) == struct.pack("<f", scale[0, 0, 0].item())
    k = dequant_compressed_k(keys)
    assert torch.equal(k, fp8.float() * scale)
    s = keys[..., C.HEAD_DIM:].contiguous().view(torch.float32)
    assert float(s.min()) >= 0.05 and float(s.max()) <= 0.2


def test_mock_compressed_k_edges():
    assert S.mock_compressed_k(3, 0).shape == (3, 0, C.CHUNK_BYTES)
    assert S.mock_compressed_k(1, 4, head_dim=64).shape == (1, 4, 68)
    with pytest.raises(ValueError, match="n_chunks"):
        S.mock_compressed_k(1, -1)
    with pytest.raises(ValueError, match="batch"):
        S.mock_compressed_k(0, 4)


def test_mock_hidden_distribution(device):
    x = S.mock_hidden(512, 64, generator=torch.Generator().manual_seed(0), device=device)
    assert x.shape == (512, 64) and x.dtype == torch.float32
    shared = S.shared_hidden_component(64)
    assert set(shared.tolist()) == {-1.0, 1.0}
    assert torch.equal(shared[:32], shared[32:])  # the halves structure the weights rely on
    # Row mean = shared component; the z part averages to N(0, 1/512): 6 sigma = 0.27.
    assert (x.cpu().mean(0) - shared).abs().max().item() < 0.27
    rms = x.pow(2).mean().sqrt().item()
    assert rms == pytest.approx(math.sqrt(2), rel=0.05)  # O(1) elements: 1 + 1 variance


# --- writing and the cache --------------------------------------------------------------------
def test_write_checkpoint_formats(tmp_path):
    st = S.write_checkpoint(tmp_path / "a.safetensors", hidden=16, rank=8, n_heads=1, seed=2)
    with safe_open(str(st), "pt") as f:
        assert sorted(f.keys()) == sorted(f"retrievers.{n}.{p}" for n in C.LAYER_NAMES
                                          for p in C.PARAM_NAMES)
        assert f.metadata()["synthetic_version"] == str(S.SYNTHETIC_VERSION)
        assert f.metadata()["seed"] == "2"
    pt = S.write_checkpoint(tmp_path / "a.pt", hidden=16, rank=8, n_heads=1, seed=2,
                            freqs_cis_max_position=32)
    raw = torch.load(pt, weights_only=True)
    assert raw["retrievers.l12.freqs_cis"].shape == (32, C.ROPE_DIM // 2)
    assert raw["retrievers.l12.freqs_cis"].dtype == torch.complex64
    assert digest(load_layer_states(st)) == digest(load_layer_states(pt))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "a.safetensors"]  # no temp files


def test_write_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match=r"a\.bin.*\.safetensors, \.pt or \.pth"):
        S.write_checkpoint(tmp_path / "a.bin", hidden=8, rank=4, n_heads=1)
    states = S.make_layer_states(hidden=8, rank=4, n_heads=1)
    with pytest.raises(TypeError, match="both states and generator options"):
        S.write_checkpoint(tmp_path / "a.pt", states, seed=1)
    bad = {"l10": {**states["l10"], "wq_b.weight": torch.zeros(3, 4)}}
    with pytest.raises(ValueError, match="wq_b.weight"):
        S.write_checkpoint(tmp_path / "a.pt", bad)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def explode(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.torch, "save_file", explode)
    with pytest.raises(KeyboardInterrupt):
        S.write_checkpoint(tmp_path / "a.safetensors", hidden=8, rank=4, n_heads=1)
    assert list(tmp_path.iterdir()) == []


def test_cache_location(tmp_path, monkeypatch):
    monkeypatch.delenv("FLASHMEMORY_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert S.default_checkpoint_path().parent == tmp_path / "xdg" / "flashmemory_triton"
    monkeypatch.setenv("FLASHMEMORY_CACHE", str(tmp_path / "fm"))
    path = S.default_checkpoint_path()
    assert path.parent == tmp_path / "fm"
    assert f"v{S.SYNTHETIC_VERSION}" in path.name and path.suffix == ".safetensors"


@pytest.fixture
def small_default(tmp_path, monkeypatch):
    """The default-checkpoint machinery at a small size, in a private cache directory."""
    monkeypatch.setenv("FLASHMEMORY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(S, "DEFAULT_SHAPE",
                        dict(hidden=32, rank=16, n_heads=2, head_dim=C.HEAD_DIM))
    return S.make_layer_states(hidden=32, rank=16, n_heads=2, seed=S.DEFAULT_SEED)


def test_ensure_default_checkpoint_generates_once(small_default):
    messages = []
    path = S.ensure_default_checkpoint(progress=messages.append)
    assert path == S.default_checkpoint_path() and path.is_file()
    assert len(messages) == 2 and "generating" in messages[0] and str(path) in messages[1]
    assert digest(load_layer_states(path)) == digest(small_default)
    mtime = path.stat().st_mtime_ns
    again = []
    assert S.ensure_default_checkpoint(progress=again.append) == path
    assert again == [] and path.stat().st_mtime_ns == mtime  # cached: not rewritten


def test_ensure_default_checkpoint_repairs_a_corrupt_cache(small_default):
    path = S.ensure_default_checkpoint(progress=None)
    path.write_bytes(path.read_bytes()[:100])  # e.g. a disk that filled up outside our control
    messages = []
    assert S.ensure_default_checkpoint(progress=messages.append) == path
    assert "unreadable" in messages[0]
    assert digest(load_layer_states(path)) == digest(small_default)


def test_script_writes_checkpoint(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "make_synthetic_checkpoint", ROOT / "scripts" / "make_synthetic_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "s.pt"
    assert script.main([str(out), "--hidden", "16", "--rank", "8", "--heads", "1",
                        "--layers", "l10,l20", "--seed", "4", "--freqs-cis", "8"]) == 0
    assert "wrote" in capsys.readouterr().out
    want = S.make_layer_states(hidden=16, rank=8, n_heads=1, layers=["l10", "l20"], seed=4)
    assert digest(load_layer_states(out)) == digest(want)
    assert script.main([str(tmp_path / "s.txt"), "--hidden", "16"]) == 2
    assert "s.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main([])  # neither OUTPUT nor --default


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FLASHMEMORY_SLOW") != "1",
                    reason="15 s and 1.5 GB: set FLASHMEMORY_SLOW=1 to run")
def test_full_size_default_checkpoint(tmp_path, monkeypatch):
    """The real 510 MB default: generated in seconds, release shapes, a minority kept."""
    import time
    monkeypatch.setenv("FLASHMEMORY_CACHE", str(tmp_path))
    start = time.perf_counter()
    path = S.ensure_default_checkpoint(progress=None)
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"generating the default took {elapsed:.1f} s"
    assert path.stat().st_size > 500e6
    model = FlashMemoryRetriever.from_checkpoint(path, backend="torch")
    assert (model.hidden_size, model.q_lora_rank, model.n_heads) == (
        C.HIDDEN_SIZE, C.Q_LORA_RANK, C.DEFAULT_N_HEADS)
    g = torch.Generator().manual_seed(0)
    keys = S.mock_compressed_k(2, 2048, generator=g)
    x = S.mock_hidden(2, C.HIDDEN_SIZE, generator=g)
    with torch.inference_mode():
        scores = model.ensemble(x, keys, torch.full((2,), 4 * 2048 - 1))
    assert 0.05 <= (scores > C.DEFAULT_THRESHOLD).float().mean().item() <= 0.30
