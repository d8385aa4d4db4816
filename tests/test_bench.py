"""Smoke tests of the benchmark suite (``bench/``): a tiny sweep end to end through the command
line, the correctness pre-check keeping a wrong provider out of the timings, and the counted
work the roofline rests on. Model sizes are tiny (4 heads) so a sweep takes seconds."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
# bench/ is a top-level package of the repository, not of the installed distribution; the
# tests run from a checkout, so make it importable whatever directory pytest started in.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from flashmemory_triton import constants as C  # noqa: E402

from bench import check, providers, runner, sweeps  # noqa: E402
from bench.inputs import ModelDims  # noqa: E402
from bench.roofline import cycle_work, scoring_work  # noqa: E402

TINY = ModelDims(hidden=128, rank=64, heads=4)
TINY_ARGS = ["--hidden", "128", "--rank", "64", "--heads", "4"]


def _run_cli(args, device, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny matmuls: threads only add contention
    return subprocess.run([sys.executable, "-m", "bench", "--device", device.type, *TINY_ARGS,
                           "--no-progress", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_tiny_sweep_writes_csv_json_png(device, tmp_path):
    out = tmp_path / "run"
    proc = _run_cli(["--n", "256", "--batch", "1", "--layout", "shared,per_layer",
                     "--precision", "bf16", "--ensemble", "max", "--repeats", "2",
                     "--providers", "reference,torch_fast,triton,cycle_torch,cycle_triton",
                     "--out", str(out)], device)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = {p.name for p in out.iterdir()}
    assert {"results.csv", "results.json", "time_vs_n.png", "speedup_vs_n.png",
            "roofline.png"} <= files
    for png in ("time_vs_n.png", "speedup_vs_n.png", "roofline.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = list(csv.DictReader(open(out / "results.csv")))
    by_name = {}
    for r in rows:
        by_name.setdefault(r["provider"], []).append(r)
    assert len(rows) == 2 * 5  # two layouts x five providers, one precision each
    for name in ("reference", "torch_fast", "cycle_torch"):
        for r in by_name[name]:
            assert r["status"] == "ok", r
            assert float(r["median_ms"]) > 0 and float(r["tflops"]) > 0
            assert float(r["logit_rel_rms"]) <= float(r["tolerance"])
    for name in ("triton", "cycle_triton"):
        for r in by_name[name]:
            if device.type == "cuda":
                assert r["status"] == "ok", r
            else:
                assert r["status"].startswith("skipped: Triton is timed on CUDA only"), r
                assert r["median_ms"] == ""
    if device.type != "cuda":
        assert "CPU-only run" in proc.stdout and "say nothing about GPU performance" in proc.stdout

    doc = json.loads((out / "results.json").read_text())
    for key in ("device_name", "torch", "triton", "git_commit", "date_utc"):
        assert key in doc["meta"]
    assert doc["ceilings"]["copy_gbps"] > 0 and doc["ceilings"]["matmul_tflops"]
    assert len(doc["rows"]) == len(rows)


def test_cli_rejects_bad_arguments(device):
    proc = _run_cli(["--precision", "fp16"], device, timeout=120)
    assert proc.returncode == 2
    assert "precision" in proc.stderr and "fp16" in proc.stderr


def _wrong_provider(calls: dict) -> providers.Provider:
    """The reference with every logit off by 5%: far outside the fp32 tolerance."""
    reference = providers.PROVIDERS["reference"]

    def build(ctx, x, shape, precision):
        inner = reference.build(ctx, x, shape, precision)

        def check_call():
            scores, logits = inner.check()
            return scores, logits * 1.05

        def run():
            calls["run"] += 1
            return inner.run()
        return providers.Runner(run=run, check=check_call)
    return providers.Provider("wrong", providers.SCORING, None, False, build,
                              reference.temp_bytes, "deliberately wrong")


def _broken_provider() -> providers.Provider:
    def build(ctx, x, shape, precision):
        raise RuntimeError("kernel failed to compile")
    return providers.Provider("broken", providers.SCORING, None, False, build,
                              lambda *a: 0, "raises")


def test_failing_provider_is_reported_and_not_timed(device):
    calls = {"run": 0}
    sweep = sweeps.Sweep(n=(128,), batch=(1,), layout=("shared",), precision=("bf16",),
                         ensemble=("max",))
    chosen = [providers.PROVIDERS["reference"], _wrong_provider(calls), _broken_provider(),
              providers.PROVIDERS["torch_fast"]]
    options = runner.Options(device=device, dims=TINY, min_samples=2, rep_ms=5, progress=False)
    result = runner.run_sweep(sweep, chosen, options)
    rows = {r["provider"]: r for r in result.rows}
    assert rows["wrong"]["status"].startswith("failed: logit relative RMS error")
    assert "median_ms" not in rows["wrong"] and "speedup_vs_wrong" not in rows["reference"]
    assert calls["run"] == 1  # the one call whose scores the check compares; never timed
    assert rows["broken"]["status"] == "error: RuntimeError: kernel failed to compile"
    # The sweep went on: the providers after the bad ones were checked and timed.
    assert rows["reference"]["status"] == rows["torch_fast"]["status"] == "ok"
    assert rows["torch_fast"]["speedup_vs_reference"] > 0


@pytest.mark.interpreter
@pytest.mark.parametrize("name, precision", [("triton", "fp8"), ("cycle_triton", "bf16")])
def test_triton_runners_pass_the_check(device, name, precision):
    """The Triton providers call ops/the retriever as they expect (under the interpreter on
    the CPU, where the sweep itself never times them)."""
    from bench.inputs import Model, make_inputs
    from bench.release import release_scores_blocked
    model = Model(TINY, device)
    shape = sweeps.Shape(64, 2, "per_layer", "mean")
    x = make_inputs(model, shape)
    expected = release_scores_blocked(x.q, x.w, x.compressed_k, shape.ensemble, 1 << 20)
    run = providers.PROVIDERS[name].build(providers.Context(model=model), x, shape, precision)
    scores, logits = run.check()
    result = check.check_output(run.run(), scores, logits, *expected, precision)
    assert result.ok, result


def test_memory_budget_skips_instead_of_running(device):
    sweep = sweeps.Sweep(n=(64,), batch=(1,), layout=("per_layer",), precision=("bf16",),
                         ensemble=("max",))
    options = runner.Options(device=device, dims=TINY, memory_budget_bytes=1, progress=False)
    result = runner.run_sweep(sweep, [providers.PROVIDERS["reference"]], options)
    [row] = result.rows
    assert row["status"].startswith("skipped: memory (needs ~") and "median_ms" not in row


def test_check_output_conditions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 50, generator=g) * 3
    scores = torch.sigmoid(logits).amax(0)
    assert check.check_output(scores, scores, logits, scores, logits, "fp32").ok
    # Logits within bf16 tolerance, scores consistent with them: passes.
    near = logits * (1 + 2e-3)
    ok = check.check_output(torch.sigmoid(near).amax(0), torch.sigmoid(near).amax(0), near,
                            scores, logits, "bf16")
    assert ok.ok and 1e-3 < ok.logit_rel_rms < 3e-3
    # The same logits fail the fp32 tolerance.
    assert not check.check_output(scores, scores, near, scores, logits, "fp32").ok
    # Right logits but timed-call scores far off: fails on the score bound.
    bad = check.check_output(scores + 0.05, scores, logits, scores, logits, "bf16")
    assert not bad.ok and bad.reason.startswith("score error")
    # Wrong shape and NaN where the reference is finite are failures with a reason.
    assert "shape" in check.check_output(scores[:, :10], scores, logits, scores, logits, "bf16").reason
    holed = logits.clone()
    holed[0, 0, 0] = float("nan")
    assert "non-finite" in check.check_output(scores, scores, holed, scores, logits, "bf16").reason


def test_counted_work_matches_the_spec_cost_model():
    dims = ModelDims()  # the release: 3 layers, 128 heads
    headline = sweeps.Shape(sweeps.HEADLINE_N, 1, "shared", "max")
    work = scoring_work(headline, dims)
    per_chunk = C.flops_per_chunk_per_layer(dims.heads)
    assert work.flops == 3 * sweeps.HEADLINE_N * per_chunk == 3 * 262144 * 32768
    q_and_w = 3 * 128 * (128 + 1) * 4
    assert work.bytes == sweeps.HEADLINE_N * (C.CHUNK_BYTES + 4) + q_and_w
    # SPEC 5: ~745 FLOP/byte on the keys alone (shared), ~248 with a buffer per layer.
    assert 3 * per_chunk / C.CHUNK_BYTES == pytest.approx(745, rel=1e-3)
    per_layer = scoring_work(headline._replace(layout="per_layer"), dims)
    assert per_layer.bytes - work.bytes == 2 * sweeps.HEADLINE_N * C.CHUNK_BYTES
    cycle = cycle_work(headline, dims)
    assert cycle.flops > work.flops and cycle.bytes > 3 * dims.params_per_layer() * 4


def test_presets_cover_the_issue_grid():
    full = sweeps.preset(full=True, on_gpu=True)
    assert full.n == (4096, 16384, 65536, 262144, 1048576) and full.batch == (1, 8, 32)
    assert set(full.layout) == {"shared", "per_layer"} and set(full.ensemble) == {"max", "mean"}
    quick = sweeps.preset(full=False, on_gpu=True)
    assert any(sweeps.is_headline(s) for s in quick.shapes())
    with pytest.raises(ValueError, match="layout"):
        sweeps.Sweep(n=(1,), batch=(1,), layout=("paged",), precision=("bf16",),
                     ensemble=("max",)).validate()
