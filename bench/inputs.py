"""Synthetic weights and the per-shape inputs every provider of that shape reads.

The scoring providers take projected queries; the full-cycle providers take hidden states.
Both come from the same hidden states and weights (``q_proj`` is the reference projection of
``hidden``), so a scoring row and a cycle row of one shape score the same chunks.
"""

from __future__ import annotations

import dataclasses

import torch

from flashmemory_triton import FlashMemoryRetriever
from flashmemory_triton import constants as C
from flashmemory_triton import reference as ref

from .release import release_queries
from .sweeps import Shape

# The serving table size: the bench's longest histories (1M chunks = 4M tokens) clamp to it.
MAX_POSITION = C.MAX_POSITION_SERVING


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """Model size. Defaults are the released checkpoint's; smaller ones are for smoke tests
    (``head_dim`` is fixed by the 132-byte key format)."""
    hidden: int = C.HIDDEN_SIZE
    rank: int = C.Q_LORA_RANK
    heads: int = C.DEFAULT_N_HEADS
    layers: tuple[str, ...] = C.LAYER_NAMES

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def params_per_layer(self) -> int:
        """Weights read by one layer's projections: wq_a, wq_b, q_norm, weights_proj."""
        return (self.rank * self.hidden + self.heads * C.HEAD_DIM * self.rank + self.rank
                + self.heads * self.hidden)


class Model:
    """Synthetic weights (random, release-shaped) and the retrievers built from them."""

    def __init__(self, dims: ModelDims, device: torch.device, seed: int = 0):
        from flashmemory_triton import synthetic
        self.dims = dims
        self.device = device
        self._states = synthetic.make_layer_states(hidden=dims.hidden, rank=dims.rank,
                                                   n_heads=dims.heads, head_dim=C.HEAD_DIM,
                                                   layers=dims.layers, seed=seed,
                                                   dtype=torch.float32)
        self._retrievers: dict[tuple[str, str | None], FlashMemoryRetriever] = {}
        # The reference retriever holds the device copy of the weights the projections read.
        self.reference = self.retriever("torch", None)

    def retriever(self, backend: str, precision: str | None) -> FlashMemoryRetriever:
        """One retriever per (backend, precision), built on first use (each holds its weights)."""
        key = (backend, precision)
        if key not in self._retrievers:
            self._retrievers[key] = FlashMemoryRetriever(
                self._states, device=self.device, max_position=MAX_POSITION, backend=backend,
                precision=precision)
        return self._retrievers[key]


@dataclasses.dataclass
class ShapeInputs:
    """Everything one shape's providers read, on the bench device."""
    hidden: torch.Tensor  # float32 [B, hidden] (shared) or [L, B, hidden] (per layer)
    q_proj: torch.Tensor  # float32 [L, B, H, D]: reference projections of ``hidden``
    q: torch.Tensor  # float32 [L, B, H, D]: q_proj after bf16 rounding, RoPE and Hadamard
    w: torch.Tensor  # float32 [L, B, H], weight scale included
    positions: torch.Tensor  # int64 [B]: the decode token's position, N * 4 - 1
    compressed_k: torch.Tensor  # uint8 [B, N, 132] (shared) or [L, B, N, 132] (per layer)
    max_position: int = MAX_POSITION


def make_inputs(model: Model, shape: Shape, seed: int = 0) -> ShapeInputs:
    """Mock keys and hidden states for ``shape`` (deterministic in ``seed`` and the shape)."""
    from flashmemory_triton import synthetic
    dims, device = model.dims, model.device
    L, B, N = dims.n_layers, shape.batch, shape.n
    gen = torch.Generator(device=device)
    # Arithmetic, not hash(): string hashes change from one process to the next.
    gen.manual_seed(((seed * 1_000_003 + N) * 1_009 + B) * 2 + shape.per_layer)
    rows = L * B if shape.per_layer else B
    keys = torch.empty(rows, N, C.CHUNK_BYTES, dtype=torch.uint8, device=device)
    for r in range(rows):  # one row at a time: the fp32 draws are 4x the keys' size
        keys[r] = synthetic.mock_compressed_k(1, N, generator=gen, device=device)[0]
    hidden = synthetic.mock_hidden(rows, hidden=dims.hidden, generator=gen, device=device)
    if shape.per_layer:
        keys = keys.view(L, B, N, C.CHUNK_BYTES)
        hidden = hidden.view(L, B, dims.hidden)
    q_proj, w = project(model, hidden)
    positions = torch.full((B,), N * C.TOKENS_PER_CHUNK - 1, dtype=torch.int64, device=device)
    return ShapeInputs(hidden=hidden, q_proj=q_proj,
                       q=release_queries(q_proj, positions, MAX_POSITION), w=w,
                       positions=positions, compressed_k=keys)


def project(model: Model, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference projections of ``hidden`` (``[B, hidden]`` shared by every layer, or
    ``[L, B, hidden]``): ``q_proj [L, B, H, D]`` and head weights ``w [L, B, H]``, fp32."""
    per_layer = hidden.dim() == 3
    q_list, w_list = [], []
    for i, name in enumerate(model.dims.layers):
        weights = model.reference.layer_weights(name)
        q, w = ref.project_query(hidden[i] if per_layer else hidden, weights["wq_a.weight"],
                                 weights["q_norm_weight"], weights["wq_b.weight"],
                                 weights["weights_proj.weight"])
        q_list.append(q)
        w_list.append(w)
    return torch.stack(q_list), torch.stack(w_list)
