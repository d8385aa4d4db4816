"""Results out: the terminal table, ``results.csv``, ``results.json`` and ``headline.md``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .runner import Result, baseline_speedup
from .sweeps import Shape, is_headline

# CSV column order; speedup_vs_<provider> columns follow, in provider order.
FIELDS = ["provider", "kind", "n", "batch", "layout", "ensemble", "precision", "layers", "heads",
          "status", "median_ms", "p20_ms", "p80_ms", "spread_pct", "samples", "tflops", "gbps",
          "roofline_tflops", "roofline_pct", "bound", "flops", "bytes", "intensity",
          "peak_mem_mb", "logit_rel_rms", "score_max_err", "tolerance"]


def speedup_fields(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r if k.startswith("speedup_vs_")))


def write_csv(result: Result, path: Path) -> None:
    fields = FIELDS + speedup_fields(result.rows)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        for row in result.rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(result: Result, path: Path) -> None:
    doc = {"meta": result.meta, "config": result.config, "ceilings": result.ceilings.to_json(),
           "rows": result.rows}
    path.write_text(json.dumps(_json_safe(doc), indent=1) + "\n")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cell(value, width: int, spec: str) -> str:
    return _fmt(value, spec).rjust(width)


def format_table(result: Result) -> str:
    """One line per row; failed and skipped rows say why instead of numbers."""
    head = (f"{'provider':<14}{'prec':<6}{'N':>9}{'B':>4} {'layout':<10}{'ens':<5}"
            f"{'median ms':>11}{'±%':>6}{'TFLOP/s':>10}{'GB/s':>10}{'roof%':>7}{'x ref':>8}"
            f"{'mem MiB':>9}  status")
    lines = [head, "-" * len(head)]
    for r in result.rows:
        speedup = baseline_speedup(r)
        lines.append(
            f"{r['provider']:<14}{r['precision']:<6}{r['n']:>9}{r['batch']:>4} {r['layout']:<10}"
            f"{r['ensemble']:<5}{_cell(r.get('median_ms'), 11, '.4f')}"
            f"{_cell(r.get('spread_pct'), 6, '.1f')}{_cell(r.get('tflops'), 10, '.3g')}"
            f"{_cell(r.get('gbps'), 10, '.4g')}{_cell(r.get('roofline_pct'), 7, '.1f')}"
            f"{_cell(speedup, 8, '.2f')}{_cell(r.get('peak_mem_mb'), 9, '.0f')}  {r['status']}")
    return "\n".join(lines)


def format_ceilings(result: Result) -> str:
    c = result.ceilings
    peaks = ", ".join(f"{k} {v:.3g}" for k, v in c.matmul_tflops.items())
    lines = [f"measured ceilings on {result.meta['device_name']}: matmul TFLOP/s {peaks}; "
             f"copy {c.copy_gbps:.4g} GB/s (read + write)"]
    lines += [f"  note: {n}" for n in c.notes]
    return "\n".join(lines)


def headline_markdown(result: Result) -> str:
    """Rows of the headline case (N = 256K, B = 1, shared keys) as a markdown table, ready for
    ``bench/results/README.md``; empty when the sweep did not include it."""
    meta = result.meta
    picked = [r for r in result.rows if r["status"] == "ok"
              and is_headline(Shape(r["n"], r["batch"], r["layout"], r["ensemble"]))]
    if not picked:
        return ""
    commit = ((meta.get("git_commit") or "unknown")[:10]
              + (" (dirty)" if meta.get("git_dirty") else ""))
    out = [f"### {meta['device_name']}, {meta['date_utc'][:10]}, commit {commit}",
           f"torch {meta['torch']}, triton {meta['triton']}, driver {meta.get('driver', '-')}",
           "",
           "| provider | precision | ensemble | median ms | TFLOP/s | % roofline | x reference |",
           "|---|---|---|---|---|---|---|"]
    for r in picked:
        speedup = baseline_speedup(r)
        out.append(f"| {r['provider']} | {r['precision']} | {r['ensemble']} | "
                   f"{r['median_ms']:.4f} | {r['tflops']:.1f} | "
                   f"{_fmt(r.get('roofline_pct'), '.0f')} | "
                   f"{_fmt(speedup, '.1f')} |")
    return "\n".join(out) + "\n"


def write_all(result: Result, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.csv", out_dir / "results.json"]
    write_csv(result, paths[0])
    write_json(result, paths[1])
    headline = headline_markdown(result)
    if headline:
        paths.append(out_dir / "headline.md")
        paths[-1].write_text(headline)
    return paths
