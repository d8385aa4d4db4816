"""``flashmemory-triton bench`` / ``python -m flashmemory_triton.bench``: run a sweep, print the
table, write CSV/JSON/PNG.

Exit status: 0 when every provider that ran passed its correctness check, 1 when one failed
or raised (so CI goes red), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
from pathlib import Path

import torch

from . import environment, mixed, providers, sweeps
from .inputs import ModelDims
from .runner import Options, run_sweep

DEFAULT_PROG = "python -m flashmemory_triton.bench"
CPU_WARNING = ("CPU-only run: Triton providers are skipped and the timings below are CPU "
               "timings of the torch providers. They say nothing about GPU performance (nor do "
               "TRITON_INTERPRET timings); this run only shows that the bench works.")

_SUFFIX = {"k": 1024, "m": 1024 * 1024}


def parse_size(text: str) -> int:
    """``4096``, ``4K``, ``1M`` -> chunks (K = 1024)."""
    t = text.strip().lower()
    mult = _SUFFIX.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in _SUFFIX else t
    if not digits.isdigit():
        raise ValueError(f"not a size: {text!r} (use e.g. 4096, 16K, 1M)")
    return int(digits) * mult


def parse_size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _list(convert):
    def parse(text: str):
        try:
            return tuple(convert(v) for v in text.split(",") if v.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def build_parser(prog: str = DEFAULT_PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Benchmark the FlashMemory scorers: correctness "
        "pre-check against the fp32 reference, timings, roofline, CSV/JSON/PNG.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the quick subset (default)")
    size.add_argument("--full", action="store_true", help="the full sweep")
    p.add_argument("--n", type=_list(parse_size), help="chunks, e.g. 4K,16K,256K,1M")
    p.add_argument("--batch", type=_list(int), help="batch sizes, e.g. 1,8,32")
    p.add_argument("--layout", type=_list(str), help="shared,per_layer")
    p.add_argument("--precision", type=_list(str), help="bf16,tf32,fp8,fp32")
    p.add_argument("--ensemble", type=_list(str), help="max,mean")
    p.add_argument("--providers", type=_list(str),
                   help=f"subset of {','.join(providers.PROVIDERS)} (default: all); with "
                        f"--mixed, of {','.join(mixed.PROVIDERS)}")
    p.add_argument("--mixed", action="store_true",
                   help="the mixed-length serving batch instead of the sweep: one launch "
                        "(paged pool, varlen rows) versus one per request (bench/mixed.py)")
    p.add_argument("--requests", type=int, default=None,
                   help="--mixed: requests in the batch (default 32 on CUDA, 4 on CPU)")
    p.add_argument("--min-n", type=parse_size_arg, default=None,
                   help="--mixed: shortest history in chunks (default 8K on CUDA, 64 on CPU)")
    p.add_argument("--max-n", type=parse_size_arg, default=None,
                   help="--mixed: longest history in chunks (default 256K on CUDA, 1K on CPU)")
    p.add_argument("--device", choices=("cuda", "cpu"),
                   help="default: cuda if available, else cpu")
    p.add_argument("--out", type=Path,
                   help="output directory (default: <card>-<date>/ under the checkout's "
                        "bench/results/, or under ./bench-results/ when the package is "
                        "installed)")
    p.add_argument("--repeats", type=int, default=None,
                   help="at least this many timed calls per row (default 5 on CUDA, 3 on CPU)")
    p.add_argument("--rep-ms", type=float, default=100.0,
                   help="CUDA: milliseconds of timed calls per row (default 100)")
    p.add_argument("--autotune", action=argparse.BooleanOptionalAction, default=None,
                   help="autotune the Triton kernel before timing (default: on with --full)")
    p.add_argument("--compile-shapes", type=int, default=None,
                   help="shapes torch.compile is timed on, nearest the headline first "
                        "(default 2 on CUDA, 0 on CPU where one compile takes about a minute)")
    p.add_argument("--memory-budget-gb", type=float, default=None,
                   help="skip providers whose estimated temporaries exceed this "
                        "(default: 90%% of free GPU memory, 80%% of available RAM)")
    p.add_argument("--hidden", type=int, default=ModelDims.hidden,
                   help="model hidden size (smoke tests only; default the release's)")
    p.add_argument("--rank", type=int, default=ModelDims.rank, help="q LoRA rank (smoke tests)")
    p.add_argument("--heads", type=int, default=ModelDims.heads, help="heads (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="after S seconds, rows not yet started are skipped (status says so) and "
                        "the results are written; the shapes nearest the headline run first. "
                        "For runs under an outer time limit (default: no limit)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def choose_sweep(args, on_gpu: bool) -> sweeps.Sweep:
    base = sweeps.preset(args.full, on_gpu)
    overrides = {k: getattr(args, k) for k in ("n", "batch", "layout", "precision", "ensemble")
                 if getattr(args, k)}
    return dataclasses.replace(base, **overrides).validate()


def default_out_dir(device: torch.device) -> Path:
    """``<results>/<card>-<date>/``, suffixed ``-2``, ``-3`` ... rather than overwrite."""
    stem = f"{environment.card_slug(device)}-{datetime.date.today().isoformat()}"
    root = environment.results_dir()
    out, k = root / stem, 2
    while out.exists():
        out, k = root / f"{stem}-{k}", k + 1
    return out


def options_from(args, device: torch.device) -> Options:
    on_gpu = device.type == "cuda"
    repeats = args.repeats if args.repeats is not None else (5 if on_gpu else 3)
    if repeats < 2:
        raise ValueError("--repeats must be at least 2 (a spread needs two samples), "
                         f"got {repeats}")
    compile_shapes = (args.compile_shapes if args.compile_shapes is not None
                      else (2 if on_gpu else 0))
    if compile_shapes < 0:
        raise ValueError(f"--compile-shapes must be >= 0, got {compile_shapes}")
    budget = None if args.memory_budget_gb is None else int(args.memory_budget_gb * 2**30)
    if args.time_budget is not None and not args.time_budget >= 0:
        raise ValueError(f"--time-budget must be >= 0 seconds, got {args.time_budget}")
    return Options(device=device,
                   dims=ModelDims(hidden=args.hidden, rank=args.rank, heads=args.heads),
                   rep_ms=args.rep_ms, min_samples=repeats,
                   autotune=args.full if args.autotune is None else args.autotune,
                   compile_shapes=compile_shapes, memory_budget_bytes=budget, seed=args.seed,
                   progress=not args.no_progress, time_budget_s=args.time_budget)


def choose_scenario(args, on_gpu: bool) -> mixed.Scenario:
    """The mixed-batch scenario: the preset for this device with the command line's changes."""
    for flag, value in (("--n", args.n), ("--batch", args.batch), ("--full", args.full)):
        if value:
            raise ValueError(f"{flag} does not apply to --mixed (use --requests, --min-n, --max-n)")
    if args.ensemble and len(args.ensemble) != 1:
        raise ValueError(f"--mixed takes one --ensemble, got {list(args.ensemble)}")
    base = mixed.GPU_SCENARIO if on_gpu else mixed.CPU_SCENARIO
    overrides = {"requests": args.requests, "min_n": args.min_n, "max_n": args.max_n,
                 "layouts": args.layout, "precisions": args.precision,
                 "ensemble": args.ensemble[0] if args.ensemble else None}
    return dataclasses.replace(base, **{k: v for k, v in overrides.items()
                                        if v is not None}).validate()


