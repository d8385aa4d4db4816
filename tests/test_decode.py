"""The toy sparse-decode loop: offload reads give exactly the masked run, summary and CLI."""

from __future__ import annotations

import argparse

import pytest
import torch

from flashmemory_triton import cli
from flashmemory_triton import constants as C
from flashmemory_triton import decode as D
from flashmemory_triton.reference import dequant_compressed_k

SMALL = dict(steps=30, interval=8, n_chunks=300, batch=2, page_size=16, max_pages=5, recent=20,
             sink=3)


def _run(device, **kw):
    cfg = D.DecodeConfig(**{**SMALL, "device": str(device), **kw})
    lines = []
    return D.decode(cfg, log=lines.append), lines


@pytest.mark.parametrize("kw", [
    pytest.param(dict(select="page"), id="page"),
    pytest.param(dict(select="chunk", max_resident=120), id="chunk-capped"),
    pytest.param(dict(select="chunk", threshold=0.3), id="chunk"),
    pytest.param(dict(select="topk", top_k=50), id="topk"),
    pytest.param(dict(select="page", fallback_bound=0.05), id="page-fallback"),
    pytest.param(dict(select="page", interval=6, batch=1), id="interval-not-multiple-of-4"),
    pytest.param(dict(select="page", n_chunks=0, page_size=4, max_pages=2, recent=4),
                 id="empty-prompt-history"),
])
def test_offload_gives_the_same_tokens_and_logits(device, kw):
    masked, _ = _run(device, **kw)
    offloaded, lines = _run(device, offload=True, **kw)
    assert masked.tokens.shape == (SMALL["batch"] if "batch" not in kw else kw["batch"], 30)
    assert torch.equal(masked.tokens, offloaded.tokens)
    assert torch.equal(masked.logits, offloaded.logits)  # bit for bit, not allclose
    assert [c["keep"] for c in masked.cycles] == [c["keep"] for c in offloaded.cycles]
    assert sum(c["bytes_moved"] for c in offloaded.cycles) > 0
    assert all(c["bytes_moved"] == 0 for c in masked.cycles)


def test_selection_changes_the_output(device):
    """Sanity: the equality above is not vacuous; a different resident set changes logits."""
    a, _ = _run(device, select="page", max_pages=3)
    b, _ = _run(device, select="page", max_pages=19)
    assert not torch.equal(a.logits, b.logits)


