"""Smoke tests of the benchmark suite (``bench/``): a tiny sweep end to end through the command
line, the correctness pre-check keeping a wrong provider out of the timings, and the counted
work the roofline rests on. Model sizes are tiny (4 heads) so a sweep takes seconds."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from flashmemory_triton import cli
from flashmemory_triton import constants as C

# bench/ is installed with the package as flashmemory_triton.bench (pyproject's package-dir)
from flashmemory_triton.bench import check, providers, runner, sweeps
from flashmemory_triton.bench.inputs import ModelDims
from flashmemory_triton.bench.roofline import cycle_work, scoring_work

REPO_ROOT = Path(__file__).resolve().parent.parent
ELSEWHERE = Path(tempfile.gettempdir())  # not the repository: the installed bench must run anywhere

TINY = ModelDims(hidden=128, rank=64, heads=4)
TINY_ARGS = ["--hidden", "128", "--rank", "64", "--heads", "4"]


def _run_cli(args, device, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny matmuls: threads only add contention
    return subprocess.run([sys.executable, "-m", "flashmemory_triton.bench", "--device",
                           device.type, *TINY_ARGS, "--no-progress", *args], cwd=ELSEWHERE,
                          env=env, capture_output=True, text=True, timeout=timeout)


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


def test_bench_entry_points(capsys):
    """``flashmemory-triton bench`` hands its arguments to the bench's own parser, under its
    name; ``python -m bench`` still runs from the repository root."""
    assert cli.main(["bench", "--mixed", "--n", "4K"]) == 2
    err = capsys.readouterr().err
    assert "flashmemory-triton bench: error: --n does not apply to --mixed" in err
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0 and "usage: flashmemory-triton bench" in capsys.readouterr().out
    proc = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: python -m bench" in proc.stdout, proc.stderr
    # The installed CPU bench names itself as it was run (not a repo-root-only command).
    from flashmemory_triton.bench import cpu
    with pytest.raises(SystemExit) as exc:
        cpu.main(["--help"])
    assert exc.value.code == 0
    assert "usage: python -m flashmemory_triton.bench.cpu" in capsys.readouterr().out


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
@pytest.mark.parametrize("name, precision, layout", [
    ("triton", "fp8", "per_layer"), ("cycle_triton", "bf16", "per_layer"),
    ("triton", "bf16", "shared"), ("triton_v1", "bf16", "shared"),
    ("triton_fused", "bf16", "shared")])
def test_triton_runners_pass_the_check(device, name, precision, layout):
    """The Triton providers call ops/the retriever as they expect (under the interpreter on
    the CPU, where the sweep itself never times them)."""
    from flashmemory_triton.bench.inputs import Model, make_inputs
    from flashmemory_triton.bench.release import release_scores_blocked
    model = Model(TINY, device)
    shape = sweeps.Shape(64, 2, layout, "mean")
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


def test_time_budget_skips_rows_not_started_and_puts_the_headline_first(device):
    sweep = sweeps.Sweep(n=(64, 256), batch=(1,), layout=("per_layer", "shared"),
                         precision=("bf16",), ensemble=("max",))
    ref = [providers.PROVIDERS["reference"]]
    # no budget: the sweep's own order; a budget: the shapes nearest the headline first
    assert [s for s, _, _ in runner.plan(sweep, ref)] == list(sweep.shapes())
    ordered = [s for s, _, _ in runner.plan(sweep, ref, headline_first=True)]
    assert ordered == sorted(sweep.shapes(), key=sweeps.closeness_to_headline)
    assert (ordered[0].layout, ordered[0].n) == ("shared", 256)
    options = runner.Options(device=device, dims=TINY, progress=False, time_budget_s=0.0)
    result = runner.run_sweep(sweep, ref, options)
    assert len(result.rows) == 4
    for row in result.rows:
        assert row["status"] == "skipped: time budget (--time-budget 0 s)"
        assert "median_ms" not in row


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
    short = check.check_output(scores[:, :10], scores, logits, scores, logits, "bf16")
    assert "shape" in short.reason
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
    # design §5: ~745 FLOP/byte on the keys alone (shared), ~248 with a buffer per layer.
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


# --- the mixed-length serving batch (bench/mixed.py) ---------------------------------------------
def _mixed_options(**kw):
    from flashmemory_triton.bench import mixed
    from flashmemory_triton.bench.roofline import Ceilings
    # Fixed ceilings: the roofline arithmetic is exercised without timing matmuls here.
    return dict(rep_ms=5, min_samples=2, seed=0,
                ceilings=Ceilings(matmul_tflops={"fp32": 1.0, "bf16": 2.0}, copy_gbps=10.0,
                                  notes=[]),
                progress=lambda m: None, **kw), mixed


def test_mixed_time_budget_skips_rows_not_started(device):
    """``--mixed --time-budget 0``: every row is recorded as skipped, none timed, and the
    result (rows, config) is still complete for the writers."""
    from flashmemory_triton.bench.inputs import Model
    opts, mixed = _mixed_options(triton_ok=True, time_budget_s=0.0)
    scenario = mixed.Scenario(requests=2, min_n=1, max_n=70, layouts=("shared",),
                              precisions=("bf16",))
    result = mixed.run_mixed(scenario, Model(TINY, device), **opts)
    assert len(result.rows) == len(mixed.PROVIDERS)
    for row in result.rows:
        assert row["status"] == "skipped: time budget (--time-budget 0 s)", row
        assert "median_ms" not in row


def test_mixed_scenario_lengths_and_counted_work():
    from flashmemory_triton.bench import mixed
    from flashmemory_triton.bench.inputs import Model
    gpu = mixed.GPU_SCENARIO
    assert (gpu.requests, gpu.min_n, gpu.max_n) == (32, 8 * 1024, 256 * 1024)
    lengths = gpu.lengths(0)
    assert lengths == gpu.lengths(0) and lengths != gpu.lengths(1)  # seeded, and it matters
    assert len(lengths) == 32 and all(8192 <= n <= 262144 for n in lengths)
    # Log-uniform: half the lengths fall below the geometric middle sqrt(8K * 256K) = 45K
    # (Binomial(32, 1/2) lies in [8, 24] with probability 0.9965); a uniform draw would put
    # only (45K - 8K) / 248K = 15% there, about 5 of 32.
    below = sum(n < math.sqrt(8192 * 262144) for n in lengths)
    assert 8 <= below <= 24, lengths
    x = mixed.make_mixed_inputs(Model(TINY, torch.device("cpu")),
                                mixed.Scenario(requests=3, min_n=1, max_n=130), True, seed=0)
    work = mixed.mixed_work(x, TINY)
    total = sum(x.lengths)
    assert work.flops == TINY.n_layers * total * C.flops_per_chunk_per_layer(TINY.heads)
    assert work.bytes == (TINY.n_layers * total * C.CHUNK_BYTES
                          + TINY.n_layers * 3 * TINY.heads * (C.HEAD_DIM + 1) * 4 + total * 4)
    # The pool's pages are shuffled (not request after request) and hold the requests' keys.
    from flashmemory_triton import paged
    assert paged.unpack_pool(x.pool.pool, x.pool.page_table, x.pool.n_chunks)[1].equal(x.rows[1])
    used = [int(p) for b, n in enumerate(x.lengths)
            for p in x.pool.page_table[b, :-(-n // 64)]]
    assert sorted(used) == list(range(len(used))) and used != sorted(used)


@pytest.mark.interpreter
def test_mixed_providers_pass_the_check_under_interpreter(device):
    """Every mixed provider, Triton ones included (the interpreter on the CPU), is checked
    against the per-request reference and then timed; speedups and launches are reported."""
    from flashmemory_triton.bench.inputs import Model
    opts, mixed = _mixed_options(triton_ok=True)
    scenario = mixed.Scenario(requests=3, min_n=1, max_n=130, layouts=("shared", "per_layer"),
                              precisions=("bf16",), ensemble="mean")
    result = mixed.run_mixed(scenario, Model(TINY, device), **opts)
    rows = {(r["provider"], r["layout"]): r for r in result.rows}
    assert len(rows) == 2 * len(mixed.PROVIDERS)
    assert rows[("triton_paged_v1", "per_layer")]["status"] == mixed.SHARED_ONLY[
        "triton_paged_v1"]  # v2 serves the shared pool only: nothing to compare there
    for key, r in rows.items():
        if key == ("triton_paged_v1", "per_layer"):
            continue
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["roofline_pct"] > 0
        assert r["logit_rel_rms"] <= r["tolerance"], r
        assert r["speedup_vs_reference_loop"] > 0
    assert rows[("triton_per_request", "shared")]["launches"] == 3
    assert rows[("triton_paged", "per_layer")]["launches"] == 1
    assert rows[("triton_varlen", "shared")]["speedup_vs_triton_per_request"] > 0


def test_mixed_check_refuses_wrong_scores_and_wrong_fill(device, monkeypatch):
    """A provider off by 5% fails the check and is not timed; so does one whose padding past
    a request's length is not the documented fill."""
    from flashmemory_triton import paged
    from flashmemory_triton.bench.inputs import Model
    opts, mixed = _mixed_options(triton_ok=True)
    real = paged.score_paged

    def wrong_fill(*a, **kw):
        out = real(*a, **kw)
        out.scores[out.scores == 0] = 0.5  # the fill: 0 past each length
        return out
    monkeypatch.setattr(paged, "score_paged", wrong_fill)
    real_release = mixed.release_scores

    def wrong_reference(q, w, k, ensemble):
        s, g = real_release(q, w, k, ensemble)
        return s, g * 1.05
    monkeypatch.setattr(mixed, "release_scores", wrong_reference)
    scenario = mixed.Scenario(requests=2, min_n=3, max_n=70, layouts=("shared",),
                              precisions=("bf16",))
    result = mixed.run_mixed(scenario, Model(TINY, device),
                             providers=("reference_loop", "triton_paged"), **opts)
    rows = {r["provider"]: r for r in result.rows}
    assert rows["reference_loop"]["status"].startswith("failed: logit relative RMS"), rows
    assert rows["triton_paged"]["status"] == ("failed: the fill past a request's length is not "
                                              "score 0 / logit -inf"), rows
    assert all("median_ms" not in r for r in result.rows)


