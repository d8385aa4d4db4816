"""``flashmemory-triton`` command line: one subcommand per module (``demo``, ``decode``).

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``; they are
imported lazily so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "demo": ("flashmemory_triton.demo", "score mock keys with a checkpoint and print selections"),
    "decode": ("flashmemory_triton.decode", "toy sparse-decode loop with real resident sets and offload"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashmemory-triton", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    sub.required = True
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as exc:
        # Bad flags or inputs: one readable line, not a traceback.
        print(f"flashmemory-triton {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
