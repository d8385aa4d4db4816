"""``flashmemory-triton demo``: end to end in a subprocess, every checkpoint source, bad flags."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from flashmemory_triton import FlashMemoryRetriever, cli
from flashmemory_triton import constants as C
from flashmemory_triton import synthetic as S
from flashmemory_triton.checkpoint import CHECKPOINT_CANDIDATES, DEFAULT_REPO_ID
from test_checkpoint import make_hub_cache, no_network  # noqa: F401  (fixture)

# H = 16 heads: small, and still enough heads for the designed score spread.
SMALL = dict(hidden=64, rank=16, n_heads=16)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    return S.write_checkpoint(tmp_path_factory.mktemp("ckpt") / "small.safetensors", **SMALL)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Keep the demo away from the user's cache and from the network."""
    monkeypatch.setenv("FLASHMEMORY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def demo(capsys, *args) -> tuple[int, str, str]:
    """Run the demo in-process through the real CLI entry point."""
    try:
        rc = cli.main(["demo", *args])
    except SystemExit as exc:  # argparse errors
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def section(out: str, title: str) -> list[str]:
    """The indented lines under the ``[demo] <title>`` header."""
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"[demo] {title}"))
    body = []
    for ln in lines[start + 1:]:
        if not ln.startswith("    "):
            break
        body.append(ln.strip())
    return body


