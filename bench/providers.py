"""The implementations being timed, all behind one interface and fed the same inputs.

A :class:`Provider` builds, for one shape and precision, a :class:`Runner`: ``run()`` is the
call that is timed and returns ensemble scores ``[B, N]``; ``check()`` returns
``(scores, per-layer logits)`` for the correctness pre-check (:mod:`bench.check`). Scoring
providers time keys -> scores on queries each prepared its own way before timing starts;
cycle providers start from hidden states and time the whole retrieval cycle a serving engine
runs every 64 decode steps (projections, query preparation, scoring, page selection).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from flashmemory_triton import constants as C
from flashmemory_triton.kernels import PRECISIONS
from flashmemory_triton.torch_fast import DEFAULT_BLOCK_BYTES, score_prepared_fast
from flashmemory_triton.torch_fast import PRECISIONS as FAST_PRECISIONS

from .inputs import Model, ModelDims, ShapeInputs
from .release import release_scores, release_temp_bytes
from .sweeps import Shape

SCORING, CYCLE = "scoring", "cycle"
FIXED_PRECISION = "fp32"  # the label of providers whose arithmetic does not vary


@dataclasses.dataclass
class Runner:
    run: Callable[[], torch.Tensor]
    check: Callable[[], tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass
class Context:
    """What builders share across a sweep: the weights and the run's options."""
    model: Model
    autotune: bool = False
    _compiled: Callable | None = None

    def compiled_release(self) -> Callable:
        """One ``torch.compile`` of the release path; it recompiles for every new shape (static
        shapes, so each is specialized), and the sweep limits how many shapes it gets."""
        if self._compiled is None:
            self._compiled = torch.compile(release_scores, dynamic=False)
        return self._compiled


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    kind: str  # SCORING or CYCLE
    precisions: tuple[str, ...] | None  # dot-product modes; None = fixed fp32 arithmetic
    needs_triton: bool
    build: Callable[[Context, ShapeInputs, Shape, str], Runner]
    temp_bytes: Callable[[Shape, ModelDims, str], int]  # estimated peak beyond the inputs
    description: str
    cpu_only: bool = False  # the CPU path: timed on CPU runs only

    def row_precisions(self, wanted: tuple[str, ...]) -> tuple[str, ...]:
        """The precisions this provider runs in a sweep over ``wanted``."""
        if self.precisions is None:
            return (FIXED_PRECISION,)
        return tuple(p for p in wanted if p in self.precisions)


# --- memory estimates (bytes of temporaries, the inputs excluded) -------------------------------
def _outputs(shape: Shape, dims: ModelDims) -> int:
    """Per-layer logits, their sigmoid and the scores, all fp32."""
    return (2 * dims.n_layers + 1) * shape.batch * shape.n * 4


def _release_bytes(shape, dims, precision) -> int:
    return release_temp_bytes(shape.batch, shape.n, dims.heads, C.HEAD_DIM) + _outputs(shape, dims)


def _torch_fast_bytes(shape, dims, precision) -> int:
    return DEFAULT_BLOCK_BYTES + _outputs(shape, dims)


def _cpu_bytes(shape, dims, precision) -> int:
    from flashmemory_triton.cpu_path import DEFAULT_BLOCK_CHUNKS, workspace_bytes
    from flashmemory_triton.cpu_workers import worker_count
    # per worker: the block workspace, and the block's scales and mask (5 bytes a chunk each)
    buffers = dims.n_layers if shape.per_layer else 1
    per_worker = (workspace_bytes(DEFAULT_BLOCK_CHUNKS, dims.n_layers * dims.heads)
                  + buffers * DEFAULT_BLOCK_CHUNKS * 5)
    return worker_count() * per_worker + _outputs(shape, dims)


def _triton_bytes(shape, dims, precision) -> int:
    return (dims.n_layers + 1) * shape.batch * shape.n * 4  # logits (check call) and scores