def test_summary_reports_reserve_fraction(device):
    res, lines = _run(device, offload=True, select="page")
    s = res.summary
    n_cycles = -(-SMALL["steps"] // SMALL["interval"])
    assert s["cycles"] == len(res.cycles) == n_cycles
    assert s["tokens"] == SMALL["batch"] * SMALL["steps"]
    folded = (n_cycles - 1) * SMALL["interval"] // C.TOKENS_PER_CHUNK
    assert s["full_kv_bytes"] == SMALL["batch"] * (SMALL["n_chunks"] + folded) * C.ATTN_KV_BYTES
    reserve = SMALL["batch"] * SMALL["max_pages"] * SMALL["page_size"] * C.ATTN_KV_BYTES
    assert s["device_kv_bytes"] == reserve
    assert s["saving"] == pytest.approx(1 - reserve / s["full_kv_bytes"])
    keeps = [c["keep"] for c in res.cycles]
    assert s["avg_keep"] == pytest.approx(sum(keeps) / len(keeps))
    # page mode keeps exactly max_pages pages (the last one partial) of n_chunks real chunks
    assert 0 < s["avg_keep"] < 0.5
    assert len([l for l in lines if l.startswith("cycle")]) == n_cycles
    # "GPU-side" only when a GPU holds the reserve
    label = ("GPU-side KV (reserve)" if device.type == "cuda"
             else "device-side KV (reserve; device cpu, no GPU)")
    assert any(label in l and "saving" in l for l in lines)
    assert device.type == "cuda" or not any("GPU-side" in l for l in lines)


def test_cycles_follow_interval_and_positions(device):
    res, _ = _run(device, select="page")
    prompt = SMALL["n_chunks"] * C.TOKENS_PER_CHUNK
    for i, c in enumerate(res.cycles):
        step = i * SMALL["interval"]
        assert c["step"] == step
        assert c["position"] == prompt + step - 1  # the latest decoded token's position
        assert c["chunks"] == SMALL["n_chunks"] + step // C.TOKENS_PER_CHUNK


def test_deterministic_in_seed(device):
    a, _ = _run(device, seed=3, steps=10)
    b, _ = _run(device, seed=3, steps=10)
    c, _ = _run(device, seed=4, steps=10)
    assert torch.equal(a.logits, b.logits) and not torch.equal(a.logits, c.logits)


def test_encode_row_keys_round_trip():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(3, 5, C.HEAD_DIM, generator=g) * 7
    k[1, 2] = 0
    rows = D.encode_row_keys(k)
    assert rows.dtype == torch.uint8 and rows.shape == (3, 5, C.CHUNK_BYTES)
    back = dequant_compressed_k(rows)
    assert torch.equal(back[1, 2], torch.zeros(C.HEAD_DIM))
    # e4m3 keeps 3 mantissa bits: relative error at most 2**-4 of the value (plus subnormals)
    err = (back - k).abs()
    assert bool((err <= k.abs() * 2 ** -4 + k.abs().amax(-1, keepdim=True) * 2 ** -9).all())


def test_selected_indices():
    mask = torch.tensor([[False, True, True, False], [True, False, False, False]])
    idx, valid = D.selected_indices(mask)
    assert idx.tolist() == [[1, 2], [0, -1]] and valid.tolist() == [[True, True], [True, False]]
    idx, valid = D.selected_indices(torch.zeros(2, 0, dtype=torch.bool))
    assert idx.shape == (2, 0)


def _cli(monkeypatch, argv):
    # Only the decode subcommand: the dispatcher imports every registered module.
    monkeypatch.setattr(cli, "SUBCOMMANDS", {"decode": cli.SUBCOMMANDS["decode"]})
    return cli.main(["decode", *argv])


def test_cli_offload_run(monkeypatch, capsys, device):
    rc = _cli(monkeypatch, ["--offload", "--n-chunks", "500", "--steps", "20", "--interval", "10",
                            "--page-size", "16", "--max-pages", "4", "--recent", "16",
                            "--device", str(device)])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("cycle ") == 2 and "pages moved" in out and "summary: 20 tokens" in out
    # reserve 4 pages of 16 chunks against 500 + 10 // 4 = 502 chunks of history
    assert f"= {4 * 16 / 502:.2%} of full" in out


def test_cli_reserve_too_small_is_a_clear_error(monkeypatch, capsys):
    rc = _cli(monkeypatch, ["--offload", "--n-chunks", "200", "--steps", "4", "--page-size",
                            "16", "--max-pages", "4", "--reserve-pages", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "reserve_pages=2" in err


def test_parser_defaults_follow_constants():
    p = argparse.ArgumentParser()
    D.add_arguments(p)
    args = p.parse_args([])
    assert args.interval == C.RETRIEVAL_INTERVAL and args.recent == C.DEFAULT_RECENT_CHUNKS
    assert args.max_pages == C.DEFAULT_MAX_PAGES and args.page_size == C.PAGE_CHUNKS
    assert args.threshold == C.DEFAULT_THRESHOLD and args.select == "page" and not args.offload


@pytest.mark.parametrize("kw,match", [
    pytest.param(dict(select="pages"), "select", id="mode"),
    pytest.param(dict(interval=0), "interval", id="interval-0"),
    pytest.param(dict(steps=-1), "steps", id="steps-negative"),
    pytest.param(dict(select="page", top_k=5), "top_k", id="topk-in-page"),
    pytest.param(dict(select="topk", max_resident=5), "max_resident", id="cap-in-topk"),
    pytest.param(dict(backend="cuda"), "backend", id="backend"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        D.decode(D.DecodeConfig(**{**SMALL, **kw}), log=lambda s: None)