# --- end to end -------------------------------------------------------------------------------
def test_help_does_not_import_torch():
    """``flashmemory-triton --help`` must answer at once: importing torch alone takes seconds."""
    code = ("import sys\nfrom flashmemory_triton import cli\ntry:\n    cli.main(['--help'])\n"
            "except SystemExit as exc:\n    assert exc.code == 0\n"
            "assert 'torch' not in sys.modules, 'torch imported'\nprint('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.endswith("ok\n"), proc.stdout + proc.stderr
    assert "demo" in proc.stdout and "decode" in proc.stdout and "bench" in proc.stdout


def test_package_exports_resolve():
    """The package imports its public names lazily (for the fast --help above); every name in
    ``__all__`` must still resolve, and nothing public may be missing from ``__all__``."""
    import flashmemory_triton as fm
    assert sorted(fm.__all__) == sorted([*fm._EXPORTS, *fm._SUBMODULES])
    for name in fm.__all__:
        assert getattr(fm, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fm.nope  # noqa: B018


def test_demo_subprocess_end_to_end(small_ckpt, tmp_path):
    B, N, K, seed = 3, 300, 20, 4
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(FLASHMEMORY_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "flashmemory_triton", "demo", "--ckpt", str(small_ckpt),
         "--batch", str(B), "--n-chunks", str(N), "--top-k", str(K), "--seed", str(seed),
         "--backend", "torch", "--repeats", "2"],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "[demo] layers: l10, l12, l20" in out
    # a real checkpoint: the inputs are still random, and the demo says so (weights not synthetic)
    assert "NOTE: the inputs are RANDOM" in out and "SYNTHETIC" not in out
    assert (f"n_heads={SMALL['n_heads']} head_dim={C.HEAD_DIM} hidden={SMALL['hidden']} "
            f"q_lora_rank={SMALL['rank']}") in out
    assert f"max_position={C.MAX_POSITION_RELEASE}" in out
    assert "[demo] backend: torch" in out
    assert f"positions {4 * N - 1} per row" in out
    assert [ln.split()[0] for ln in section(out, "per-layer")] == list(C.LAYER_NAMES)
    assert re.search(r"time per call: [0-9.]+ ms \(ensemble\(\), median of 2", out)

    # The printed selections must be what the library computes on the same mock inputs.
    model = FlashMemoryRetriever.from_checkpoint(small_ckpt, backend="torch")
    g = torch.Generator().manual_seed(seed)
    keys = S.mock_compressed_k(B, N, generator=g)
    hidden = S.mock_hidden(B, SMALL["hidden"], generator=g)
    with torch.inference_mode():
        scores = model.ensemble(hidden, keys, torch.full((B,), 4 * N - 1), mode="max")
    kept = (scores > C.DEFAULT_THRESHOLD).sum(1).tolist()
    assert section(out, "threshold selection") == [
        f"row {b}: keep {kept[b]}/{N} chunks ({kept[b] / N:.1%})" for b in range(B)]
    assert 0 < sum(kept) < B * N  # the synthetic weights keep a minority, not all or none
    for b, line in enumerate(section(out, "top-k selection")):
        assert line.startswith(f"row {b}: keep {K}/{N} chunks")
        overlap = int(re.search(r"(\d+)/\d+ also above", line).group(1))
        assert overlap == min(K, kept[b])  # top-k of the scores contains the best hits


# --- checkpoint sources, in-process -------------------------------------------------------------
FAST = ("--backend", "torch", "--batch", "1", "--n-chunks", "64", "--repeats", "1")


def test_demo_hub_local_directory(small_ckpt, isolated, capsys):
    rc, out, err = demo(capsys, "--hub", str(small_ckpt.parent), *FAST)
    assert rc == 0, err
    assert f"(from {small_ckpt.parent})" in out


def test_demo_hub_cache_offline(small_ckpt, tmp_path, isolated, no_network, capsys):
    make_hub_cache(tmp_path / "hub", {CHECKPOINT_CANDIDATES[0]: small_ckpt})
    rc, out, err = demo(capsys, "--hub", DEFAULT_REPO_ID, "--cache-dir", str(tmp_path / "hub"),
                        "--local-files-only", *FAST)
    assert rc == 0, err
    assert f"(from {DEFAULT_REPO_ID})" in out and "snapshots" in out


def test_demo_default_checkpoint_generated_once(isolated, monkeypatch, capsys):
    # The embedded default at a small size: generated with a progress message, then cached.
    monkeypatch.setattr(S, "DEFAULT_SHAPE", dict(SMALL, head_dim=C.HEAD_DIM))
    rc, out, err = demo(capsys, *FAST)
    assert rc == 0, err
    assert "generating the synthetic default checkpoint" in err
    assert "(synthetic default)" in out
    # the default run says plainly that its scores mean nothing about a real model
    assert "NOTE: the weights are SYNTHETIC" in out and "inputs are RANDOM" in out
    assert "mean nothing about a real model" in out
    rc, out, err = demo(capsys, *FAST)
    assert rc == 0 and "generating" not in err


def test_demo_options(small_ckpt, isolated, capsys):
    rc, out, err = demo(capsys, "--ckpt", str(small_ckpt), "--layers", "l20,l10", "--dtype",
                        "bfloat16", "--ensemble", "mean", "--threshold", "0.25",
                        "--max-position", "100", *FAST)
    assert rc == 0, err
    assert "[demo] layers: l20, l10" in out
    assert "dtype=bfloat16" in out and "max_position=100" in out
    assert "ensemble (mean) of 2 layer(s)" in out and "score > 0.25" in out
    assert "RoPE clamps it" in out  # position 255 is past a 100-row table
    assert "k=6, default 10%" in out  # 10% of 64 chunks


# --- bad flags: argparse errors (exit 2 with usage) --------------------------------------------
@pytest.mark.parametrize("args,message", [
    pytest.param(["--batch", "0"], "--batch: must be >= 1", id="batch-zero"),
    pytest.param(["--n-chunks", "many"], "--n-chunks: expected an integer", id="n-chunks-text"),
    pytest.param(["--threshold", "1.5"], "--threshold: must be in [0, 1]", id="threshold-range"),
    pytest.param(["--threshold", "nan"], "--threshold: must be in [0, 1]", id="threshold-nan"),
    pytest.param(["--top-k", "0"], "--top-k: must be >= 1", id="top-k-zero"),
    pytest.param(["--seed", "-3"], "--seed: must be >= 0", id="negative-seed"),
    pytest.param(["--max-position", "0"], "--max-position: must be >= 1", id="max-position"),
    pytest.param(["--ensemble", "min"], "--ensemble: invalid choice", id="ensemble"),
    pytest.param(["--backend", "cuda"], "--backend: invalid choice", id="backend"),
    pytest.param(["--dtype", "int8"], "--dtype: invalid choice", id="dtype"),
    pytest.param(["--ckpt", "a.pt", "--hub", "x/y"], "not allowed with argument",
                 id="ckpt-and-hub"),
    pytest.param(["--layers", ","], "--layers: expected layer names", id="empty-layers"),
])
def test_bad_flags_argparse(args, message, isolated, capsys):
    rc, out, err = demo(capsys, *args)
    assert rc == 2 and message in err and out == ""


# --- bad values found while running: exit 2 with one line naming the problem ---------------------
@pytest.mark.parametrize("make_args,message", [
    pytest.param(lambda d, ck: ["--ckpt", str(d / "absent.safetensors")],
                 "checkpoint file not found", id="missing-file"),
    pytest.param(lambda d, ck: ["--ckpt", str(d / "w.bin")], "unknown checkpoint extension",
                 id="bad-extension"),
    pytest.param(lambda d, ck: ["--ckpt", str(ck), "--layers", "l10,l99"], "layer 'l99' not found",
                 id="unknown-layer"),
    pytest.param(lambda d, ck: ["--ckpt", str(ck), "--revision", "v1"], "only apply with --hub",
                 id="hub-flag-without-hub"),
    pytest.param(lambda d, ck: ["--ckpt", str(ck), "--device", "meta"],
                 "only cpu and cuda are supported", id="device-type"),
    pytest.param(lambda d, ck: ["--ckpt", str(ck), "--device", "cuda:x"],
                 "--device must be 'cpu' or 'cuda[:N]', got 'cuda:x'", id="device-syntax"),
    pytest.param(lambda d,
                 ck: ["--hub", "someone/absent", "--cache-dir", str(d), "--local-files-only"],
                 "no FlashMemory checkpoint found for 'someone/absent'", id="hub-not-cached"),
])
def test_bad_flags_at_run_time(make_args, message, small_ckpt, tmp_path, isolated, no_network,
                               capsys):
    (tmp_path / "w.bin").write_bytes(b"\0" * 8)
    rc, out, err = demo(capsys, *make_args(tmp_path, small_ckpt), *FAST)
    assert rc == 2, err
    assert message in err and err.count("\n") == 1  # one line, no traceback


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_requested_without_cuda(small_ckpt, isolated, capsys):
    rc, out, err = demo(capsys, "--ckpt", str(small_ckpt), "--device", "cuda", *FAST)
    assert rc == 2 and "CUDA is not available" in err
