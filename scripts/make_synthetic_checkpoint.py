#!/usr/bin/env python
"""Write a deterministic synthetic FlashMemory joint checkpoint in the release format.

    # full size, 510 MB:
    python scripts/make_synthetic_checkpoint.py out/flashmemory_ds_v4.safetensors
    python scripts/make_synthetic_checkpoint.py tiny.pt --hidden 256 --rank 64 --freqs-cis 1024
    python scripts/make_synthetic_checkpoint.py --default   # fill the demo's cache

The weights and their design are documented in :mod:`flashmemory_triton.synthetic`.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from flashmemory_triton import constants as C
from flashmemory_triton.synthetic import ensure_default_checkpoint, write_checkpoint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output", nargs="?", help="output file (.safetensors, .pt or .pth)")
    p.add_argument("--default", action="store_true",
                   help="generate the demo's cached full-size default instead of OUTPUT")
    p.add_argument("--hidden", type=int, default=C.HIDDEN_SIZE)
    p.add_argument("--rank", type=int, default=C.Q_LORA_RANK, help="q LoRA rank")
    p.add_argument("--heads", type=int, default=C.DEFAULT_N_HEADS)
    p.add_argument("--head-dim", type=int, default=C.HEAD_DIM)
    p.add_argument("--layers", default=",".join(C.LAYER_NAMES), help="comma-separated layer names")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--freqs-cis", type=int, default=0, metavar="ROWS",
                   help=".pt only: also store a freqs_cis table of ROWS rows like the release")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.default == (args.output is not None):
        parser.error("give exactly one of OUTPUT or --default")
    try:
        if args.default:
            print(ensure_default_checkpoint(progress=print))
            return 0
        start = time.perf_counter()
        path = write_checkpoint(
            args.output, hidden=args.hidden, rank=args.rank, n_heads=args.heads,
            head_dim=args.head_dim, layers=[n for n in args.layers.split(",") if n],
            seed=args.seed, dtype=getattr(torch, args.dtype), freqs_cis_max_position=args.freqs_cis)
    except (ValueError, TypeError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