def _device_from(args) -> torch.device:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device")
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def prepare_mixed(args) -> tuple[torch.device, mixed.Scenario, tuple[str, ...], Options]:
    """Validate a --mixed run's arguments before any work starts."""
    device = _device_from(args)
    scenario = choose_scenario(args, device.type == "cuda")
    options = options_from(args, device)
    names = tuple(args.providers) if args.providers else mixed.PROVIDERS
    unknown = [n for n in names if n not in mixed.PROVIDERS]
    if unknown:
        raise ValueError(f"unknown --mixed provider(s) {unknown}; choose from "
                         f"{list(mixed.PROVIDERS)}")
    return device, scenario, names, options


def run_mixed(args, device, scenario, names, options) -> int:
    from .inputs import Model
    from .runner import _bench_settings, triton_usable
    if device.type != "cuda":
        print(CPU_WARNING, flush=True)
    triton_ok, triton_skip = triton_usable(device)
    with _bench_settings(options):
        result = mixed.run_mixed(
            scenario, Model(options.dims, device, seed=options.seed), providers=names,
            rep_ms=options.rep_ms, min_samples=options.min_samples, seed=options.seed,
            triton_ok=triton_ok, triton_skip=triton_skip, time_budget_s=options.time_budget_s,
            progress=(lambda m: None) if not options.progress else
            (lambda m: print(m, file=sys.stderr, flush=True)))
    from . import report
    written = mixed.write_all(result, args.out or default_out_dir(device),
                              plots=not args.no_plots)
    return _finish(device, result.rows, written,
                   report.format_ceilings(result) + "\n" + mixed.format_table(result))


