"""Version-keyed launch parameters (``kernels.configs``), without compiling anything: fast,
no GPU, no ptxas.

The compiled side (every supported Triton builds these parameters spill-free) is
``tests/test_compile.py``; here: the table is what the launchers and ``kernels.aot`` read, and
the declared version range matches the tested ends.
"""

from __future__ import annotations

import pathlib
import re

import pytest

from flashmemory_triton.kernels import configs
from flashmemory_triton.kernels.paged import batched_launch_config
from flashmemory_triton.kernels.score import launch_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text,want", [("3.6.0", (3, 6)), ("3.9.0", (3, 9)),
                                       ("3.10.1+git8a1b", (3, 10)), ("3.7.0rc1", (3, 7))])
def test_parse_version(text, want):
    assert configs.parse_version(text) == want


def test_parse_version_rejects_garbage():
    with pytest.raises(ValueError, match="triton version"):
        configs.parse_version("main")


def test_installed_triton_is_in_the_declared_range():
    """pyproject's range is exactly [oldest tested, next minor after the newest tested)."""
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'"triton>=(\d+)\.(\d+),<(\d+)\.(\d+)', text)
    assert m, "pyproject.toml declares no triton range"
    lo, hi = (int(m.group(1)), int(m.group(2))), (int(m.group(3)), int(m.group(4)))
    assert lo == configs.OLDEST and hi == (configs.NEWEST[0], configs.NEWEST[1] + 1)
    assert configs.OLDEST <= configs.installed() <= configs.NEWEST


def test_launch_parameters_follow_the_version_table():
    old, new = configs.OLDEST, configs.NEWEST
    sm90, sm80 = (9, 0), (8, 0)
    # shared keys: the same everywhere
    assert launch_config(1 << 20, 128, "bf16", sm90, True, old) == \
        launch_config(1 << 20, 128, "bf16", sm90, True, new)
    # per-layer keys: the table's entries
    assert launch_config(1 << 20, 128, "bf16", sm90, False, old)["BLOCK_N"] == 128
    assert launch_config(1 << 20, 128, "bf16", sm90, False, new)["BLOCK_N"] == 64
    assert launch_config(1 << 20, 128, "fp8", sm80, False, old)["num_warps"] == 8
    assert launch_config(1 << 20, 128, "fp8", sm80, True, new)["num_warps"] == 4
    # the launcher's default is the installed version's entry
    assert launch_config(1 << 20, 128, "bf16", sm90, False) == \
        launch_config(1 << 20, 128, "bf16", sm90, False, configs.installed())
    # the batched scorer: paged bf16 with a shared pool in 32-head blocks
    assert batched_launch_config(1 << 20, 128, "bf16", sm90, True, True)["BLOCK_H"] == 32
    assert batched_launch_config(1 << 20, 128, "bf16", sm90, True, False)["BLOCK_H"] == 64
