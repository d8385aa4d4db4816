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
