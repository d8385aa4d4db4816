"""The mixed-length serving batch: one launch for the whole batch versus one per request.

A serving engine scores many requests at once, each with its own history. The scenario:
``requests`` histories whose lengths are drawn log-uniformly between ``min_n`` and ``max_n``
chunks (seeded on the CPU: the same batch on every card; GPU default 32 requests, 8K..256K),
keys in the paged split format (a pool with the pages shuffled, as an engine's allocator
leaves them) and as varlen rows. Providers, all on the same keys and queries:

``reference_loop``      the release's fp32 path once per request (what upstream does)
``triton_per_request``  ``ops.score_prepared`` once per request: one dense launch each
``triton_padded``       ``ops.score_prepared`` on the batch padded to the longest request: one
                        launch, the padding scored and thrown away
``triton_paged``        ``paged.score_paged``: one launch over the paged pool (the v2 kernel,
                        ``kernels/paged_v2.py``, where it serves: the shared pool in bf16/fp8 on
                        Hopper)
``triton_paged_v1``     the same launch on the kernel v2 replaced (``kernel="v1"``), shared pool
                        only (per-layer pools run v1 as ``triton_paged``): kept until a GPU run
                        has compared the two
``triton_varlen``       ``paged.score_varlen``: one launch over the varlen rows (v2 where it
                        serves, ``configs.VARLEN_V2_EPILOGUES``)

Counted work is the USEFUL work, the same for every provider: ``L * sum(n)`` chunk-layer dot
products of ``2 H D`` FLOP, every key buffer read once (``sum(n) * 132`` bytes, times ``L``
for per-layer keys), the queries and head weights read, ``sum(n)`` fp32 scores written. A
provider that pads does more than that, and its lower TFLOP/s says so.

Every provider's output is checked first against the reference run request by request (the
same tolerance rule as the sweep, :mod:`bench.check`), and the padded outputs' fill past
each request's length (score 0, logit -inf) is checked too; a failing provider is reported,
not timed. On a CPU the Triton providers are skipped (interpreter timings mean nothing).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from pathlib import Path

import torch

from flashmemory_triton import constants as C

from . import environment, timing
from .check import check_output
from .inputs import MAX_POSITION, Model, ModelDims, project
from .release import release_queries, release_scores, release_scores_blocked
from .roofline import Ceilings, Work, measure_ceilings
from .runner import failure_status, timed_fields
from .sweeps import LAYOUTS, K

ORACLE_BLOCK_BYTES = 1 << 30
PROVIDERS = ("reference_loop", "triton_per_request", "triton_padded", "triton_paged",
             "triton_paged_v1", "triton_varlen")
SHARED_ONLY = {"triton_paged_v1": "skipped: per-layer pools run v1 as triton_paged"}
BASELINE = "reference_loop"
ONE_LAUNCH_PER_REQUEST = "triton_per_request"  # the Triton baseline the single launch must beat


@dataclasses.dataclass(frozen=True)
class Scenario:
    requests: int = 32
    min_n: int = 8 * K
    max_n: int = 256 * K
    layouts: tuple[str, ...] = LAYOUTS
    precisions: tuple[str, ...] = ("bf16", "fp8")
    ensemble: str = "max"

    def validate(self) -> Scenario:
        from flashmemory_triton.kernels import PRECISIONS
        from flashmemory_triton.ops import ENSEMBLES
        if self.requests < 1:
            raise ValueError(f"--requests must be >= 1, got {self.requests}")
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"need 1 <= --min-n <= --max-n, got {self.min_n} and {self.max_n}")
        for name, values, allowed in (("layout", self.layouts, LAYOUTS),
                                      ("precision", self.precisions, PRECISIONS)):
            bad = [v for v in values if v not in allowed]
            if not values or bad:
                raise ValueError(f"--{name} values must be among {list(allowed)}, got "
                                 f"{list(values)}")
        if self.ensemble not in ENSEMBLES:
            raise ValueError(f"--ensemble must be one of {list(ENSEMBLES)}, got {self.ensemble!r}")
        return self

    def lengths(self, seed: int) -> list[int]:
        """Log-uniform in ``[min_n, max_n]``, drawn on a seeded CPU generator (any device, the
        same lengths)."""
        gen = torch.Generator().manual_seed(seed)
        u = torch.rand(self.requests, generator=gen, dtype=torch.float64)
        lo, hi = math.log(self.min_n), math.log(self.max_n)
        return [min(self.max_n, max(self.min_n, round(math.exp(lo + (hi - lo) * float(x)))))
                for x in u]


GPU_SCENARIO = Scenario()
# On a CPU only the reference runs: a small batch shows the scenario works, nothing more.
CPU_SCENARIO = Scenario(requests=4, min_n=64, max_n=1 * K, layouts=("shared",),
                        precisions=("bf16",))


@dataclasses.dataclass
class MixedInputs:
    lengths: list[int]
    per_layer: bool
    q_proj: torch.Tensor  # float32 [L, R, H, D]
    q: torch.Tensor  # float32 [L, R, H, D]: release queries (bf16 rounding, RoPE, Hadamard)
    w: torch.Tensor  # float32 [L, R, H]
    positions: torch.Tensor  # int64 [R]: each request's decode position, n * 4 - 1
    rows: list[torch.Tensor]  # per request uint8 [n, 132] (shared) or [L, n, 132]
    pool: object  # paged.PagedBatch, pages shuffled
    varlen: object  # paged.VarlenBatch

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def longest(self) -> int:
        return max(self.lengths)

    def request_keys(self, b: int) -> torch.Tensor:
        """Request ``b``'s keys as a one-row dense batch, ``[1, n, 132]`` / ``[L, 1, n, 132]``."""
        return self.rows[b].unsqueeze(-3)

    def padded(self) -> torch.Tensor:
        """Every request zero-padded to the longest: ``[R, M, 132]`` / ``[L, R, M, 132]``."""
        lead = (self.q.shape[0],) if self.per_layer else ()
        out = torch.zeros(*lead, len(self.rows), self.longest, C.CHUNK_BYTES, dtype=torch.uint8,
                          device=self.q.device)
        for b, r in enumerate(self.rows):
            out[..., b, :r.shape[-2], :] = r
        return out


