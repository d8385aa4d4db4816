"""CPU comparison: the default CPU path against the release's algorithm, one process, same inputs.

``python -m bench.cpu`` (or ``python -m flashmemory_triton.bench.cpu``): for every N and B, the
release module's algorithm (:func:`release_module_scores`: per layer, the query projections,
the WHOLE key tensor dequantized to fp32, the fp32 ``[B, N, H]`` products, relu, weight, sum,
sigmoid, then the ensemble; the reference's functions strung together as the release runs them)
and ``FlashMemoryRetriever(backend="auto").ensemble`` (the CPU path, :mod:`flashmemory_triton.
cpu_path`), fed the same hidden states and keys, timed in interleaved repeats (release, ours,
release, ours, ...: a shared machine's load hits both alike), medians reported. Also, per row:

* peak memory of each call (resident-set high-water mark above the resident set before the
  call, Linux ``/proc``), and the ratio;
* the relative error of our logits against the release's, ``max |ours - release| /
  max |release|`` (the bar: 1e-6; the derived per-chunk bound is in ``tests/test_cpu_path.py``);
* the floor, measured in the same run: one fp32 GEMM ``[B*N, 128] x [128, L*H]`` (the scorer's
  FLOPs, timed on at most 65536 rows and scaled) plus one read of the projection weights (a
  sum over every weight), and our time over it.

Timings on a shared machine are noisy: compare ratios from one run, not times across runs. On a
loaded machine the release's algorithm (many large ops on torch's thread pool) depends on the
OpenMP wait policy: ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at barriers instead of spinning)
takes out most of the noise from other processes. The CPU path's scorer runs on serial workers
(no barriers) and depends on it much less.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from flashmemory_triton import FlashMemoryRetriever, synthetic
from flashmemory_triton import constants as C
from flashmemory_triton import reference as ref

from .release import release_temp_bytes

DEFAULT_N = (4096, 65536, 262144)
DEFAULT_BATCH = (1, 8)
REL_ERR_BAR = 1e-6
FLOOR_ROWS = 65536  # the floor GEMM is timed on at most this many rows, then scaled


# --- the release's module, as it computes ------------------------------------------------------
def release_module_logits(model: FlashMemoryRetriever, hidden: torch.Tensor,
                          compressed_k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Per-layer logits ``[L, B, N]`` as the release's module computes them: per layer, the
    query side, then the whole key tensor dequantized again and scored in fp32."""
    out = []
    for name in model.layer_names:
        q, w = ref.query_side(hidden, model.layer_weights(name), positions, model.max_position,
                              model.head_dim, mixed_freqs=model.rope_freqs)
        k = ref.dequant_compressed_k(compressed_k, model.head_dim)
        out.append(ref.score_logits(q, w, k, model.logit_offset))
    return torch.stack(out)


def release_module_scores(model, hidden, compressed_k, positions, mode: str = "max"):
    """The release's ``ensemble``: sigmoid of every layer's logits, then max or mean."""
    logits = release_module_logits(model, hidden, compressed_k, positions)
    return ref.ensemble_scores(torch.sigmoid(logits), mode)


# --- measurement -----------------------------------------------------------------------------
def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_bytes(fn: Callable[[], object]) -> int | None:
    """Bytes ``fn`` adds to the resident set at its peak (Linux; ``None`` elsewhere).

    Free heap memory is returned to the system first (``malloc_trim``), the high-water mark is
    reset (``/proc/self/clear_refs``), then ``VmHWM - VmRSS(before)``: what the call touched
    beyond what was resident. Its own result is counted (it is alive at the end)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _proc_status_kb("VmRSS")
    result = fn()
    peak = _proc_status_kb("VmHWM")
    del result
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int
                        ) -> dict[str, list[float]]:
    """Every function once for warm-up, then ``repeats`` rounds of one call each, in turn."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn))
    return times


def floor_calls(model: FlashMemoryRetriever, n_rows: int
                ) -> tuple[dict[str, Callable[[], object]], float]:
    """The floor's two parts as calls to time: one fp32 ``[rows, D] x [D, L*H]`` GEMM with
    ``rows = min(n_rows, FLOOR_ROWS)`` (its time is scaled by the returned ``n_rows / rows``)
    and one pass over every projection weight (a sum: a pure read)."""
    L, H, D = model.n_layers, model.n_heads, model.head_dim
    rows = max(1, min(n_rows, FLOOR_ROWS))
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(rows, D, generator=gen)
    b = torch.randn(D, L * H, generator=gen)
    weights = [model.w_in, model.wq_b, model.q_norm_weight]
    return ({"floor_gemm": lambda: a @ b,
             "floor_read": lambda: [x.sum() for x in weights]}, max(n_rows, 1) / rows)


