"""``flashmemory-triton decode``: the release's toy sparse-decode loop, with KV really moved.

A small random single-head decoder attends over a memory of chunks (each chunk's K and V are a
584-byte record, the size of one chunk of a DeepSeek-V4 layer's attention KV) plus the raw
tokens decoded since the last fold. Every ``interval`` steps (a *cycle*):

1. the complete chunks of recent tokens (``TOKENS_PER_CHUNK`` each) are folded into the memory,
   with a compressed key for the retriever;
2. the retriever scores the whole history from the latest hidden state and position;
3. :func:`~flashmemory_triton.selection.select_resident` forms the resident set;
4. with ``--offload`` the :class:`~flashmemory_triton.offload.OffloadEngine` brings the set into
   its device reserve; the memory attention of the next ``interval`` steps then reads K/V only
   through the reserve and the lookup table. Without it the full cache sits on the device and
   the unselected chunks are masked out.

Both paths gather the resident chunks in ascending order and run the same arithmetic, so they
produce bit-identical tokens and logits (the tests check it).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from . import _validate as V
from . import constants as C
from . import synthetic
from .offload import ChunkHistory, OffloadEngine
from .retriever import BACKENDS, FlashMemoryRetriever
from .selection import SELECT_MODES, ThresholdFallback, select_resident

# A chunk's K and V as float32 fill exactly one 584-byte attention-KV record.
KV_DIM = C.ATTN_KV_BYTES // (2 * 4)
assert 2 * KV_DIM * 4 == C.ATTN_KV_BYTES


@dataclass
class DecodeConfig:
    steps: int = 256
    interval: int = C.RETRIEVAL_INTERVAL
    n_chunks: int = 65536  # prompt history: 262144 tokens, the context max_pages=96 is sized for
    batch: int = 1
    select: str = "page"
    threshold: float = C.DEFAULT_THRESHOLD
    recent: int = C.DEFAULT_RECENT_CHUNKS
    sink: int = C.DEFAULT_SINK_CHUNKS
    page_size: int = C.PAGE_CHUNKS
    max_pages: int = C.DEFAULT_MAX_PAGES
    top_k: int | None = None
    max_resident: int | None = None
    fallback_bound: float | None = None
    offload: bool = False
    reserve_pages: int | None = None
    seed: int = 0
    device: str = "cpu"
    backend: str = "torch"
    hidden: int = 128
    vocab: int = 256
    n_heads: int = 8
    rank: int = 64

    def validate(self) -> None:
        for name in ("steps", "n_chunks", "recent", "sink", "max_pages"):
            _check_int(name, getattr(self, name), 0)
        for name in ("interval", "batch", "page_size", "hidden", "vocab", "n_heads", "rank"):
            _check_int(name, getattr(self, name), 1)
        for name in ("top_k", "max_resident", "reserve_pages"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0)
        if self.select not in SELECT_MODES:
            raise ValueError(f"select must be one of {list(SELECT_MODES)}, got {self.select!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        V.real_number("threshold", self.threshold, finite=False)
        if self.fallback_bound is not None:
            bound = V.real_number("fallback_bound", self.fallback_bound)
            if not 0.0 <= bound < 1.0:
                raise ValueError(f"fallback_bound must be in [0, 1), got {bound!r}")
        V.device("device", self.device)
        if self.max_resident is not None and self.select != "chunk":
            raise ValueError("max_resident applies to --select chunk only")
        if self.top_k is not None and self.select != "topk":
            raise ValueError("top_k applies to --select topk only")

    def final_chunks(self) -> int:
        """History length after the last fold."""
        folded = ((self.steps - 1) // self.interval * self.interval) if self.steps else 0
        return self.n_chunks + folded // C.TOKENS_PER_CHUNK

    def default_reserve_pages(self) -> int:
        """Cells enough for any resident set this run can form (per row budget x batch)."""
        n_pages = -(-self.final_chunks() // self.page_size)
        if self.fallback_bound is not None:
            per_row = n_pages  # a row may switch to full attention
        elif self.select == "page":
            per_row = min(self.max_pages, n_pages)
        elif self.select == "topk":
            per_row = min(self.effective_top_k(), n_pages)
        elif self.max_resident is not None:
            forced = -(-self.recent // self.page_size) + -(-self.sink // self.page_size) + 1
            per_row = min(self.max_resident + forced, n_pages)
        else:
            per_row = n_pages  # uncapped chunk mode may select anything
        return self.batch * per_row

    def effective_top_k(self) -> int:
        """``top_k``, defaulting to the page budget in chunks (the same memory as page mode)."""
        return self.top_k if self.top_k is not None else self.max_pages * self.page_size


def _check_int(name, value, lo):
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")


@dataclass
class DecodeResult:
    tokens: torch.Tensor  # int64 [B, steps] (CPU)
    logits: torch.Tensor  # float32 [B, steps, vocab] (CPU)
    cycles: list = field(default_factory=list)  # one dict per cycle
    summary: dict = field(default_factory=dict)


def encode_row_keys(k: torch.Tensor) -> torch.Tensor:
    """float keys ``[..., D]`` -> row format uint8 ``[..., D + 4]`` (e4m3 bytes + f32 scale).

    Per-row scale ``amax / 448`` so the largest magnitude maps to e4m3's largest finite value;
    an all-zero row gets scale 1.
    """
    k = k.float()
    amax = k.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / C.FP8_E4M3_MAX, torch.ones_like(amax))
    fp8 = (k / scale).clamp(-C.FP8_E4M3_MAX, C.FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    scale_bytes = scale.contiguous().view(torch.uint8)
    if sys.byteorder != "little":  # the format's scale is little-endian whatever the host
        scale_bytes = scale_bytes.flip(-1)
    return torch.cat([fp8.view(torch.uint8), scale_bytes], dim=-1)


class ToyDecoder:
    """Random single-head decoder: embedding, one attention over memory + local tokens, head."""

    def __init__(self, hidden: int, vocab: int, generator: torch.Generator, device,
                 shared: torch.Tensor):
        def rand(*shape, scale):
            return (torch.randn(*shape, generator=generator) * scale).to(device)

        self.hidden, self.vocab = hidden, vocab
        self.emb = rand(vocab, hidden, scale=1.0)
        self.wq = rand(hidden, KV_DIM, scale=hidden ** -0.5)
        self.wk = rand(hidden, KV_DIM, scale=hidden ** -0.5)
        self.wv = rand(hidden, KV_DIM, scale=hidden ** -0.5)
        self.wo = rand(KV_DIM, hidden, scale=KV_DIM ** -0.5)
        self.w_out = rand(hidden, vocab, scale=hidden ** -0.5)
        self.w_key = rand(hidden, C.HEAD_DIM, scale=hidden ** -0.5)  # hidden -> retriever key
        # A fixed component every hidden state carries (real residual streams are anisotropic;
        # the synthetic retriever weights read it, see synthetic.py).
        self.shared = shared.to(device)

    def step(self, token, mem_kv, mem_valid, local_k, local_v):
        """One token. ``mem_kv`` float32 ``[B, S, 2*KV_DIM]`` K||V records (zeros where not
        ``mem_valid``); ``local_k``/``local_v`` ``[B, L, KV_DIM]`` the unfolded recent tokens.

        Returns ``(hidden [B, d], logits [B, vocab], k [B, KV_DIM], v [B, KV_DIM])``.
        """
        x = self.emb[token]
        q, k, v = x @ self.wq, x @ self.wk, x @ self.wv
        scale = KV_DIM ** -0.5
        # Memory scores in one bmm over the K||V records: q padded with zeros over the V half.
        q_pad = torch.cat([q, torch.zeros_like(q)], dim=-1)[:, :, None]
        s_mem = torch.bmm(mem_kv, q_pad).squeeze(-1) * scale
        s_mem = s_mem.masked_fill(~mem_valid, float("-inf"))
        loc_k = torch.cat([local_k, k[:, None]], dim=1)
        loc_v = torch.cat([local_v, v[:, None]], dim=1)
        s_loc = torch.bmm(loc_k, q[:, :, None]).squeeze(-1) * scale
        p = torch.cat([s_mem, s_loc], dim=1).softmax(dim=1)  # the token itself is always valid
        S = mem_kv.shape[1]
        out = (torch.bmm(p[:, None, :S], mem_kv).squeeze(1)[:, KV_DIM:]
               + torch.bmm(p[:, None, S:], loc_v).squeeze(1))
        h = torch.nn.functional.layer_norm(x + out @ self.wo, (self.hidden,)) + self.shared
        return h, h @ self.w_out, k, v


def selected_indices(mask: torch.Tensor):
    """bool ``[B, N]`` -> (int64 ``[B, S]`` chosen chunk indices ascending, -1 padded; valid)."""
    B, N = mask.shape
    S = int(mask.sum(dim=1).max()) if B and N else 0
    idx = torch.arange(N, device=mask.device).expand(B, N)
    ordered = torch.sort(torch.where(mask, idx, torch.full_like(idx, N)), dim=1).values[:, :S]
    valid = ordered < N
    return torch.where(valid, ordered, torch.full_like(ordered, -1)), valid


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


class MaskedMemory:
    """The release's path: the full KV cache on the device, unselected chunks masked out."""

    def __init__(self, cfg: DecodeConfig, device):
        self.history = ChunkHistory(cfg.batch, C.ATTN_KV_BYTES, page_size=cfg.page_size,
                                    device=device, capacity=cfg.final_chunks())

    def device_bytes(self) -> int:
        """KV bytes the device holds: the whole history."""
        return int(self.history.lengths.sum()) * C.ATTN_KV_BYTES

    def append(self, kv: torch.Tensor) -> None:
        self.history.append(kv.contiguous().view(torch.uint8))

    def set_resident(self, mask: torch.Tensor):
        self.idx, self.valid = selected_indices(mask)
        B = mask.shape[0]
        rows = torch.arange(B, device=mask.device, dtype=torch.int64)[:, None]
        row_base = rows * self.history.capacity
        self.flat_idx = (row_base + self.idx.clamp(min=0)).flatten()  # int64 addresses
        return None

    def read(self):
        rows = self.history.data.view(-1, C.ATTN_KV_BYTES).index_select(0, self.flat_idx)
        # zero the padding bytewise, exactly as the engine's read does (+0.0, never -0.0)
        rows = rows.view(*self.idx.shape, C.ATTN_KV_BYTES) * self.valid[..., None].to(torch.uint8)
        return rows.view(torch.float32), self.valid


