"""flashmemory-triton: fused Triton kernels for the FlashMemory DeepSeek-V4 chunk retriever.

Importing this package never touches CUDA; kernels compile on first use.
"""

from . import constants, formats, paged
from .reference import (apply_rope, dequant_compressed_k, hadamard_transform,
                        precompute_freqs_cis)
from .retriever import FlashMemoryRetriever, topk_mask
from .selection import ResidentSet, ThresholdFallback, select_resident

__version__ = "0.1.0"

__all__ = [
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
