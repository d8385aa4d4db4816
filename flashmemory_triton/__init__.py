"""flashmemory-triton: fused Triton kernels for the FlashMemory DeepSeek-V4 chunk retriever.

Importing this package never touches CUDA, and imports torch only when a name that needs it is
first used (PEP 562 ``__getattr__``), so ``flashmemory-triton --help`` answers at once. Kernels
compile on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> submodule that defines it; imported on first access
_EXPORTS = {
    "FlashMemoryRetriever": "retriever",
    "topk_mask": "retriever",
    "ResidentSet": "selection",
    "ThresholdFallback": "selection",
    "select_resident": "selection",
    "apply_rope": "reference",
    "dequant_compressed_k": "reference",
    "hadamard_transform": "reference",
    "precompute_freqs_cis": "reference",
}
_SUBMODULES = ("constants", "formats", "paged")

__all__ = [  # exactly the keys of _EXPORTS and _SUBMODULES (tests check it)
    "FlashMemoryRetriever",
    "ResidentSet",
    "ThresholdFallback",
    "apply_rope",
    "constants",
    "dequant_compressed_k",
    "formats",
    "hadamard_transform",
    "paged",
    "precompute_freqs_cis",
    "select_resident",
    "topk_mask",
]

if TYPE_CHECKING:  # static tools see the eager imports
    from . import constants, formats, paged
    from .reference import (
        apply_rope,
        dequant_compressed_k,
        hadamard_transform,
        precompute_freqs_cis,
    )
    from .retriever import FlashMemoryRetriever, topk_mask
    from .selection import ResidentSet, ThresholdFallback, select_resident


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