class OffloadedMemory:
    """History on the host; attention reads K/V only through the engine's reserve + lookup."""

    def __init__(self, cfg: DecodeConfig, device):
        pages = cfg.reserve_pages if cfg.reserve_pages is not None else cfg.default_reserve_pages()
        self.engine = OffloadEngine(cfg.batch, (2 * KV_DIM,), torch.float32, reserve_pages=pages,
                                    page_size=cfg.page_size, device=device,
                                    capacity=cfg.final_chunks())

    def device_bytes(self) -> int:
        """KV bytes the device holds: the fixed reserve."""
        return self.engine.reserve_bytes

    def append(self, kv: torch.Tensor) -> None:
        self.engine.append(kv)

    def set_resident(self, mask: torch.Tensor):
        stats = self.engine.apply(mask)
        self.idx, _ = selected_indices(mask)  # which chunks to read, in ascending order
        return stats

    def read(self):
        return self.engine.read(self.idx)


def _pool_chunks(t: torch.Tensor, n: int) -> torch.Tensor:
    """Mean over each group of TOKENS_PER_CHUNK tokens: ``[B, n*4, F]`` -> ``[B, n, F]``."""
    return t[:, :n * C.TOKENS_PER_CHUNK].reshape(t.shape[0], n, C.TOKENS_PER_CHUNK, -1).mean(dim=2)


