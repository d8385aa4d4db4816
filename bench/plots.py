"""PNG plots of a run: time and speedup versus N, and the roofline with every kernel's point."""

from __future__ import annotations

from pathlib import Path

from .runner import BASELINES, Result, baseline_speedup

MARKERS = {"fp32": "o", "bf16": "s", "tf32": "^", "fp8": "D"}



def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def _series(rows: list[dict], value) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """``{(provider, precision): [(N, value), ...]}`` sorted by N, ``None`` values dropped."""
    out: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in rows:
        v = value(r)
        if v is not None:
            out.setdefault((r["provider"], r["precision"]), []).append((r["n"], v))
    return {k: sorted(v) for k, v in out.items()}


def _grid(plt, rows, value, ylabel, title, path: Path, log_y: bool) -> Path:
    ok = [r for r in rows if r["status"] == "ok"]
    ensemble = ok[0]["ensemble"] if ok else "max"  # one ensemble per figure: the sweep's first
    ok = [r for r in ok if r["ensemble"] == ensemble]
    layouts = list(dict.fromkeys(r["layout"] for r in ok)) or ["shared"]  # sweep order
    batches = sorted({r["batch"] for r in ok}) or [1]
    fig, axes = plt.subplots(len(layouts), len(batches), squeeze=False, sharex=True,
                             figsize=(4.5 * len(batches), 3.6 * len(layouts)))
    for i, layout in enumerate(layouts):
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            cell = [r for r in ok if r["layout"] == layout and r["batch"] == batch]
            for (provider, precision), pts in _series(cell, value).items():
                style = "--" if provider.startswith("cycle") else "-"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style,
                        marker=MARKERS.get(precision, "o"), label=f"{provider} {precision}")
            ax.set_xscale("log", base=2)
            if log_y:
                ax.set_yscale("log")
            else:
                ax.axhline(1.0, color="gray", lw=0.8)  # the baseline itself
            ax.set_title(f"B={batch}, {layout} keys, {ensemble}", fontsize=9)
            ax.set_xlabel("N (chunks)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if cell:
                ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _roofline(plt, result: Result, path: Path) -> Path:
    ok = [r for r in result.rows if r["status"] == "ok"]
    c = result.ceilings
    fig, ax = plt.subplots(figsize=(7.5, 5))
    intensities = [r["intensity"] for r in ok] or [1.0]
    lo, hi = min(intensities + [1.0]) / 4, max(intensities + [1e3]) * 4
    xs = [lo * (hi / lo) ** (k / 200) for k in range(201)]
    peak_max = max(c.matmul_tflops.values()) if c.matmul_tflops else 1.0
    if c.copy_gbps:
        ax.plot(xs, [min(x * c.copy_gbps / 1e3, peak_max) for x in xs], "k-", lw=1,
                label=f"copy {c.copy_gbps:.0f} GB/s")
    for precision, peak in c.matmul_tflops.items():
        ax.axhline(peak, ls=":", lw=1, color="gray")
        ax.text(lo * 1.1, peak * 1.05, f"{precision} matmul {peak:.3g} TFLOP/s", fontsize=7)
    providers = list(dict.fromkeys(r["provider"] for r in ok))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, provider in enumerate(providers):
        for precision in MARKERS:
            pts = [r for r in ok if r["provider"] == provider and r["precision"] == precision]
            if pts:
                ax.scatter([r["intensity"] for r in pts], [r["tflops"] for r in pts],
                           marker=MARKERS[precision], color=colors[k % len(colors)], s=22,
                           label=f"{provider} {precision}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (counted FLOP / counted byte)")
    ax.set_ylabel("TFLOP/s (counted FLOPs / median time)")
    ax.set_title(f"Roofline, {result.meta['device_name']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(result: Result, out_dir: Path) -> list[Path]:
    plt = _pyplot()
    rows = result.rows
    return [
        _grid(plt, rows, lambda r: r.get("median_ms"), "median time (ms)",
              "Time versus N (dashed: full retrieval cycle)", out_dir / "time_vs_n.png", True),
        _grid(plt, [r for r in rows if r["provider"] not in BASELINES], baseline_speedup,
              "speedup (x)", "Speedup over the reference (cycles: over cycle_torch)",
              out_dir / "speedup_vs_n.png", False),
        _roofline(plt, result, out_dir / "roofline.png"),
    ]
