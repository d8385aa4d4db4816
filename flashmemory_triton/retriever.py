"""``FlashMemoryRetriever``: the release's API (design §9) on a torch or Triton backend."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

from . import _validate as V
from . import constants as C
from . import reference as ref
from .utils import _device

BACKENDS = ("auto", "torch", "triton", "cpu")
ENSEMBLE_MODES = ("max", "mean")
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class UnknownLayerError(KeyError, ValueError):
    """A layer name the retriever does not have: a ``KeyError`` (a lookup by name, as the
    release) that is also the ``ValueError`` every other refused argument raises."""

    def __str__(self) -> str:  # KeyError would show the message quoted, as a key's repr
        return str(self.args[0]) if self.args else ""


def split_joint_state(state: Mapping[str, torch.Tensor]) -> OrderedDict[str, dict]:
    """``retrievers.<layer>.<param>`` keys -> ``{layer: {param: tensor}}`` in key order."""
    layers: OrderedDict[str, dict] = OrderedDict()
    for key, value in state.items():
        if not key.startswith(C.JOINT_PREFIX):
            continue
        layer, _, param = key[len(C.JOINT_PREFIX):].partition(".")
        if param == "freqs_cis":  # recomputed, never loaded (design §8)
            continue
        layers.setdefault(layer, {})[param] = value
    return layers


class FlashMemoryRetriever(nn.Module):
    """The three-layer FlashMemory chunk retriever.

    Drop-in for the upstream release (same constructor, methods, outputs), plus:

    * ``backend``: ``"torch"`` (the fp32 reference, the oracle), ``"triton"`` (fused kernels),
      ``"cpu"`` (exact fp32 on a CPU device, blocked and multi-threaded, within fp32 summation
      order of the reference: :mod:`flashmemory_triton.cpu_path`), or ``"auto"`` (triton on
      CUDA or under ``TRITON_INTERPRET=1``, cpu on a CPU device, torch otherwise);
    * ``dtype``: storage dtype of the weights (float32 as released, or bfloat16);
    * ``logit_offset``: added to every logit before the sigmoid;
    * ``precision``: the Triton scoring mode (see :mod:`flashmemory_triton.kernels`);
    * per-layer inputs: hidden ``[L, B, hidden]`` and keys ``[L, B, N, 132]`` (serving, where
      each scorer layer reads its own transformer layer's input and key buffer), besides the
      release's shared hidden ``[B, hidden]`` and keys ``[B, N, 132]``.
    """

    def __init__(self, layer_states: Mapping, device="cpu",
                 max_position: int = C.MAX_POSITION_RELEASE, head_dim: int | None = None, *,
                 backend: str = "auto", dtype: torch.dtype = torch.float32,
                 logit_offset: float = 0.0, precision: str | None = None):
        super().__init__()
        V.choice("backend", backend, BACKENDS)
        if dtype not in WEIGHT_DTYPES:
            raise TypeError("dtype must be torch.float32, torch.bfloat16 or torch.float16, got "
                            f"{dtype}")
        V.positive_int("max_position", max_position)
        states = self._normalize_states(layer_states)
        self.head_dim = int(head_dim) if head_dim is not None else C.HEAD_DIM
        hidden, rank, n_heads = self._check_shapes(states, self.head_dim)
        self.layer_names = list(states.keys())
        self.n_heads = n_heads
        self.hidden_size = hidden
        self.q_lora_rank = rank
        self.max_position = max_position
        self.backend = backend
        self.logit_offset = V.real_number("logit_offset", logit_offset)
        self.precision = precision
        if precision is not None:
            from .kernels import PRECISIONS
            V.choice("precision", precision, PRECISIONS)

        def stack(param):
            return torch.stack([states[n][param].detach().to(dtype) for n in self.layer_names])

        # Stored stacked per layer so the Triton path projects every layer in one batched GEMM;
        # w_in holds wq_a's rows then weights_proj's rows (both read the same x).
        w_in = torch.cat([stack("wq_a.weight"), stack("weights_proj.weight")], dim=1)
        self.register_buffer("w_in", w_in.to(device))
        self.register_buffer("wq_b", stack("wq_b.weight").to(device))
        self.register_buffer("q_norm_weight", stack("q_norm_weight").to(device))
        self.register_buffer("rope_freqs", ref.rope_mixed_freqs().to(device), persistent=False)

    def _apply(self, fn, recurse=True):
        """``.to(dtype)``, ``.half()``, ``.bfloat16()``, ``.float()`` cast the weights only: the
        RoPE frequencies stay float32 (rebuilt exactly on the new device), so a cast module
        equals one constructed with that ``dtype``. A cast to a dtype the constructor refuses
        (``.double()``) raises ``TypeError`` and leaves the module unchanged."""
        probe = fn(self.w_in[:0])  # what the cast does to a weight, on an empty view
        if isinstance(probe, torch.Tensor) and probe.dtype not in WEIGHT_DTYPES:
            raise TypeError(f"FlashMemoryRetriever weights must be torch.float32, "
                            f"torch.bfloat16 or torch.float16; refusing a cast to {probe.dtype}")
        out = super()._apply(fn, recurse)
        if self.rope_freqs.dtype != torch.float32:
            self.rope_freqs = ref.rope_mixed_freqs().to(self.rope_freqs.device)
        return out

    # --- construction helpers -------------------------------------------------------------
    @staticmethod
    def _normalize_states(layer_states: Mapping) -> OrderedDict[str, dict]:
        if not isinstance(layer_states, Mapping) or not layer_states:
            raise TypeError("layer_states must be a non-empty mapping {layer: {param: tensor}} "
                            f"or a joint state dict, got {type(layer_states).__name__}")
        if all(isinstance(v, torch.Tensor) for v in layer_states.values()):
            states = split_joint_state(layer_states)
            if not states:
                raise ValueError("layer_states is a flat state dict without "
                                 f"'{C.JOINT_PREFIX}<layer>.' keys")
            return states
        states = OrderedDict()
        for name, params in layer_states.items():
            if not isinstance(params, Mapping):
                raise TypeError(f"layer_states[{name!r}] must be a mapping of tensors, "
                                f"got {type(params).__name__}")
            states[name] = {k: v for k, v in params.items() if k != "freqs_cis"}
        return states

    @staticmethod
    def _check_shapes(states, head_dim: int) -> tuple[int, int, int]:
        first = None
        for name, p in states.items():
            for key in C.PARAM_NAMES:
                if key not in p:
                    raise ValueError(f"layer {name!r} is missing {key!r} (has {sorted(p)})")
                if not isinstance(p[key], torch.Tensor) or not p[key].is_floating_point():
                    raise TypeError(f"layer {name!r} {key} must be a floating-point tensor, "
                                    f"got {getattr(p[key], 'dtype', type(p[key]).__name__)}")
            rank, hidden = p["wq_a.weight"].shape
            if p["wq_b.weight"].dim() != 2 or p["wq_b.weight"].shape[1] != rank:
                raise ValueError(f"layer {name!r} wq_b.weight must be [H*{head_dim}, {rank}], "
                                 f"got {tuple(p['wq_b.weight'].shape)}")
            if p["wq_b.weight"].shape[0] % head_dim:
                raise ValueError(f"layer {name!r} wq_b.weight rows {p['wq_b.weight'].shape[0]} "
                                 f"are not a multiple of head_dim {head_dim}")
            n_heads = p["wq_b.weight"].shape[0] // head_dim
            if tuple(p["q_norm_weight"].shape) != (rank,):
                raise ValueError(f"layer {name!r} q_norm_weight must be [{rank}], "
                                 f"got {tuple(p['q_norm_weight'].shape)}")
            if tuple(p["weights_proj.weight"].shape) != (n_heads, hidden):
                raise ValueError(f"layer {name!r} weights_proj.weight must be "
                                 f"[{n_heads}, {hidden}] (H = wq_b rows / head_dim), got "
                                 f"{tuple(p['weights_proj.weight'].shape)}")
            dims = (hidden, rank, n_heads)
            if first is None:
                first = dims
            elif dims != first:
                raise ValueError(f"layer {name!r} has (hidden, rank, heads) {dims}, "
                                 f"other layers {first}")
        return first

    @classmethod
    def from_checkpoint(cls, path, device="cpu", max_position: int = C.MAX_POSITION_RELEASE,
                        layers=None, **kwargs) -> FlashMemoryRetriever:
        """Load a joint (``retrievers.<layer>.*``) or per-layer checkpoint (.safetensors/.pt)."""
        from .checkpoint import load_layer_states
        # The loader derives H from wq_b rows / head_dim, so it needs the caller's head_dim.
        states = load_layer_states(path, layers=layers,
                                   head_dim=kwargs.get("head_dim") or C.HEAD_DIM)
        return cls(states, device=device, max_position=max_position, **kwargs)

    @classmethod
    def from_pretrained(cls, repo_id: str = "libertywing/FlashMemory-Deepseek-V4",
                        filename: str | None = None, revision: str | None = None,
                        cache_dir=None, local_files_only: bool = False, device="cpu",
                        max_position: int = C.MAX_POSITION_RELEASE, layers=None,
                        **kwargs) -> FlashMemoryRetriever:
        """Fetch the checkpoint through ``huggingface_hub`` (or a local directory) and load it."""
        from .checkpoint import resolve_pretrained
        path = resolve_pretrained(repo_id, filename=filename, revision=revision,
                                  cache_dir=cache_dir, local_files_only=local_files_only)
        return cls.from_checkpoint(path, device=device, max_position=max_position,
                                   layers=layers, **kwargs)

    # --- properties -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.w_in.device

    @property
    def dtype(self) -> torch.dtype:
        return self.w_in.dtype

    @property
    def n_layers(self) -> int:
        return len(self.layer_names)

    def layer_weights(self, name: str) -> dict[str, torch.Tensor]:
        """One layer's four tensors under their checkpoint names (views, no copies)."""
        i = self._layer_index(name)
        r = self.q_lora_rank
        return {"wq_a.weight": self.w_in[i, :r], "weights_proj.weight": self.w_in[i, r:],
                "wq_b.weight": self.wq_b[i], "q_norm_weight": self.q_norm_weight[i]}

    def _layer_index(self, name: str) -> int:
        try:
            return self.layer_names.index(name)
        except ValueError:
            raise UnknownLayerError(f"unknown layer {name!r}; this retriever has "
                                    f"{self.layer_names}") from None

    def resolved_backend(self) -> str:
        """The backend calls will use on this retriever's device."""
        if self.backend == "torch":
            return "torch"
        if self.backend == "cpu":
            if self.device.type != "cpu":
                raise ValueError(f"backend='cpu' needs the retriever on a CPU device, it is on "
                                 f"{self.device}; use backend='auto' or 'triton'")
            return "cpu"
        if self.backend == "triton":
            if not _device.triton_runs_on(self.device):
                raise ValueError(
                    f"backend='triton' needs a CUDA device or TRITON_INTERPRET=1 with triton "
                    f"installed; the retriever is on {self.device} "
                    f"(triton installed: {_device.triton_available()})")
            if self.head_dim != C.HEAD_DIM:
                raise ValueError(f"backend='triton' supports head_dim {C.HEAD_DIM} only (the "
                                 f"kernels' tile width), this retriever has head_dim "
                                 f"{self.head_dim}; use backend='torch' or 'auto'")
            return "triton"
        if self.head_dim == C.HEAD_DIM and _device.triton_runs_on(self.device):
            return "triton"
        return "cpu" if self.device.type == "cpu" else "torch"

    def extra_repr(self) -> str:
        return (f"layers={self.layer_names}, n_heads={self.n_heads}, head_dim={self.head_dim}, "
                f"hidden={self.hidden_size}, rank={self.q_lora_rank}, "
                f"max_position={self.max_position}, backend={self.backend!r}, dtype={self.dtype}")

    # --- input handling -------------------------------------------------------------------
    def _check_inputs(self, hidden, compressed_k, positions):
        """Validate and return ``(per_layer_hidden, per_layer_keys, B, N)``."""
        L = self.n_layers
        V.tensor("hidden", hidden, floating=True, ndims=(2, 3))
        V.compressed_keys("compressed_k", compressed_k, self.head_dim)
        per_layer_hidden = hidden.dim() == 3
        per_layer_keys = compressed_k.dim() == 4
        self._check_hidden_dims(hidden)
        if per_layer_keys and compressed_k.shape[0] != L:
            raise ValueError(f"per-layer compressed_k must be [L={L}, B, N, 132] "
                             f"(layers {self.layer_names}), got {V.describe(compressed_k)}")
        B = hidden.shape[-2]
        if compressed_k.shape[-3] != B:
            raise ValueError(f"compressed_k batch {compressed_k.shape[-3]} does not match hidden "
                             f"batch {B} (hidden {V.describe(hidden)}, compressed_k "
                             f"{V.describe(compressed_k)})")
        V.tensor("positions", positions, integer=True, ndim=1)
        # Device before values: V.positions reads the values (a sync, impossible on meta).
        V.same_device(self.device, hidden=hidden, compressed_k=compressed_k, positions=positions)
        V.positions("positions", positions, B)
        return per_layer_hidden, per_layer_keys, B, compressed_k.shape[-2]

    # --- scoring --------------------------------------------------------------------------
    def logits(self, hidden, compressed_k, positions) -> torch.Tensor:
        """Per-layer logits ``[L, B, N]`` float32 (before the sigmoid, offset included)."""
        per_h, per_k, _, _ = self._check_inputs(hidden, compressed_k, positions)
        backend = self.resolved_backend()
        if backend == "triton":
            return self._triton_score(hidden, compressed_k, positions, "max", True)[1]
        if backend == "cpu":
            return self._cpu_score(hidden, compressed_k, positions, per_h, "max", True)[1]
        return torch.stack([self._torch_layer(i, hidden, compressed_k, positions, per_h, per_k)
                            for i in range(self.n_layers)])

    def _torch_layer(self, i, hidden, compressed_k, positions, per_h, per_k):
        name = self.layer_names[i]
        # A strided hidden (e.g. column-major) could take another GEMM path and round
        # differently; a contiguous copy keeps the answer independent of the layout (as the
        # Triton path's ops.project_queries does).
        return ref.layer_logits(V.dense(hidden[i] if per_h else hidden),
                                compressed_k[i] if per_k else compressed_k, positions,
                                self.layer_weights(name), self.max_position, self.head_dim,
                                self.logit_offset, mixed_freqs=self.rope_freqs)

    def _reference_queries(self, hidden, positions, per_h, layers):
        """The reference's query side of ``layers`` (the same calls as :meth:`_torch_layer`, so
        the same bits; bf16/fp16 weights upcast in blocks, not as a whole):
        ``q [len(layers), B, H, D]`` and ``w [len(layers), B, H]``. One layer per serial worker
        (:mod:`cpu_workers`): its ops are small (RMSNorm, RoPE, the Hadamard butterflies), and
        on torch's thread pool each would wait at a barrier (measured on a loaded 2-core
        machine, B = 8: 2.9 s there against 0.8 s on one thread)."""
        from . import cpu_path, cpu_workers
        layers = list(layers)
        qs, ws = [None] * len(layers), [None] * len(layers)

        def layer(j: int, state: dict) -> None:
            i = layers[j]
            qs[j], ws[j] = cpu_path.query_side(
                V.dense(hidden[i] if per_h else hidden), self.layer_weights(self.layer_names[i]),
                positions, self.max_position, self.head_dim, mixed_freqs=self.rope_freqs)

        cpu_workers.run_items(layer, len(layers))
        return torch.stack(qs), torch.stack(ws)

    def _cpu_score(self, hidden, compressed_k, positions, per_h, mode, want_logits, layer=None):
        """The CPU backend: the reference's queries, then :mod:`cpu_path`'s exact scorer
        (``layer``: that layer alone, its own key buffer if keys are per layer)."""
        from .cpu_path import score_prepared_cpu
        layers = range(self.n_layers) if layer is None else [layer]
        q, w = self._reference_queries(hidden, positions, per_h, layers)
        if layer is not None and compressed_k.dim() == 4:
            compressed_k = compressed_k[layer:layer + 1]
        return score_prepared_cpu(q, w, compressed_k, ensemble=mode,
                                  logit_offset=self.logit_offset, return_logits=want_logits)

    def _triton_score(self, hidden, compressed_k, positions, mode, want_logits):
        from .ops import score_hidden
        return score_hidden(self, hidden, compressed_k, positions, ensemble=mode,
                            return_logits=want_logits)

    def forward(self, hidden, compressed_k, positions, apply_sigmoid: bool = True):
        """``{layer: [B, N]}`` in layer order: sigmoid scores, or logits if not
        ``apply_sigmoid``."""
        logits = self.logits(hidden, compressed_k, positions)
        out = torch.sigmoid(logits) if apply_sigmoid else logits
        return OrderedDict((name, out[i]) for i, name in enumerate(self.layer_names))

    def score_layer(self, name, hidden, compressed_k, positions, apply_sigmoid: bool = True):
        """One layer's ``[B, N]`` scores (``hidden``/``compressed_k`` shared or per-layer)."""
        i = self._layer_index(name)
        per_h, per_k, _, _ = self._check_inputs(hidden, compressed_k, positions)
        backend = self.resolved_backend()
        if backend == "triton":
            from .ops import score_hidden
            logit = score_hidden(self, hidden, compressed_k, positions, return_logits=True,
                                 layer=i)[1][0]
        elif backend == "cpu":
            logit = self._cpu_score(hidden, compressed_k, positions, per_h, "max", True,
                                    layer=i)[1][0]
        else:
            logit = self._torch_layer(i, hidden, compressed_k, positions, per_h, per_k)
        return torch.sigmoid(logit) if apply_sigmoid else logit

    def ensemble(self, hidden, compressed_k, positions, mode: str = "max") -> torch.Tensor:
        """Per-chunk ensemble of the layers' sigmoid scores, ``[B, N]`` float32."""
        V.choice("mode", mode, ENSEMBLE_MODES)
        per_h, _, _, _ = self._check_inputs(hidden, compressed_k, positions)
        backend = self.resolved_backend()
        if backend == "triton":
            return self._triton_score(hidden, compressed_k, positions, mode, False)[0]
        if backend == "cpu":  # scores only: no [L, B, N] logits held
            return self._cpu_score(hidden, compressed_k, positions, per_h, mode, False)[0]
        scores = self.forward(hidden, compressed_k, positions)
        return ref.ensemble_scores(list(scores.values()), mode)

    def select_topk(self, hidden, compressed_k, positions, top_k: int | None = None,
                    threshold: float | None = None, mode: str = "max") -> torch.Tensor:
        """Boolean keep-mask ``[B, N]``: the ``top_k`` best chunks per row, or
        ``score > threshold``.

        Exactly one of ``top_k`` / ``threshold``. ``top_k`` larger than N keeps every chunk.
        Ties at the k-th score go to the lower chunk index. NaN scores are never selected.
        """
        if (top_k is None) == (threshold is None):
            raise ValueError("select_topk needs exactly one of top_k or threshold, got "
                             f"top_k={top_k!r}, threshold={threshold!r}")
        if threshold is not None:
            threshold = V.real_number("threshold", threshold, finite=False)
        elif isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be a non-negative int, got {top_k!r}")
        scores = self.ensemble(hidden, compressed_k, positions, mode=mode)
        if threshold is not None:
            return scores > threshold
        return topk_mask(scores, top_k)

    # --- serving batches: paged split-format pools and varlen rows (flashmemory_triton.paged) --
    def score_paged(self, hidden, pools, page_table, n_chunks, positions, *, mode: str = "max",
                    return_logits: bool = False, max_chunks: int | None = None):
        """Score a serving batch whose keys live in paged split-format pools, in one launch.

        ``hidden`` ``[B, hidden]`` (shared) or ``[L, B, hidden]`` (each layer's own input, as
        serving); ``pools`` ``[P, 8448]`` (one pool for every layer), ``[L, P, 8448]`` or a list
        of ``L`` per-layer pools, or the engines' ``[P, 64, 1, 132]`` cache (any page stride;
        see :mod:`flashmemory_triton.formats` for how each shape is read); ``page_table [B,
        max_pages]`` and ``n_chunks [B]`` (int32/int64), or ``n_chunks [B, next_n]`` (MTP:
        ``hidden`` and ``positions`` then have ``B * next_n`` rows, row ``b * next_n + t``
        seeing ``n_chunks[b, t]`` chunks of request ``b``); ``positions [B]`` token positions.
        Returns a
        :class:`~flashmemory_triton.paged.BatchScores`: ``scores [B, max_chunks]`` (0 past each
        request's length; ``max_chunks`` defaults to ``64 * max_pages``), per-layer ``logits``
        (``-inf`` past it) if ``return_logits``, and ``n_chunks``; pass it to
        :func:`~flashmemory_triton.select_resident` as is. See :mod:`flashmemory_triton.paged`.
        """
        from . import paged as P
        V.choice("mode", mode, ENSEMBLE_MODES)
        pools = P.engine_pages(pools)
        page_table, n_chunks = P.expand_next_n(page_table, n_chunks)  # MTP rows
        backend = self.resolved_backend()
        # Every argument is checked before anything launches (the query kernel included).
        self._check_hidden(hidden, positions)
        checked = P.check_paged(pools, page_table, n_chunks, max_chunks, self.n_layers,
                                hidden.shape[-2], self.device, queries="the hidden states")
        if backend == "triton":
            return P.score_hidden_paged(self, hidden, pools, page_table, n_chunks, positions,
                                        checked, ensemble=mode, return_logits=return_logits)
        _, _, M, n64 = checked
        rows = P.pool_to_rows(pools, page_table, n_chunks, M)
        return self._score_rows_batch(hidden, rows, positions, n64, mode, return_logits)

    def score_varlen(self, hidden, keys, cu_chunks, positions, *, mode: str = "max",
                     return_logits: bool = False, max_chunks: int | None = None):
        """Score a serving batch of variable-length row-format keys, in one launch.

        ``keys`` ``[total, 132]`` (every layer), ``[L, total, 132]`` or a list of ``L``
        per-layer buffers; request ``b`` owns rows ``cu_chunks[b] .. cu_chunks[b + 1] - 1``.
        ``max_chunks`` (output width) defaults to the longest request (a host read of
        ``cu_chunks``). Otherwise as :meth:`score_paged`.
        """
        from . import paged as P
        V.choice("mode", mode, ENSEMBLE_MODES)
        backend = self.resolved_backend()
        self._check_hidden(hidden, positions)
        checked = P.check_varlen(keys, cu_chunks, max_chunks, self.n_layers, hidden.shape[-2],
                                 self.device, queries="the hidden states")
        if backend == "triton":
            return P.score_hidden_varlen(self, hidden, keys, cu_chunks, positions, checked,
                                         ensemble=mode, return_logits=return_logits)
        _, _, M, n64 = checked
        rows = P.varlen_to_rows(keys, cu_chunks, M)
        return self._score_rows_batch(hidden, rows, positions, n64, mode, return_logits)

    def _check_hidden_dims(self, hidden):
        """``hidden``'s last dim is the weights' hidden size; per-layer hidden has L rows."""
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden last dim must be the weights' hidden size "
                             f"{self.hidden_size}, got {V.describe(hidden)}")
        if hidden.dim() == 3 and hidden.shape[0] != self.n_layers:
            raise ValueError(f"per-layer hidden must be [L={self.n_layers}, B, "
                             f"{self.hidden_size}] (layers {self.layer_names}), got "
                             f"{V.describe(hidden)}")

    def _check_hidden(self, hidden, positions):
        """The hidden/positions half of :meth:`_check_inputs` (keys are checked apart)."""
        V.tensor("hidden", hidden, floating=True, ndims=(2, 3))
        self._check_hidden_dims(hidden)
        V.tensor("positions", positions, integer=True, ndim=1)
        V.same_device(self.device, hidden=hidden, positions=positions)
        V.positions("positions", positions, hidden.shape[-2])

    def _score_rows_batch(self, hidden, rows, positions, n_chunks, mode, return_logits):
        """Torch and CPU backends of the batched paths: logits on padded rows, then the fill."""
        from .paged import BatchScores
        logits = self.logits(hidden, rows, positions)
        M = logits.shape[-1]
        real = torch.arange(M, device=logits.device)[None, :] < n_chunks[:, None]
        logits = torch.where(real[None], logits, torch.full_like(logits, float("-inf")))
        scores = ref.ensemble_scores(torch.sigmoid(logits), mode)
        return BatchScores(scores, logits if return_logits else None, n_chunks)


def topk_mask(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep-mask of the ``top_k`` highest scores per row; lower index wins ties; NaN never kept."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative int, got {top_k!r}")
    B, N = scores.shape
    k = min(top_k, N)
    mask = torch.zeros(B, N, dtype=torch.bool, device=scores.device)
    if k == 0:
        return mask
    clean = torch.nan_to_num(scores.float(), nan=float("-inf"))
    # Stable descending sort: equal scores keep index order, so the lower index wins a tie.
    order = torch.sort(clean, dim=1, descending=True, stable=True).indices[:, :k]
    mask.scatter_(1, order, True)
    return mask & ~torch.isnan(scores)