def make_mixed_inputs(model: Model, scenario: Scenario, per_layer: bool, seed: int) -> MixedInputs:
    from flashmemory_triton import paged, synthetic
    device, L = model.device, model.dims.n_layers
    lengths = scenario.lengths(seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1_000_003 + 2 * scenario.requests + per_layer)
    rows = []
    for n in lengths:
        k = synthetic.mock_compressed_k(L if per_layer else 1, n, generator=gen, device=device)
        rows.append(k if per_layer else k[0])
    R = len(lengths)
    hidden = synthetic.mock_hidden(L * R if per_layer else R, hidden=model.dims.hidden,
                                   generator=gen, device=device)
    if per_layer:
        hidden = hidden.view(L, R, model.dims.hidden)
    q_proj, w = project(model, hidden)
    positions = torch.tensor([n * C.TOKENS_PER_CHUNK - 1 for n in lengths], dtype=torch.int64,
                             device=device)
    # An engine's pool after some churn: every request's pages at shuffled places.
    need = [-(-n // C.PAGE_CHUNKS) for n in lengths]
    perm = torch.randperm(sum(need), generator=torch.Generator().manual_seed(seed)).tolist()
    starts = [sum(need[:b]) for b in range(R)]
    page_ids = [perm[s:s + k] for s, k in zip(starts, need)]
    return MixedInputs(lengths=lengths, per_layer=per_layer, q_proj=q_proj,
                       q=release_queries(q_proj, positions, MAX_POSITION), w=w,
                       positions=positions, rows=rows,
                       pool=paged.pack_pool(rows, page_ids=page_ids, device=device),
                       varlen=paged.pack_varlen(rows, device=device))


def mixed_work(x: MixedInputs, dims: ModelDims) -> Work:
    """The useful work of the batch (see the module doc)."""
    L, H, total = dims.n_layers, dims.heads, x.total
    flops = L * total * C.flops_per_chunk_per_layer(H)
    key_bytes = (L if x.per_layer else 1) * total * C.CHUNK_BYTES
    return Work(flops, key_bytes + L * len(x.lengths) * H * (C.HEAD_DIM + 1) * 4 + total * 4)


# --- providers -----------------------------------------------------------------------------
@dataclasses.dataclass
class MixedRunner:
    run: Callable[[], object]  # the timed call
    scores_of: Callable[[object], torch.Tensor]  # its output -> the real chunks' scores [1, sum n]
    check: Callable[[], tuple[torch.Tensor, torch.Tensor, str]]  # scores, logits, fill error
    launches: int  # scoring kernel launches per call (the reference: none)


def _cat(per_request: list[tuple[torch.Tensor, torch.Tensor]]):
    """Per-request ``([1, n], [L, 1, n])`` -> the batch as one row: ``[1, sum n]``,
    ``[L, 1, sum n]``."""
    return (torch.cat([s for s, _ in per_request], dim=-1),
            torch.cat([g for _, g in per_request], dim=-1))


def _real(padded: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Padded ``[..., R, M]`` (scores, or per-layer logits) -> each request's real chunks as
    one row, ``[..., 1, sum n]``."""
    return torch.cat([padded[..., b:b + 1, :n] for b, n in enumerate(lengths)], dim=-1)


def _from_padded(scores: torch.Tensor, logits: torch.Tensor, lengths: list[int]):
    """Padded ``[R, M]`` / ``[L, R, M]`` -> each request's real chunks as one row, and whether
    the padding holds the documented fill (score 0, logit -inf)."""
    cat = (_real(scores, lengths), _real(logits, lengths))
    M = scores.shape[-1]
    pad = torch.arange(M, device=scores.device)[None, :] >= torch.tensor(
        lengths, device=scores.device)[:, None]
    bad = bool((scores[pad] != 0).any()) or bool((logits[:, pad] != float("-inf")).any())
    return (*cat, "the fill past a request's length is not score 0 / logit -inf" if bad else "")


def _per_request_prepared(x: MixedInputs, precision: str):
    from flashmemory_triton import ops
    prepared = ops.prepare_queries(x.q_proj, x.w, x.positions, max_position=MAX_POSITION,
                                   precision=precision, backend="triton")
    # Sliced and made contiguous BEFORE timing: the per-request loop times only the launches.
    return prepared, [prepared._replace(q=prepared.q[:, b:b + 1].contiguous(),
                                        w=prepared.w[:, b:b + 1].contiguous())
                      for b in range(len(x.lengths))]


def build(name: str, x: MixedInputs, precision: str, ensemble: str) -> MixedRunner:
    from flashmemory_triton import ops, paged
    R = len(x.lengths)
    if name == "reference_loop":
        def each():
            return [release_scores(x.q[:, b:b + 1], x.w[:, b:b + 1], x.request_keys(b), ensemble)
                    for b in range(R)]
        return MixedRunner(run=each, scores_of=lambda out: _cat(out)[0],
                           check=lambda: (*_cat(each()), ""), launches=0)
    prepared, singles = _per_request_prepared(x, precision)
    if name == "triton_per_request":
        keys = [x.request_keys(b) for b in range(R)]

        def each(logits: bool):
            return [ops.score_prepared(p, k, ensemble=ensemble, return_logits=logits)
                    for p, k in zip(singles, keys)]
        return MixedRunner(run=lambda: each(False),
                           scores_of=lambda out: torch.cat([s for s, _ in out], dim=-1),
                           check=lambda: (*_cat(each(True)), ""), launches=R)
    if name == "triton_padded":
        dense = x.padded()

        def dense_call(logits: bool):
            return ops.score_prepared(prepared, dense, ensemble=ensemble, return_logits=logits)

        def dense_check():
            s, g = dense_call(True)
            return _real(s, x.lengths), _real(g, x.lengths), ""
        return MixedRunner(run=lambda: dense_call(False),
                           scores_of=lambda out: _real(out[0], x.lengths), check=dense_check,
                           launches=1)
    if name not in ("triton_paged", "triton_paged_v1", "triton_varlen"):
        raise ValueError(f"unknown mixed provider {name!r}; choose from {list(PROVIDERS)}")
    v1_keys = paged.page_pools(x.pool.pool) if name == "triton_paged_v1" else None

    def call(logits: bool):
        if name == "triton_paged_v1":
            return _paged_v1(prepared, v1_keys, x, ensemble, logits)
        if name == "triton_paged":
            return paged.score_paged(prepared, x.pool.pool, x.pool.page_table, x.pool.n_chunks,
                                     max_chunks=x.longest, ensemble=ensemble,
                                     return_logits=logits)
        return paged.score_varlen(prepared, x.varlen.keys, x.varlen.cu_chunks,
                                  max_chunks=x.longest, ensemble=ensemble, return_logits=logits)

    def check():
        out = call(True)
        return _from_padded(out.scores, out.logits, x.lengths)
    return MixedRunner(run=lambda: call(False),
                       scores_of=lambda out: _real(out.scores, x.lengths), check=check,
                       launches=-(-R // _max_rows()))


def _paged_v1(prepared, keys, x: MixedInputs, ensemble: str, logits: bool):
    """``paged.score_paged``'s launch (the inputs already checked) on the v1 kernel."""
    from flashmemory_triton.kernels.paged import batched_score_launch
    from flashmemory_triton.paged import BatchScores
    from flashmemory_triton.utils import _device
    scores, lg = batched_score_launch(
        prepared.q, prepared.w, keys, x.pool.n_chunks, x.pool.page_table, max_chunks=x.longest,
        precision=prepared.precision, hw_fp8=_device.has_hw_fp8(prepared.q.device),
        ensemble=ensemble, return_logits=logits, kernel="v1")
    return BatchScores(scores, lg, x.pool.n_chunks)


def _max_rows() -> int:
    from flashmemory_triton.kernels.paged import MAX_ROWS
    return MAX_ROWS


# --- the run -------------------------------------------------------------------------------
@dataclasses.dataclass
class MixedResult:
    rows: list[dict]
    ceilings: Ceilings
    meta: dict
    config: dict


def run_mixed(scenario: Scenario, model: Model, *, providers=PROVIDERS, rep_ms: float = 100.0,
              min_samples: int = 5, seed: int = 0, triton_ok: bool, triton_skip: str = "",
              ceilings: Ceilings | None = None, progress: Callable[[str], None] = print,
              time_budget_s: float | None = None) -> MixedResult:
    """Check and time every provider on every (layout, precision); rows for the report.
    ``time_budget_s``: rows not started after that many seconds are recorded as skipped (the
    results are still written), for runs under an outer time limit (``scripts/gpu_check.sh``)."""
    import time
    start = time.monotonic()
    scenario.validate()
    device = model.device
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        raise ValueError(f"unknown mixed provider(s) {unknown}; choose from {list(PROVIDERS)}")

    def time_ms(fn):
        return timing.time_call(fn, device, rep_ms=rep_ms, min_samples=min_samples).median_ms
    if ceilings is None:
        ceilings = measure_ceilings(device, time_ms)
    rows: list[dict] = []
    for layout in scenario.layouts:
        x = make_mixed_inputs(model, scenario, layout == "per_layer", seed)
        work = mixed_work(x, model.dims)
        oracle = _cat([release_scores_blocked(x.q[:, b:b + 1], x.w[:, b:b + 1], x.request_keys(b),
                                              scenario.ensemble, ORACLE_BLOCK_BYTES)
                       for b in range(len(x.lengths))])
        for name in providers:
            for precision in (("fp32",) if name == BASELINE else scenario.precisions):
                row = {"scenario": "mixed", "provider": name, "layout": layout,
                       "ensemble": scenario.ensemble, "precision": precision,
                       "requests": len(x.lengths), "total_chunks": x.total,
                       "max_chunks": x.longest, "layers": model.dims.n_layers,
                       "heads": model.dims.heads, "flops": work.flops, "bytes": work.bytes,
                       "intensity": work.intensity, "status": ""}
                if name != BASELINE and not triton_ok:
                    row["status"] = triton_skip
                elif name in SHARED_ONLY and layout != "shared":
                    row["status"] = SHARED_ONLY[name]
                elif time_budget_s is not None and time.monotonic() - start > time_budget_s:
                    row["status"] = f"skipped: time budget (--time-budget {time_budget_s:g} s)"
                else:
                    progress(f"mixed: {name} {precision} {layout}")
                    _measure(row, functools.partial(build, name, x, precision,
                                                    scenario.ensemble),
                             oracle, precision, device, rep_ms, min_samples, ceilings)
                rows.append(row)
        del x, oracle  # before the next layout's inputs exist: one batch in memory at a time
    _speedups(rows)
    config = {"scenario": dataclasses.asdict(scenario), "seed": seed, "rep_ms": rep_ms,
              "min_samples": min_samples, "lengths": scenario.lengths(seed),
              "dims": dataclasses.asdict(model.dims), "device": str(device)}
    return MixedResult(rows, ceilings, environment.collect(device), config)


def _measure(row, make_runner: Callable[[], MixedRunner], oracle, precision, device, rep_ms,
             min_samples, ceilings: Ceilings) -> None:
    try:
        runner = make_runner()  # inside the try: building may allocate (the padded batch)
        row["launches"] = runner.launches
        scores, logits, fill_error = runner.check()
        if fill_error:
            row["status"] = f"failed: {fill_error}"
            return
        # The timed call (no logits written: another kernel specialization) is checked too.
        result = check_output(runner.scores_of(runner.run()), scores, logits, oracle[0],
                              oracle[1], precision)
        row.update(logit_rel_rms=result.logit_rel_rms, score_max_err=result.score_max_err,
                   tolerance=result.tolerance)
        if not result.ok:
            row["status"] = f"failed: {result.reason}"
            return
        del scores, logits
        peak = timing.peak_memory_bytes(runner.run, device)
        t = timing.time_call(runner.run, device, rep_ms=rep_ms, min_samples=min_samples,
                             estimate_ms=timing.wall_ms(runner.run, device))
    except Exception as exc:  # a broken provider is reported, the run goes on
        row["status"] = failure_status(exc, device)
        return
    row.update(timed_fields(row, t, peak, ceilings, precision))


def _speedups(rows: list[dict]) -> None:
    """``speedup_vs_reference_loop`` and ``speedup_vs_triton_per_request`` (same layout; the
    per-request baseline at the row's precision)."""
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        for base_name in (BASELINE, ONE_LAUNCH_PER_REQUEST):
            base = [b for b in ok if b["provider"] == base_name and b["layout"] == r["layout"]
                    and (base_name == BASELINE or b["precision"] == r["precision"])]
            if base:
                r[f"speedup_vs_{base_name}"] = base[0]["median_ms"] / r["median_ms"]


# --- output --------------------------------------------------------------------------------
FIELDS = ["scenario", "provider", "layout", "ensemble", "precision", "requests", "total_chunks",
          "max_chunks", "layers", "heads", "launches", "status", "median_ms", "p20_ms",
          "p80_ms", "spread_pct", "samples", "tflops", "gbps", "roofline_tflops",
          "roofline_pct", "bound", "speedup_vs_reference_loop",
          "speedup_vs_triton_per_request", "flops", "bytes", "intensity", "peak_mem_mb",
          "logit_rel_rms", "score_max_err", "tolerance"]


def format_table(result: MixedResult) -> str:
    def cell(v, width, spec):
        return ("-" if v is None else format(v, spec)).rjust(width)
    cfg = result.config
    head = (f"{'provider':<20}{'prec':<6}{'layout':<11}{'launches':>9}{'median ms':>11}"
            f"{'±%':>6}{'TFLOP/s':>10}{'GB/s':>10}{'roof%':>7}{'x ref':>8}{'x per-req':>10}"
            f"  status")
    lines = [f"mixed batch: {len(cfg['lengths'])} requests, {sum(cfg['lengths'])} chunks in "
             f"all, {min(cfg['lengths'])}..{max(cfg['lengths'])} each (seed {cfg['seed']})",
             head, "-" * len(head)]
    for r in result.rows:
        lines.append(
            f"{r['provider']:<20}{r['precision']:<6}{r['layout']:<11}"
            f"{cell(r.get('launches'), 9, 'd')}{cell(r.get('median_ms'), 11, '.4f')}"
            f"{cell(r.get('spread_pct'), 6, '.1f')}{cell(r.get('tflops'), 10, '.3g')}"
            f"{cell(r.get('gbps'), 10, '.4g')}{cell(r.get('roofline_pct'), 7, '.1f')}"
            f"{cell(r.get('speedup_vs_reference_loop'), 8, '.2f')}"
            f"{cell(r.get('speedup_vs_triton_per_request'), 10, '.2f')}  {r['status']}")
    return "\n".join(lines)


def write_all(result: MixedResult, out_dir: Path, plots: bool = True) -> list[Path]:
    import csv
    import json

    from .report import _json_safe
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "mixed.csv", out_dir / "mixed.json"]
    with open(paths[0], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, restval="")
        writer.writeheader()
        for row in result.rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    doc = {"meta": result.meta, "config": result.config, "ceilings": result.ceilings.to_json(),
           "rows": result.rows}
    paths[1].write_text(json.dumps(_json_safe(doc), indent=1) + "\n")
    if plots:
        paths.append(_plot(result, out_dir / "mixed.png"))
    return paths


def _plot(result: MixedResult, path: Path) -> Path:
    """Median time per provider (log scale), one group per layout, bars labelled with the
    percentage of the roofline."""
    from .plots import _pyplot
    plt = _pyplot()
    ok = [r for r in result.rows if r["status"] == "ok"]
    labels = list(dict.fromkeys(f"{r['provider']}\n{r['precision']}" for r in ok)) or ["-"]
    layouts = list(dict.fromkeys(r["layout"] for r in ok)) or ["shared"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) * len(layouts)), 4.5))
    width = 0.8 / len(layouts)
    for j, layout in enumerate(layouts):
        xs, ys, notes = [], [], []
        for i, label in enumerate(labels):
            hit = [r for r in ok if r["layout"] == layout
                   and f"{r['provider']}\n{r['precision']}" == label]
            if hit:
                xs.append(i + (j - (len(layouts) - 1) / 2) * width)
                ys.append(hit[0]["median_ms"])
                pct = hit[0].get("roofline_pct")
                notes.append("" if pct is None else f"{pct:.0f}%")
        bars = ax.bar(xs, ys, width=width, label=f"{layout} keys")
        for bar, note in zip(bars, notes):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), note, ha="center",
                    va="bottom", fontsize=7)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("median time (ms), label: % of roofline")
    cfg = result.config
    ax.set_title(f"Mixed batch of {len(cfg['lengths'])} requests ({sum(cfg['lengths'])} chunks), "
                 f"{result.meta['device_name']}", fontsize=9)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