def decode(cfg: DecodeConfig, log=print) -> DecodeResult:
    """Run the loop; ``log`` receives one line per cycle and the summary lines."""
    cfg.validate()
    device = torch.device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    B = cfg.batch
    retriever = FlashMemoryRetriever(
        synthetic.make_layer_states(hidden=cfg.hidden, rank=cfg.rank, n_heads=cfg.n_heads,
                                    seed=cfg.seed),
        device=device, backend=cfg.backend)
    model = ToyDecoder(cfg.hidden, cfg.vocab, gen, device,
                       synthetic.shared_hidden_component(cfg.hidden))

    # The prompt's history: random chunk KV and mock compressed keys (index keys stay on device).
    memory = (OffloadedMemory if cfg.offload else MaskedMemory)(cfg, device)
    memory.append(torch.randn(B, cfg.n_chunks, 2 * KV_DIM, generator=gen).to(device))
    keys = ChunkHistory(B, C.CHUNK_BYTES, page_size=cfg.page_size, device=device,
                        capacity=cfg.final_chunks())
    keys.append(synthetic.mock_compressed_k(B, cfg.n_chunks, generator=gen, device=device))
    fallback = (ThresholdFallback(B, cfg.fallback_bound, device)
                if cfg.fallback_bound is not None else None)
    sel_kwargs = dict(mode=cfg.select, threshold=cfg.threshold, recent=cfg.recent, sink=cfg.sink,
                      page_size=cfg.page_size, max_pages=cfg.max_pages, fallback=fallback)
    if cfg.select == "chunk":
        sel_kwargs["max_resident"] = cfg.max_resident
    if cfg.select == "topk":
        sel_kwargs["top_k"] = cfg.effective_top_k()

    token = torch.randint(cfg.vocab, (B,), generator=gen).to(device)
    hidden = model.emb[token] + model.shared  # stands in for the prompt's last hidden state
    local_k = torch.zeros(B, 0, KV_DIM, device=device)  # tokens not yet folded into chunks
    local_v = torch.zeros(B, 0, KV_DIM, device=device)
    local_h = torch.zeros(B, 0, cfg.hidden, device=device)
    prompt_tokens = cfg.n_chunks * C.TOKENS_PER_CHUNK
    tokens, logits_out, cycles = [], [], []
    t_start = time.perf_counter()
    for step in range(cfg.steps):
        if step % cfg.interval == 0:
            t0 = time.perf_counter()
            # 1. fold complete chunks of recent tokens into the memory
            n_fold = local_k.shape[1] // C.TOKENS_PER_CHUNK
            if n_fold:
                memory.append(torch.cat([_pool_chunks(local_k, n_fold),
                                         _pool_chunks(local_v, n_fold)], dim=-1))
                keys.append(encode_row_keys(_pool_chunks(local_h, n_fold) @ model.w_key))
                cut = n_fold * C.TOKENS_PER_CHUNK
                local_k, local_v, local_h = local_k[:, cut:], local_v[:, cut:], local_h[:, cut:]
            # 2. score the whole history from the latest hidden state and its position
            n = int(keys.lengths[0])
            position = prompt_tokens + step - 1
            positions = torch.full((B,), max(position, 0), dtype=torch.int64, device=device)
            scores = retriever.ensemble(hidden, keys.data[:, :n], positions)
            # 3. the resident set; 4. bring it in (offload) / set up the mask
            rs = select_resident(scores, **sel_kwargs)
            stats = memory.set_resident(rs.mask)
            seconds = time.perf_counter() - t0
            keep = float(rs.keep_ratio.mean())
            cycles.append({"cycle": len(cycles), "step": step, "position": position, "chunks": n,
                           "keep": keep, "selected": int(rs.n_selected.sum()),
                           "fallback_rows": int(rs.fallback.sum()),
                           "pages_moved": stats.page_misses if stats else 0,
                           "page_hits": stats.page_hits if stats else 0,
                           "pages_evicted": stats.pages_evicted if stats else 0,
                           "bytes_moved": stats.bytes_moved if stats else 0, "seconds": seconds})
            moved = (f"pages moved {stats.page_misses:4d} ({_fmt_bytes(stats.bytes_moved)}), "
                     f"hits {stats.page_hits}, evicted {stats.pages_evicted}"
                     if stats else "masking only (nothing moved)")
            log(f"cycle {len(cycles) - 1:3d}  step {step:5d}  chunks {n:7d}  keep {keep:7.2%}  "
                f"{moved}  time {seconds * 1e3:.1f} ms")
        mem_kv, valid = memory.read()  # the resident chunks, ascending, zeros in the padding
        hidden, logits, k, v = model.step(token, mem_kv, valid, local_k, local_v)
        local_k = torch.cat([local_k, k[:, None]], dim=1)
        local_v = torch.cat([local_v, v[:, None]], dim=1)
        local_h = torch.cat([local_h, hidden[:, None]], dim=1)
        token = logits.argmax(dim=-1)
        tokens.append(token.cpu())
        logits_out.append(logits.float().cpu())
    elapsed = time.perf_counter() - t_start

    full_bytes = int(keys.lengths.sum()) * C.ATTN_KV_BYTES
    mean_selected = (sum(c["selected"] for c in cycles) / len(cycles)) if cycles else 0.0
    summary = {"tokens": B * cfg.steps, "cycles": len(cycles),
               "avg_keep": (sum(c["keep"] for c in cycles) / len(cycles)) if cycles else 0.0,
               "full_kv_bytes": full_bytes,
               "selected_kv_bytes": mean_selected * C.ATTN_KV_BYTES,
               "device_kv_bytes": memory.device_bytes(),
               "bytes_moved": sum(c["bytes_moved"] for c in cycles),
               "pages_moved": sum(c["pages_moved"] for c in cycles),
               "seconds": elapsed}
    summary["saving"] = 1.0 - summary["device_kv_bytes"] / full_bytes if full_bytes else 0.0
    _log_summary(cfg, device, summary, log)
    return DecodeResult(tokens=torch.stack(tokens, dim=1) if tokens
                        else torch.zeros(B, 0, dtype=torch.int64),
                        logits=torch.stack(logits_out, dim=1) if logits_out
                        else torch.zeros(B, 0, cfg.vocab),
                        cycles=cycles, summary=summary)