def _finish(device, rows: list[dict], written, text: str) -> int:
    """Print the tables and what was written; exit status 1 if a row failed or raised."""
    print(text)
    if device.type != "cuda":
        print(CPU_WARNING)
    print("wrote " + ", ".join(str(p) for p in written))
    bad = [r for r in rows if r["status"].startswith(("failed", "error"))]
    if bad:
        print(f"{len(bad)} row(s) failed the correctness check or raised; see the status column",
              file=sys.stderr)
    return 1 if bad else 0


def prepare(args) -> tuple[torch.device, sweeps.Sweep, list[providers.Provider], Options]:
    """Validate the arguments (ValueError on anything wrong) before any work starts."""
    for flag, value in (("--requests", args.requests), ("--min-n", args.min_n),
                        ("--max-n", args.max_n)):
        if value is not None:
            raise ValueError(f"{flag} applies to --mixed only")
    device = _device_from(args)
    sweep = choose_sweep(args, device.type == "cuda")
    options = options_from(args, device)
    if args.providers:
        chosen = providers.resolve(list(args.providers))
    else:
        chosen = default_providers(device, options)
    return device, sweep, chosen, options


def default_providers(device: torch.device, options: Options) -> list[providers.Provider]:
    """Every provider that can run here; the ones left out are named once, not row by row.
    (Asked for by name with --providers, they appear as skipped rows.)"""
    chosen, left_out = [], []
    for p in providers.resolve(None):
        if p.needs_triton and device.type != "cuda":
            left_out.append(f"{p.name} (Triton is timed on CUDA only)")
        elif p.cpu_only and device.type != "cpu":
            left_out.append(f"{p.name} (the CPU path is timed on CPU runs only)")
        elif p.name == "torch_compile" and options.compile_shapes == 0:
            left_out.append(f"{p.name} (--compile-shapes 0)")
        else:
            chosen.append(p)
    if left_out:
        print("not run: " + ", ".join(left_out))
    return chosen


def run(args, device, sweep, chosen, options) -> int:
    from . import report
    if device.type != "cuda":
        print(CPU_WARNING, flush=True)
    result = run_sweep(sweep, chosen, options)
    out_dir = args.out or default_out_dir(device)
    written = report.write_all(result, out_dir)
    if not args.no_plots:
        from .plots import write_plots
        written += write_plots(result, out_dir)
    return _finish(device, result.rows, written,
                   report.format_ceilings(result) + "\n" + report.format_table(result))


def main(argv=None, prog: str = DEFAULT_PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        prepared = prepare_mixed(args) if args.mixed else prepare(args)
    except (ValueError, TypeError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return (run_mixed if args.mixed else run)(args, *prepared)
