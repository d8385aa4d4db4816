"""Shared pytest options and fixtures.

``--device`` picks where tensors live (default: cpu). Kernel tests run on the CPU through the
Triton interpreter, which must be switched on before triton is imported, so this file sets
``TRITON_INTERPRET=1`` whenever the chosen device is not CUDA.
"""

from __future__ import annotations

import os
import sys

import pytest


def pytest_addoption(parser):
    parser.addoption("--device", default=os.environ.get("FLASHMEMORY_TEST_DEVICE", "cpu"),
                     help="device for tensors: cpu (kernels via TRITON_INTERPRET=1) or cuda")


def pytest_configure(config):
    # Kernel launchers fill outputs with NaN first, so unwritten elements fail comparisons.
    os.environ.setdefault("FLASHMEMORY_POISON", "1")
    device = config.getoption("--device")
    if not device.startswith("cuda"):
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise pytest.UsageError("triton was imported before TRITON_INTERPRET=1 could be set")
        os.environ["TRITON_INTERPRET"] = "1"
        _import_kernels()


def _import_kernels():
    """Import every kernel module now, while TRITON_INTERPRET=1: ``@triton.jit`` picks the
    interpreter when a module is imported, and some modules are imported lazily by the code
    that launches them. Without this, a test that unsets the variable (a CPU user's view, e.g.
    tests/test_cpu_path.py) and happens to be the first to import one would leave its kernels
    compiled-mode for every later interpreter test ("Cannot call @triton.jit'd outside of the
    scope of a kernel")."""
    import importlib
    import pkgutil

    import flashmemory_triton.kernels as kernels
    for mod in pkgutil.iter_modules(kernels.__path__):
        importlib.import_module(f"{kernels.__name__}.{mod.name}")


@pytest.fixture(scope="session")
def device(request):
    import torch
    dev = torch.device(request.config.getoption("--device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda but no CUDA device")
    return dev


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available() and config.getoption("--device").startswith("cuda"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run with --device cuda on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The entry points through which every Triton kernel is launched (query kernel, dense scorer and
# its v2 / split launches, batched paged/varlen scorer and its v2, DeepGEMM drop-in): one count
# per entry call, so a test can assert that a refused call launched nothing, or which backend ran.
LAUNCH_ENTRY_POINTS = (("query_prep", "prepare_query_launch"), ("score", "fused_score_launch"),
                       ("paged", "batched_score_launch"), ("mqa_logits", "mqa_logits_launch"))


@pytest.fixture
def launches(monkeypatch):
    """Every kernel entry point wrapped: ``launches["n"]`` counts calls (they still run)."""
    import importlib
    count = {"n": 0}

    def counting(fn):
        def wrapper(*args, **kwargs):
            count["n"] += 1
            return fn(*args, **kwargs)
        return wrapper

    for module, name in LAUNCH_ENTRY_POINTS:
        mod = importlib.import_module(f"flashmemory_triton.kernels.{module}")
        monkeypatch.setattr(mod, name, counting(getattr(mod, name)))
    return count