def _kv_label(device: torch.device, what: str = "") -> str:
    """What holds the KV: "GPU-side" only on a GPU; a CPU run has no GPU memory to save."""
    if device.type == "cuda":
        return f"GPU-side KV{f' ({what})' if what else ''}"
    return f"device-side KV ({f'{what}; ' if what else ''}device {device}, no GPU)"


def _log_summary(cfg: DecodeConfig, device: torch.device, s: dict, log) -> None:
    full = s["full_kv_bytes"]
    log(f"summary: {s['tokens']} tokens ({cfg.batch} x {cfg.steps}) in {s['seconds']:.2f} s, "
        f"{s['cycles']} cycles, select={cfg.select}, average keep {s['avg_keep']:.2%}")
    frac = s["avg_keep"]
    log(f"  KV full cache {_fmt_bytes(full)} ({C.ATTN_KV_BYTES} B/chunk); resident set on "
        f"average {_fmt_bytes(s['selected_kv_bytes'])} ({frac:.2%} of history)")
    if cfg.offload:
        log(f"  {_kv_label(device, 'reserve')} {_fmt_bytes(s['device_kv_bytes'])} = "
            f"{s['device_kv_bytes'] / full if full else 0:.2%} of full, saving {s['saving']:.2%}; "
            f"moved {s['pages_moved']} pages, {_fmt_bytes(s['bytes_moved'])} host->device")
    else:
        log(f"  {_kv_label(device)} {_fmt_bytes(s['device_kv_bytes'])} (no --offload: the full "
            f"cache stays on the device; --offload would keep about {frac:.2%})")