def test_cli_mixed_writes_csv_json_png(device, tmp_path):
    out = tmp_path / "mixed"
    proc = _run_cli(["--mixed", "--requests", "3", "--min-n", "2", "--max-n", "200",
                     "--repeats", "2", "--out", str(out)], device)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {"mixed.csv", "mixed.json", "mixed.png"} <= {p.name for p in out.iterdir()}
    assert (out / "mixed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(out / "mixed.csv")))
    ref = [r for r in rows if r["provider"] == "reference_loop"]
    assert len(ref) == 1 and ref[0]["status"] == "ok" and float(ref[0]["median_ms"]) > 0
    doc = json.loads((out / "mixed.json").read_text())
    assert len(doc["config"]["lengths"]) == 3 and "device_name" in doc["meta"]
    assert "mixed batch: 3 requests" in proc.stdout
    if device.type != "cuda":
        assert all(r["status"].startswith("skipped: Triton is timed on CUDA only")
                   for r in rows if r["provider"] != "reference_loop")


@pytest.mark.parametrize("args, message", [
    (["--mixed", "--n", "4K"], "--n does not apply to --mixed"),
    (["--requests", "4"], "--requests applies to --mixed only"),
    (["--mixed", "--min-n", "10", "--max-n", "5"], "--min-n <= --max-n"),
    (["--mixed", "--providers", "triton"], "unknown --mixed provider"),
    (["--mixed", "--ensemble", "max,mean"], "one --ensemble"),
])
def test_cli_mixed_rejects_bad_arguments(device, args, message):
    proc = _run_cli(args, device, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_default_results_dir(monkeypatch, tmp_path):
    """A checkout keeps results in its bench/results/; an installed copy (no pyproject.toml
    next to it) writes under the current directory, never into site-packages."""
    from flashmemory_triton.bench import environment
    assert environment.REPO_ROOT == REPO_ROOT  # editable install or python -m bench: a checkout
    assert environment.results_dir() == REPO_ROOT / "bench" / "results"
    monkeypatch.setattr(environment, "REPO_ROOT", None)
    monkeypatch.chdir(tmp_path)
    assert environment.results_dir() == tmp_path / "bench-results"
    assert environment.collect(torch.device("cpu"))["git_commit"] is None