def _max_rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    fin = torch.isfinite(theirs)
    if not bool(fin.any()):
        return 0.0
    diff = (ours.double() - theirs.double()).abs()[fin]
    return float(diff.max() / theirs.double().abs()[fin].max().clamp_min(1e-300))


@dataclasses.dataclass
class Row:
    n: int
    batch: int
    release_ms: float | None
    ours_ms: float
    speedup: float | None
    release_peak_mib: float | None
    ours_peak_mib: float | None
    memory_ratio: float | None
    floor_ms: float
    floor_gemm_ms: float
    floor_read_ms: float
    ours_over_floor: float
    logit_rel_err: float | None
    score_max_abs_err: float | None
    status: str


def run_row(model: FlashMemoryRetriever, n: int, batch: int, repeats: int,
            memory_budget: int, seed: int = 0) -> Row:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + n * 31 + batch)
    keys = synthetic.mock_compressed_k(batch, n, generator=gen)
    hidden = synthetic.mock_hidden(batch, model.hidden_size, generator=gen)
    positions = torch.full((batch,), n * C.TOKENS_PER_CHUNK - 1, dtype=torch.int64)

    def ours():
        return model.ensemble(hidden, keys, positions)
    need = release_temp_bytes(batch, n, model.n_heads, model.head_dim) + \
        2 * model.n_layers * batch * n * 4
    run_release = need <= memory_budget
    fns = {"ours": ours}
    if run_release:
        fns["release"] = lambda: release_module_scores(model, hidden, keys, positions)
    floor, gemm_scale = floor_calls(model, batch * n)
    # Everything in one interleaved loop: the floor is measured under the same load.
    times = interleaved_medians({**fns, **floor}, repeats)
    ours_s = statistics.median(times["ours"])
    release_s = statistics.median(times["release"]) if run_release else None
    gemm_s = statistics.median(times["floor_gemm"]) * gemm_scale
    read_s = statistics.median(times["floor_read"])
    peaks = {name: peak_rss_bytes(fn) for name, fn in fns.items()}
    rel_err = score_err = None
    status = "ok"
    if run_release:
        theirs = release_module_logits(model, hidden, keys, positions)
        mine = model.logits(hidden, keys, positions)
        rel_err = _max_rel_err(mine, theirs)
        score_err = float((ours().double() - ref.ensemble_scores(torch.sigmoid(theirs))
                           .double()).abs().max()) if theirs.numel() else 0.0
        if rel_err > REL_ERR_BAR:
            status = f"FAILED: logit relative error {rel_err:.2e} > {REL_ERR_BAR:.0e}"
    else:
        status = (f"release skipped: needs ~{need / 2**30:.1f} GiB, budget "
                  f"{memory_budget / 2**30:.1f} GiB")

    def mib(x):
        return None if x is None else x / 2**20
    rp, op = peaks.get("release"), peaks["ours"]
    return Row(n=n, batch=batch, release_ms=None if release_s is None else release_s * 1e3,
               ours_ms=ours_s * 1e3,
               speedup=None if release_s is None else release_s / ours_s,
               release_peak_mib=mib(rp), ours_peak_mib=mib(op),
               memory_ratio=(rp / op) if rp and op else None,
               floor_ms=(gemm_s + read_s) * 1e3, floor_gemm_ms=gemm_s * 1e3,
               floor_read_ms=read_s * 1e3, ours_over_floor=ours_s / (gemm_s + read_s),
               logit_rel_err=rel_err, score_max_abs_err=score_err, status=status)


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def format_table(rows: list[Row]) -> str:
    head = (f"{'N':>7} {'B':>2} {'release ms':>11} {'ours ms':>9} {'speedup':>8} "
            f"{'rel MiB':>8} {'ours MiB':>8} {'mem x':>6} {'floor ms':>9} {'/floor':>6} "
            f"{'rel err':>8}  status")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.n:>7} {r.batch:>2} {_fmt(r.release_ms, '11.1f')} {r.ours_ms:9.1f} "
                     f"{_fmt(r.speedup, '8.2f')} {_fmt(r.release_peak_mib, '8.0f')} "
                     f"{_fmt(r.ours_peak_mib, '8.0f')} {_fmt(r.memory_ratio, '6.1f')} "
                     f"{r.floor_ms:9.1f} {r.ours_over_floor:6.2f} "
                     f"{_fmt(r.logit_rel_err, '8.1e')}  {r.status}")
    return "\n".join(lines)