# --- CLI ------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    d = DecodeConfig()
    a = parser.add_argument
    a("--steps", type=int, default=d.steps, help="decode steps per row (default %(default)s)")
    a("--interval", type=int, default=d.interval,
      help="steps between retriever calls (default %(default)s)")
    a("--n-chunks", type=int, default=d.n_chunks,
      help="chunks of prompt history (4 tokens each; default %(default)s)")
    a("--batch", type=int, default=d.batch)
    a("--select", choices=SELECT_MODES, default=d.select,
      help="selection mode (default %(default)s)")
    a("--threshold", type=float, default=d.threshold, help="hit = score > threshold")
    a("--recent", type=int, default=d.recent, help="recent tail in CHUNKS (default %(default)s)")
    a("--sink", type=int, default=d.sink, help="sink chunks (default %(default)s)")
    a("--page-size", type=int, default=d.page_size, help="chunks per page (default %(default)s)")
    a("--max-pages", type=int, default=d.max_pages, help="page mode budget (default %(default)s)")
    a("--top-k", type=int, default=None,
      help="topk mode: chunks kept (default: max-pages x page-size)")
    a("--max-resident", type=int, default=None, help="chunk mode: cap on resident chunks")
    a("--fallback-bound", type=float, default=None,
      help="switch a row to full attention once its cumulative hit ratio exceeds this (off)")
    a("--offload", action="store_true",
      help="keep the KV history on the host; attention reads through the device reserve")
    a("--reserve-pages", type=int, default=None,
      help="device reserve size in pages (default: the selection's worst case)")
    a("--hidden", type=int, default=d.hidden, help="decoder/retriever hidden size")
    a("--seed", type=int, default=d.seed)
    a("--device", default=d.device)
    a("--backend", choices=BACKENDS, default=d.backend, help="retriever backend")


def run(args) -> int:
    cfg = DecodeConfig(steps=args.steps, interval=args.interval, n_chunks=args.n_chunks,
                       batch=args.batch, select=args.select, threshold=args.threshold,
                       recent=args.recent, sink=args.sink, page_size=args.page_size,
                       max_pages=args.max_pages, top_k=args.top_k, max_resident=args.max_resident,
                       fallback_bound=args.fallback_bound, offload=args.offload,
                       reserve_pages=args.reserve_pages, hidden=args.hidden, seed=args.seed,
                       device=args.device, backend=args.backend)
    decode(cfg)
    return 0
