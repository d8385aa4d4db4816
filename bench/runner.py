"""The sweep loop: inputs per shape, reference once per shape, then each provider checked,
measured for memory and timed. Returns plain rows (dicts) for :mod:`bench.report`."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from flashmemory_triton.utils import _device

from . import environment, timing
from .check import check_output
from .inputs import Model, ModelDims, make_inputs
from .providers import CYCLE, SCORING, Context, Provider
from .release import release_scores_blocked
from .roofline import Ceilings, cycle_work, fp32_matmul_mode, measure_ceilings, scoring_work
from .sweeps import Shape, Sweep, closeness_to_headline

ORACLE_BLOCK_BYTES = 1 << 30  # the blocked reference's temporaries; bounded whatever N and B


@dataclasses.dataclass
class Options:
    device: torch.device
    dims: ModelDims = dataclasses.field(default_factory=ModelDims)
    rep_ms: float = 100.0  # CUDA: time spent on timed calls per row
    min_samples: int = 5  # at least this many timed calls (the CPU makes exactly this many)
    autotune: bool = False  # Triton autotuning before timing (slow to start, then best tiles)
    compile_shapes: int = 2  # how many shapes torch.compile gets (each one recompiles)
    memory_budget_bytes: int | None = None  # None: 90% of free device memory / 80% of RAM
    seed: int = 0
    progress: bool = True
    # Wall-clock seconds after which rows not yet started are recorded as skipped (and the
    # shapes nearest the headline go first), so a run under an outer time limit (a lent GPU's
    # per-command limit, scripts/gpu_check.sh) still writes its results. None: no limit.
    time_budget_s: float | None = None


@dataclasses.dataclass
class Result:
    rows: list[dict]
    ceilings: Ceilings
    meta: dict
    config: dict


def triton_usable(device: torch.device) -> tuple[bool, str]:
    """Triton providers are timed on CUDA only: interpreter timings say nothing."""
    if device.type != "cuda":
        return False, "skipped: Triton is timed on CUDA only (CPU run)"
    if not _device.triton_runs_on(device):
        return False, "skipped: triton is not installed"
    return True, ""


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * 0.9)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 * 8 // 10
    except OSError:
        pass
    return 8 << 30


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _bench_settings(options: Options):
    """fp32 matmuls in full fp32 (the reference is the oracle, and the release does not enable
    TF32), and the retriever's Triton path autotuned iff the sweep's Triton rows are."""
    old_env = os.environ.get("FLASHMEMORY_AUTOTUNE")
    os.environ["FLASHMEMORY_AUTOTUNE"] = "1" if options.autotune else "0"
    try:
        with fp32_matmul_mode(tf32=False):
            yield
    finally:
        if old_env is None:
            os.environ.pop("FLASHMEMORY_AUTOTUNE", None)
        else:
            os.environ["FLASHMEMORY_AUTOTUNE"] = old_env


def _set_recompile_limit(n: int) -> None:
    import torch._dynamo.config as dynamo_config
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), n))


def plan(sweep: Sweep, providers: list[Provider], headline_first: bool = False
         ) -> list[tuple[Shape, Provider, str]]:
    """Every row of the sweep, input-major (rows sharing inputs are adjacent); with
    ``headline_first`` the shapes nearest the headline first (a stable sort: a shape's rows
    stay together)."""
    shapes = list(sweep.shapes())
    if headline_first:
        shapes.sort(key=closeness_to_headline)
    return [(shape, p, prec) for shape in shapes for p in providers
            for prec in p.row_precisions(sweep.precision)]


def run_sweep(sweep: Sweep, providers: list[Provider], options: Options) -> Result:
    device = options.device
    start = time.monotonic()
    budget_s = options.time_budget_s
    rows_plan = plan(sweep.validate(), providers, headline_first=budget_s is not None)
    compile_shapes = set(sorted(sweep.shapes(), key=closeness_to_headline)[:options.compile_shapes])
    _set_recompile_limit(2 * len(compile_shapes))
    triton_ok, triton_skip = triton_usable(device)
    rows: list[dict] = []
    with _bench_settings(options):
        ceilings = measure_ceilings(device, lambda fn: timing.time_call(
            fn, device, rep_ms=options.rep_ms, min_samples=options.min_samples).median_ms)
        ctx = Context(model=Model(options.dims, device, seed=options.seed),
                      autotune=options.autotune)
        # In a log (no terminal) a redraw every 30 s is a heartbeat, not thousands of lines.
        bar = tqdm(total=len(rows_plan), desc="bench", unit="row", disable=not options.progress,
                   mininterval=0.1 if sys.stderr.isatty() else 30.0)
        inputs_key, inputs, oracle_key, oracle = None, None, None, None
        for shape, provider, precision in rows_plan:
            bar.set_postfix_str(f"{provider.name} {precision} {shape.label()}")
            row = _base_row(shape, provider, precision, options.dims)
            skip = _static_skip(shape, provider, options, triton_ok, triton_skip, compile_shapes)
            if not skip and budget_s is not None and time.monotonic() - start > budget_s:
                skip = f"skipped: time budget (--time-budget {budget_s:g} s)"
            if not skip:
                if inputs_key != shape[:3]:
                    inputs = oracle = None
                    _release_memory(device)
                    inputs, inputs_key = make_inputs(ctx.model, shape, options.seed), shape[:3]
                if oracle_key != shape:
                    oracle, oracle_key = release_scores_blocked(
                        inputs.q, inputs.w, inputs.compressed_k, shape.ensemble,
                        ORACLE_BLOCK_BYTES), shape
                # After the inputs exist, so the free memory is what the provider will find.
                skip = _memory_skip(shape, provider, precision, options)
            if skip:
                row["status"] = skip
            else:
                _measure(row, ctx, inputs, oracle, shape, provider, precision, options, ceilings)
            rows.append(row)
            bar.update()
        bar.close()
    add_speedups(rows)
    config = {"sweep": dataclasses.asdict(sweep),
              "providers": {p.name: p.description for p in providers},
              **{k: v for k, v in dataclasses.asdict(options).items() if k != "device"},
              "device": str(device),
              "compile_shapes_used": sorted(s.label() for s in compile_shapes)}
    return Result(rows=rows, ceilings=ceilings, meta=environment.collect(device), config=config)


def _static_skip(shape, provider, options, triton_ok, triton_skip, compile_shapes) -> str:
    """Why a row is not run whatever the memory: no Triton here, or past the compile budget."""
    if provider.needs_triton and not triton_ok:
        return triton_skip
    if provider.cpu_only and options.device.type != "cpu":
        return "skipped: the CPU path is timed on CPU runs only"
    if provider.name == "torch_compile" and shape not in compile_shapes:
        return f"skipped: compile budget (--compile-shapes {options.compile_shapes})"
    return ""


def _memory_skip(shape, provider, precision, options) -> str:
    need = provider.temp_bytes(shape, options.dims, precision)
    budget = (options.memory_budget_bytes if options.memory_budget_bytes is not None
              else _free_bytes(options.device))
    if need > budget:
        return f"skipped: memory (needs ~{need / 2**30:.1f} GiB, budget {budget / 2**30:.1f} GiB)"
    return ""


def _base_row(shape: Shape, provider: Provider, precision: str, dims: ModelDims) -> dict:
    work = cycle_work(shape, dims) if provider.kind == CYCLE else scoring_work(shape, dims)
    return {"provider": provider.name, "kind": provider.kind, "n": shape.n, "batch": shape.batch,
            "layout": shape.layout, "ensemble": shape.ensemble, "precision": precision,
            "layers": dims.n_layers, "heads": dims.heads, "status": "",
            "flops": work.flops, "bytes": work.bytes, "intensity": work.intensity}


def _measure(row, ctx, inputs, oracle, shape, provider, precision, options, ceilings) -> None:
    """Check, then peak memory, then timing; fills ``row`` in place."""
    device = options.device
    try:
        runner = provider.build(ctx, inputs, shape, precision)
        check_scores, check_logits = runner.check()
        result = check_output(runner.run(), check_scores, check_logits, oracle[0], oracle[1],
                              precision)
        del check_scores, check_logits
        row.update(logit_rel_rms=result.logit_rel_rms, score_max_err=result.score_max_err,
                   tolerance=result.tolerance)
        if not result.ok:
            row["status"] = f"failed: {result.reason}"
            return
        peak = timing.peak_memory_bytes(runner.run, device)
        estimate = timing.wall_ms(runner.run, device)
        t = timing.time_call(runner.run, device, rep_ms=options.rep_ms,
                             min_samples=options.min_samples, estimate_ms=estimate)
    except Exception as exc:  # a broken provider is reported, the sweep goes on
        row["status"] = failure_status(exc, device)
        return
    row.update(timed_fields(row, t, peak, ceilings, precision))


def failure_status(exc: Exception, device: torch.device) -> str:
    """The status of a row whose provider raised: out of memory is a skip (and the memory is
    released for the next row), anything else an error with its first line."""
    if isinstance(exc, torch.OutOfMemoryError):
        _release_memory(device)
        return "skipped: out of memory"
    first_line = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"error: {type(exc).__name__}: {first_line}"


def timed_fields(row: dict, t: timing.Timing, peak: int | None, ceilings: Ceilings,
                 precision: str) -> dict:
    """A passing row's measured columns: times, rates from the row's counted ``flops`` and
    ``bytes``, its place under the roofline, peak memory."""
    seconds = t.median_ms * 1e-3
    tflops = row["flops"] / seconds / 1e12
    attainable, bound = ceilings.attainable_tflops(precision, row["intensity"])
    return dict(status="ok", median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                spread_pct=t.spread_pct, samples=t.samples, tflops=tflops,
                gbps=row["bytes"] / seconds / 1e9, roofline_tflops=attainable, bound=bound,
                roofline_pct=100 * tflops / attainable if attainable else None,
                peak_mem_mb=peak / 2**20 if peak is not None else None)


def add_speedups(rows: list[dict]) -> None:
    """``speedup_vs_<provider>`` = that provider's time / this row's time, same shape and kind.

    The baseline is the provider's row of the same precision if it has one, else its fastest
    passing row of the shape (the fp32 reference has a single row; torch_fast has no fp8).
    """
    ok = [r for r in rows if r["status"] == "ok"]
    by_group: dict[tuple, list[dict]] = {}
    for r in ok:
        key = (r["kind"], r["n"], r["batch"], r["layout"], r["ensemble"])
        by_group.setdefault(key, []).append(r)
    for group in by_group.values():
        names = list(dict.fromkeys(r["provider"] for r in group))
        for r in group:
            for name in names:
                candidates = [b for b in group if b["provider"] == name]
                same = [b for b in candidates if b["precision"] == r["precision"]]
                base = same[0] if same else min(candidates, key=lambda b: b["median_ms"])
                r[f"speedup_vs_{name}"] = base["median_ms"] / r["median_ms"]


# The release's own paths: speedups in the table and plots are over these, per kind of row.
BASELINE_BY_KIND = {SCORING: "reference", CYCLE: "cycle_torch"}
BASELINES = tuple(BASELINE_BY_KIND.values())


def baseline_speedup(row: dict) -> float | None:
    """Speedup over the release's path of the row's kind (``None`` if that did not run)."""
    return row.get(f"speedup_vs_{BASELINE_BY_KIND[row['kind']]}")