def _selection_bytes(shape) -> int:
    # select_resident's [B, N] temporaries: int64 index, a handful of bool masks, fp32 scores.
    return shape.batch * shape.n * 24


# --- builders -------------------------------------------------------------------------------
# Scoring runners time keys -> scores on queries prepared before the timed region (the query
# side is O(B * H * D) whatever N; the cycle rows time it with everything else).
def _release_runner(fn: Callable) -> Callable:
    def build(ctx: Context, x: ShapeInputs, shape: Shape, precision: str) -> Runner:
        f = fn(ctx)

        def call():
            return f(x.q, x.w, x.compressed_k, shape.ensemble)
        return Runner(run=lambda: call()[0], check=call)
    return build


def _build_torch_fast(ctx: Context, x: ShapeInputs, shape: Shape, precision: str) -> Runner:

    def call(logits: bool):
        return score_prepared_fast(x.q, x.w, x.compressed_k, precision=precision,
                                   ensemble=shape.ensemble, return_logits=logits)
    return Runner(run=lambda: call(False)[0], check=lambda: call(True))


def _build_cpu(ctx: Context, x: ShapeInputs, shape: Shape, precision: str) -> Runner:
    from flashmemory_triton.cpu_path import score_prepared_cpu

    def call(logits: bool):
        return score_prepared_cpu(x.q, x.w, x.compressed_k, ensemble=shape.ensemble,
                                  return_logits=logits)
    return Runner(run=lambda: call(False)[0], check=lambda: call(True))


def _build_triton(ctx: Context, x: ShapeInputs, shape: Shape, precision: str) -> Runner:
    from flashmemory_triton import ops
    prepared = ops.prepare_queries(x.q_proj, x.w, x.positions, max_position=x.max_position,
                                   precision=precision, backend="triton")

    def call(logits: bool, autotune: bool):
        return ops.score_prepared(prepared, x.compressed_k, ensemble=shape.ensemble,
                                  return_logits=logits, autotune=autotune)
    # The check call is never autotuned: writing logits is another tuning key, and tuning it
    # would only add start-up time; the check's score bound covers the tiles differing.
    return Runner(run=lambda: call(False, ctx.autotune)[0], check=lambda: call(True, False))


def _build_triton_v1(ctx: Context, x: ShapeInputs, shape: Shape, precision: str) -> Runner:
    """Today's kernel before the v2 redesign (``kernels.score``, one program per tile), on the
    same prepared queries: kept to compare with v2 on a GPU (issue 12), then to be removed."""
    from flashmemory_triton import ops
    from flashmemory_triton.kernels.score import fused_score_launch
    from flashmemory_triton.utils import _device
    prepared = ops.prepare_queries(x.q_proj, x.w, x.positions, max_position=x.max_position,
                                   precision=precision, backend="triton")

    def call(logits: bool):
        return fused_score_launch(prepared.q, prepared.w, x.compressed_k,
                                  precision=precision, hw_fp8=_device.has_hw_fp8(x.q.device),
                                  ensemble=shape.ensemble, return_logits=logits, kernel="v1")
    return Runner(run=lambda: call(False)[0], check=lambda: call(True))


def _build_triton_fused(ctx: Context, x: ShapeInputs, shape: Shape, precision: str) -> Runner:
    """The v2 dense scorer without its split launch (``kernels.dense_split``: short contexts
    as (tile, layer) programs), on the same prepared queries: compares the two where the
    launcher splits (issue 12 item 4); elsewhere the same call as ``triton``."""
    from flashmemory_triton import ops
    from flashmemory_triton.kernels.dense import dense_score_launch
    from flashmemory_triton.kernels.score import uses_v2
    from flashmemory_triton.utils import _device
    prepared = ops.prepare_queries(x.q_proj, x.w, x.positions, max_position=x.max_position,
                                   precision=precision, backend="triton")

    def call(logits: bool):
        if uses_v2(x.compressed_k, precision, False, shape.ensemble, logits):
            return dense_score_launch(prepared.q, prepared.w, x.compressed_k,
                                      precision=precision,
                                      hw_fp8=_device.has_hw_fp8(x.q.device),
                                      ensemble=shape.ensemble, return_logits=logits,
                                      split="fused")
        return ops.score_prepared(prepared, x.compressed_k, ensemble=shape.ensemble,
                                  return_logits=logits)
    return Runner(run=lambda: call(False)[0], check=lambda: call(True))


