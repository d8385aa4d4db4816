"""``flashmemory-triton`` command line: one subcommand per module (``demo``, ``decode``, ``bench``).

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Only the
module of the subcommand being run is imported (they import torch, which takes seconds), so
``flashmemory-triton --help`` answers at once. ``bench`` keeps its own parser: its arguments go
to ``flashmemory_triton.bench.cli.main`` unchanged.
"""

from __future__ import annotations

import argparse
import importlib
import sys

PROG = "flashmemory-triton"
SUBCOMMANDS = {
    "demo": ("flashmemory_triton.demo",
             "score random mock keys with a checkpoint (default: synthetic weights) and print "
             "selections"),
    "decode": ("flashmemory_triton.decode",
               "toy sparse-decode loop with real resident sets and offload"),
    "bench": ("flashmemory_triton.bench.cli",
              "benchmark suite (the same as python -m flashmemory_triton.bench; "
              f"'{PROG} bench --help' for its flags)"),
}
DELEGATED = ("bench",)  # subcommands that parse their own arguments


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first non-option word; the top level has no
    option taking a value), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to define its arguments."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    sub.required = True
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == command and name not in DELEGATED:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(argv)
    if command in DELEGATED and argv[0] == command:
        module = importlib.import_module(SUBCOMMANDS[command][0])
        return int(module.main(argv[1:], prog=f"{PROG} {command}") or 0)
    args = build_parser(command).parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as exc:
        # Bad flags or inputs: one readable line, not a traceback.
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
