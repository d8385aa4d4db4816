"""What a result was measured on: device, driver, library versions, git commit, date."""

from __future__ import annotations

import datetime
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
# Run from a source checkout (``python -m bench`` in the repository, or an editable install),
# bench/ sits next to pyproject.toml: results go to the repository's bench/results/ and the git
# commit is recorded. An installed copy (site-packages) has no repository: results go under the
# current directory and the commit is unknown.
REPO_ROOT: Path | None = (BENCH_DIR.parent if (BENCH_DIR.parent / "pyproject.toml").is_file()
                          else None)


def results_dir() -> Path:
    """Where a run's ``<card>-<date>/`` directory goes unless ``--out`` says otherwise."""
    if REPO_ROOT is None:
        return Path.cwd() / "bench-results"
    return REPO_ROOT / "bench" / "results"


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git(args: list[str]) -> str | None:
    return _run(["git", *args], cwd=REPO_ROOT) if REPO_ROOT is not None else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver_version() -> str | None:
    # One driver serves every GPU of a machine, so the first line is the answer whatever
    # CUDA_VISIBLE_DEVICES maps the device index to.
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()


def card_slug(device: torch.device) -> str:
    """Directory-safe card name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def collect(device: torch.device) -> dict:
    """Everything needed to reproduce or compare a run, JSON-ready."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - triton is a dependency on Linux
        triton_version = None
    meta = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "git_commit": _git(["rev-parse", "HEAD"]),
        "git_dirty": bool(_git(["status", "--porcelain", "--untracked-files=no"])),
        "argv": sys.argv,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update({
            "capability": list(torch.cuda.get_device_capability(device)),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "sm_count": props.multi_processor_count,
            "cuda_runtime": torch.version.cuda,
            "driver": _driver_version(),
        })
    return meta
