"""``flashmemory-triton demo``: the release's ``demo.py``, done properly.

Loads a checkpoint (``--ckpt PATH``, ``--hub REPO``, or with neither the embedded full-size
synthetic checkpoint, generated once and cached), builds the release demo's mock inputs (keys
``e4m3(randn * 0.5)`` with scales in [0.05, 0.2]; hidden states from
:func:`~flashmemory_triton.synthetic.mock_hidden`; every row's position is the last token of a
context of ``4 * n_chunks`` tokens), and prints the layers and hyperparameters, per-layer
score statistics, the ensemble, the threshold and top-k selections with keep ratios, the
backend used and the time per scoring call.

It says so plainly in its output: the default weights are synthetic and the inputs are always
random, so the scores illustrate the pipeline (shapes, kernels, selection, timing) and mean
nothing about what the trained retriever would select on real text.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from . import constants as C

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_N_CHUNKS = 4096  # 16K tokens of context: a second per call on two CPU cores
DEFAULT_TOPK_FRACTION = 0.10  # the deployed budget is about 10% of history (design §6)
_PREVIEW = 12  # scores / indices shown per row


# --- argparse value types: bad values become one-line argparse errors (exit 2) -------------------
def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (scores are sigmoids), got {text}")
    return value


def _layer_list(text: str) -> list[str]:
    names = [n for n in text.replace(",", " ").split() if n]
    if not names:
        raise argparse.ArgumentTypeError(f"expected layer names like l10,l20, got {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .checkpoint import DEFAULT_REPO_ID
    from .retriever import BACKENDS, ENSEMBLE_MODES

    src = parser.add_argument_group("checkpoint (default: the cached full-size synthetic one)")
    which = src.add_mutually_exclusive_group()
    which.add_argument("--ckpt", metavar="PATH",
                       help="a .safetensors/.pt joint or per-layer checkpoint, or a directory")
    which.add_argument("--hub", metavar="REPO", nargs="?", const=DEFAULT_REPO_ID,
                       help="Hugging Face repo id or local directory "
                            "(bare --hub: the release repo)")
    src.add_argument("--hub-filename", metavar="FILE",
                     help="file inside the repo (default: flashmemory_ds_v4.safetensors, then "
                          "checkpoints/top3_R930_joint.pt)")
    src.add_argument("--revision", help="hub branch, tag or commit (default: main)")
    src.add_argument("--cache-dir", metavar="DIR",
                     help="hub cache directory (default: the HF cache)")
    src.add_argument("--local-files-only", action="store_true",
                     help="never touch the network; use the hub cache only")
    src.add_argument("--layers", type=_layer_list, metavar="LAYERS",
                     help="load only these layers, comma separated (e.g. l10,l20)")

    run = parser.add_argument_group("inputs and model")
    run.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    run.add_argument("--dtype", choices=DTYPES, default="float32",
                     help="weight storage dtype (default: float32, as released)")
    run.add_argument("--backend", choices=BACKENDS, default="auto",
                     help="auto (triton on CUDA or under TRITON_INTERPRET=1, else torch), torch "
                          "or triton (default: auto)")
    run.add_argument("--batch", type=_int_at_least(1), default=2,
                     help="decode tokens (rows) scored at once (default: 2)")
    run.add_argument("--n-chunks", type=_int_at_least(1), default=DEFAULT_N_CHUNKS,
                     help=f"compressed chunks of history per row (default: {DEFAULT_N_CHUNKS})")
    run.add_argument("--max-position", type=_int_at_least(1), default=C.MAX_POSITION_RELEASE,
                     help=f"RoPE table rows (default: {C.MAX_POSITION_RELEASE}; serving uses "
                          f"{C.MAX_POSITION_SERVING})")
    run.add_argument("--seed", type=_int_at_least(0), default=0,
                     help="mock-input seed (default: 0)")

    sel = parser.add_argument_group("selection and timing")
    sel.add_argument("--ensemble", choices=ENSEMBLE_MODES, default="max",
                     help="cross-layer ensemble of the sigmoid scores (default: max)")
    sel.add_argument("--threshold", type=_probability, default=C.DEFAULT_THRESHOLD,
                     help=f"keep chunks with score > threshold (default: {C.DEFAULT_THRESHOLD})")
    sel.add_argument("--top-k", type=_int_at_least(1), default=None,
                     help=f"chunks kept by top-k (default: {DEFAULT_TOPK_FRACTION:.0%} of "
                          "--n-chunks)".replace("%", "%%"))
    sel.add_argument("--repeats", type=_int_at_least(1), default=3,
                     help="timed scoring calls; the median is reported (default: 3)")


# --- helpers ----------------------------------------------------------------------------------
def _parse_device(text: str):
    from . import _validate as V
    return V.device("--device", text)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load_model(args, device, dtype):
    from .retriever import FlashMemoryRetriever

    kwargs = dict(device=device, max_position=args.max_position, layers=args.layers,
                  backend=args.backend, dtype=dtype)
    hub_only = [flag for flag, value in (("--hub-filename", args.hub_filename),
                                         ("--revision", args.revision),
                                         ("--cache-dir", args.cache_dir),
                                         ("--local-files-only", args.local_files_only)) if value]
    if hub_only and args.hub is None:
        raise ValueError(f"{', '.join(hub_only)} only apply with --hub REPO")
    if args.ckpt is not None:
        return FlashMemoryRetriever.from_checkpoint(args.ckpt, **kwargs), args.ckpt
    if args.hub is not None:
        from .checkpoint import resolve_pretrained
        path = resolve_pretrained(args.hub, filename=args.hub_filename, revision=args.revision,
                                  cache_dir=args.cache_dir, local_files_only=args.local_files_only)
        return FlashMemoryRetriever.from_checkpoint(path, **kwargs), f"{path} (from {args.hub})"
    from .synthetic import default_checkpoint_path, ensure_default_checkpoint
    try:
        path = ensure_default_checkpoint(progress=_log)
    except OSError as exc:
        raise ValueError("cannot write the synthetic checkpoint cache "
                         f"{default_checkpoint_path()}: "
                         f"{exc}; set FLASHMEMORY_CACHE to a writable directory") from None
    return FlashMemoryRetriever.from_checkpoint(path, **kwargs), f"{path} (synthetic default)"


def _illustration_note(synthetic: bool) -> str:
    """What the printed scores mean, stated before any of them."""
    if synthetic:
        return ("the weights are SYNTHETIC (generated by flashmemory_triton.synthetic, not the "
                "trained FlashMemory retriever) and the inputs are RANDOM mock keys and hidden "
                "states: the scores and selections below illustrate the pipeline (shapes, "
                "kernels, selection, timing) and mean nothing about a real model. --ckpt or "
                "--hub load real weights.")
    return ("the inputs are RANDOM mock keys and hidden states, not a model's: the scores "
            "below exercise these weights but are not a retrieval over real text.")


def _stats(t) -> str:
    t = t.float()
    return (f"min {t.min().item():.4f}  mean {t.mean().item():.4f}  "
            f"max {t.max().item():.4f}  std {t.std().item() if t.numel() > 1 else 0.0:.4f}")


def _time_calls(fn, repeats: int, device) -> list[float]:
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


# --- the demo ---------------------------------------------------------------------------------
def run(args) -> int:
    import torch

    from .synthetic import mock_compressed_k, mock_hidden

    device = _parse_device(args.device)
    dtype = getattr(torch, args.dtype)
    model, source = _load_model(args, device, dtype)
    backend = model.resolved_backend()  # raises a friendly ValueError if triton cannot run here
    B, N = args.batch, args.n_chunks
    top_k = args.top_k if args.top_k is not None else max(1, round(DEFAULT_TOPK_FRACTION * N))
    thr = args.threshold

    print(f"[demo] checkpoint: {source}")
    print(f"[demo] NOTE: {_illustration_note(synthetic=args.ckpt is None and args.hub is None)}")
    print(f"[demo] layers: {', '.join(model.layer_names)}")
    print(f"[demo] hyperparameters: n_heads={model.n_heads} head_dim={model.head_dim} "
          f"hidden={model.hidden_size} q_lora_rank={model.q_lora_rank} rope_dim={C.ROPE_DIM} "
          f"max_position={model.max_position} "
          f"weight_scale={C.weight_scale(model.n_heads, model.head_dim):.6g} "
          f"dtype={str(model.dtype).replace('torch.', '')} device={model.device}")
    print(f"[demo] backend: {backend} (requested {args.backend})")

    g = torch.Generator().manual_seed(args.seed)
    compressed_k = mock_compressed_k(B, N, generator=g, device=device, head_dim=model.head_dim)
    hidden = mock_hidden(B, model.hidden_size, generator=g, device=device)
    context = N * C.TOKENS_PER_CHUNK
    positions = torch.full((B,), context - 1, dtype=torch.int64, device=device)
    print(f"[demo] mock inputs (seed {args.seed}): hidden {tuple(hidden.shape)} float32, "
          f"compressed_k {tuple(compressed_k.shape)} uint8 "
          f"({compressed_k.numel() / 2**20:.2f} MiB), positions {context - 1} per row "
          f"(context {context} tokens = {N} chunks)")
    if context - 1 >= model.max_position:
        print(f"[demo] note: position {context - 1} >= max_position {model.max_position}; "
              "RoPE clamps it to the last table row (raise --max-position)")

    with torch.inference_mode():
        per_layer = model(hidden, compressed_k, positions)
        print(f"\n[demo] per-layer sigmoid scores over {B}x{N} chunks (keep = score > {thr:g}):")
        width = max(len(n) for n in model.layer_names)
        for name, s in per_layer.items():
            keep = (s > thr).float().mean().item()
            print(f"    {name:<{width}}  {_stats(s)}  keep {keep:.1%}")

        scores = model.ensemble(hidden, compressed_k, positions, mode=args.ensemble)
        print(f"\n[demo] ensemble ({args.ensemble}) of {model.n_layers} layer(s): "
              f"{_stats(scores)}  keep {(scores > thr).float().mean().item():.1%}")
        for b in range(B):
            preview = ", ".join(f"{v:.3f}" for v in scores[b, :_PREVIEW].tolist())
            print(f"    row {b}: [{preview}{', ...' if N > _PREVIEW else ''}]")

        keep_thr = model.select_topk(hidden, compressed_k, positions, threshold=thr,
                                     mode=args.ensemble)
        print(f"\n[demo] threshold selection (score > {thr:g}):")
        for b in range(B):
            n_keep = int(keep_thr[b].sum())
            print(f"    row {b}: keep {n_keep}/{N} chunks ({n_keep / N:.1%})")

        keep_top = model.select_topk(hidden, compressed_k, positions, top_k=top_k,
                                     mode=args.ensemble)
        k_eff = min(top_k, N)
        default_note = "" if args.top_k is not None else f", default {DEFAULT_TOPK_FRACTION:.0%}"
        print(f"\n[demo] top-k selection (k={top_k}{default_note}):")
        for b in range(B):
            idx = keep_top[b].nonzero(as_tuple=True)[0]
            kth = scores[b][idx].min().item() if idx.numel() else float("nan")
            overlap = int((keep_top[b] & keep_thr[b]).sum())
            shown = ", ".join(str(i) for i in idx[:_PREVIEW].tolist())
            print(f"    row {b}: keep {idx.numel()}/{N} chunks ({idx.numel() / N:.1%}), "
                  f"k-th score {kth:.4f}, {overlap}/{k_eff} also above the threshold; "
                  f"indices [{shown}{', ...' if idx.numel() > _PREVIEW else ''}]")

        times = _time_calls(lambda: model.ensemble(hidden, compressed_k, positions,
                                                   mode=args.ensemble), args.repeats, device)
    median = statistics.median(times)
    flop = C.flops_per_chunk_per_layer(model.n_heads, model.head_dim) * B * N * model.n_layers
    print(f"\n[demo] time per call: {median * 1e3:.2f} ms (ensemble(), median of {len(times)}, "
          f"min {min(times) * 1e3:.2f} ms; backend {backend}, device {model.device}, "
          f"{B * N / median / 1e6:.3g} M chunks/s, {flop / median / 1e9:.3g} GFLOP/s of scoring)")
    print("[demo] done (random inputs: the scores illustrate the pipeline, not a real model)")
    return 0