def environment() -> dict:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_count": os.cpu_count(), "load_average": load,
            # Spinning (the default) or sleeping threads at barriers: on a loaded machine this
            # changes every many-op path's time several-fold (the release's; the CPU path's
            # blocks run on serial workers without barriers, see cpu_workers).
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)")}


def build_model(hidden: int, rank: int, heads: int, dtype: torch.dtype) -> FlashMemoryRetriever:
    states = synthetic.make_layer_states(hidden=hidden, rank=rank, n_heads=heads)
    model = FlashMemoryRetriever(states, max_position=C.MAX_POSITION_SERVING, dtype=dtype)
    if model.resolved_backend() != "cpu":  # e.g. TRITON_INTERPRET=1 in the environment
        model = FlashMemoryRetriever(states, max_position=C.MAX_POSITION_SERVING, dtype=dtype,
                                     backend="cpu")
    return model


def _available_bytes() -> int:
    kb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                kb = int(line.split()[1])
    except OSError:
        pass
    return (kb or 8 << 20) * 1024


def run(n_values, batches, repeats: int, *, hidden=C.HIDDEN_SIZE, rank=C.Q_LORA_RANK,
        heads=C.DEFAULT_N_HEADS, dtype=torch.float32, memory_budget: int | None = None,
        progress: Callable[[str], None] | None = None) -> tuple[list[Row], dict]:
    model = build_model(hidden, rank, heads, dtype)
    rows = []
    for n in n_values:
        for b in batches:
            budget = memory_budget if memory_budget is not None else _available_bytes() // 2
            rows.append(run_row(model, n, b, repeats, budget))
            if progress:
                progress(format_table(rows[-1:]).splitlines()[-1])
    env = environment()
    env.update(weights_dtype=str(dtype), hidden=hidden, rank=rank, heads=heads,
               resolved_backend=model.resolved_backend())
    return rows, env


def _ints(text: str) -> tuple[int, ...]:
    from .cli import parse_size
    return tuple(parse_size(v) for v in text.split(",") if v.strip())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {__package__}.cpu",  # as run: repo or installed
                                description=__doc__.split("\n")[0])
    p.add_argument("--n", type=_ints, default=DEFAULT_N, help="chunks, e.g. 4K,64K,256K")
    p.add_argument("--batch", type=_ints, default=DEFAULT_BATCH, help="batch sizes, e.g. 1,8")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median), default 3")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="storage dtype of the weights")
    p.add_argument("--hidden", type=int, default=C.HIDDEN_SIZE, help="smoke tests only")
    p.add_argument("--rank", type=int, default=C.Q_LORA_RANK, help="smoke tests only")
    p.add_argument("--heads", type=int, default=C.DEFAULT_N_HEADS, help="smoke tests only")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.repeats < 1:
        print(f"{p.prog}: error: --repeats must be >= 1", file=sys.stderr)
        return 2
    env = environment()
    print(f"torch {env['torch']}, {env['threads']} threads, CPU capability "
          f"{env['cpu_capability']}, OMP_WAIT_POLICY {env['omp_wait_policy']}, load average "
          f"{env['load_average']}", flush=True)
    rows, env = run(args.n, args.batch, args.repeats, hidden=args.hidden, rank=args.rank,
                    heads=args.heads, dtype=getattr(torch, args.dtype),
                    progress=lambda line: print(line, flush=True))
    print(format_table(rows))
    print("speedup = release ms / ours ms and mem x = release MiB / ours MiB, from this run; "
          "floor = fp32 GEMM [B*N,128]x[128,L*H] + one read of the weights, measured now. "
          "A shared machine makes single timings noisy: read the ratios.")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"environment": env,
                                        "rows": [dataclasses.asdict(r) for r in rows]},
                                       indent=2))
        print(f"wrote {args.out}")
    return 1 if any(r.status.startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
