"""The ``diffcr`` command line: one module per command, each with ``NAME``, ``HELP``,
``add_parser(sub)`` and ``run(args, parser)``.

  diffcr info       versions, device, which kernel backends loaded (and why not)
  diffcr bench      dense vs routed block: time, speedup, ideal (method §6), peak memory
  diffcr train      the embedded end-to-end demo (no arguments), or DiffCR fine-tuning of a
                    diffusers DiT on an image folder or of a pipeline on captioned data
                    (--model, --data); works under torchrun and accelerate launch
  diffcr inspect    the learned ratio table of a DiffCR checkpoint
  diffcr generate   images from a DiT or pipeline + DiffCR checkpoint
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..._version import __version__
from . import bench, generate, info, inspect, train

__all__ = ["main", "build_parser", "COMMANDS"]

#: the commands, in the order ``diffcr --help`` lists them
COMMANDS = {m.NAME: m for m in (info, train, inspect, generate, bench)}


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (no usage dump) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``diffcr`` parser: every command's sub-parser from its module."""
    parser = _Parser(prog="diffcr", description=__doc__.split("\n\n", 1)[1],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"diffcr {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command not in COMMANDS:
        parser.print_help(sys.stderr)
        return 2
    return COMMANDS[args.command].run(args, parser)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