def _cycle_builder(backend: str) -> Callable:
    def build(ctx: Context, x: ShapeInputs, shape: Shape, precision: str) -> Runner:
        from flashmemory_triton.selection import select_resident
        retriever = ctx.model.retriever(backend, None if backend in ("torch", "cpu") else precision)
        max_pages = C.default_max_pages(shape.n * C.TOKENS_PER_CHUNK)

        def run():
            scores = retriever.ensemble(x.hidden, x.compressed_k, x.positions, shape.ensemble)
            select_resident(scores, mode="page", max_pages=max_pages)
            return scores

        def check():
            return (retriever.ensemble(x.hidden, x.compressed_k, x.positions, shape.ensemble),
                    retriever.logits(x.hidden, x.compressed_k, x.positions))
        return Runner(run=run, check=check)
    return build


PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("reference", SCORING, None, False, _release_runner(lambda ctx: release_scores),
             _release_bytes, "pure-torch fp32 reference, as the upstream release computes it"),
    Provider("torch_compile", SCORING, None, False,
             _release_runner(lambda ctx: ctx.compiled_release()), _release_bytes,
             "torch.compile of the reference (static shapes, default mode)"),
    Provider("torch_fast", SCORING, FAST_PRECISIONS, False, _build_torch_fast, _torch_fast_bytes,
             "flashmemory_triton.torch_fast: blocked matmuls, scale factored out"),
    Provider("cpu", SCORING, None, False, _build_cpu, _cpu_bytes,
             "flashmemory_triton.cpu_path: the CPU backend, exact fp32, blocked", cpu_only=True),
    Provider("triton", SCORING, PRECISIONS, True, _build_triton, _triton_bytes,
             "fused Triton scorer (ops.score_prepared) on prepared queries"),
    # v2 serves bf16/fp8 only (tf32/fp32 stay on v1 in the "triton" row): only those compared
    Provider("triton_v1", SCORING, ("bf16", "fp8"), True, _build_triton_v1, _triton_bytes,
             "the fused scorer before v2 (one program per tile), same prepared queries"),
    Provider("triton_fused", SCORING, ("bf16", "fp8"), True, _build_triton_fused,
             _triton_bytes, "the v2 scorer without its split launch for short contexts"),
    Provider("cycle_torch", CYCLE, None, False, _cycle_builder("torch"),
             lambda s, d, p: _release_bytes(s, d, p) + _selection_bytes(s),
             "full cycle, torch backend: projections + reference scoring + page selection"),
    Provider("cycle_cpu", CYCLE, None, False, _cycle_builder("cpu"),
             lambda s, d, p: _cpu_bytes(s, d, p) + _selection_bytes(s),
             "full cycle, CPU backend: projections + CPU-path scoring + page selection",
             cpu_only=True),
    Provider("cycle_triton", CYCLE, PRECISIONS, True, _cycle_builder("triton"),
             lambda s, d, p: _triton_bytes(s, d, p) + _selection_bytes(s),
             "full cycle, triton backend: batched projections + fused scoring + page selection"),
)}


def resolve(names: list[str] | None) -> list[Provider]:
    """Providers by name, in registry order; ``None`` means all of them."""
    if names is None:
        return list(PROVIDERS.values())
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; choose from {list(PROVIDERS)}")
    return [p for name, p in PROVIDERS.items() if name in names]
