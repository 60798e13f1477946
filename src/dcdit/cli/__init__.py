"""The `dcdit` command line.

Each subcommand lives in its own module ``dcdit.cli.<name>`` exposing
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int | None``.
Modules keep heavy imports inside ``run`` so ``dcdit --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from dcdit import __version__

# name -> module; order is the order shown in --help.
COMMANDS = [
    "demo",
    "info",
    "train",
    "sample",
    "evaluate",
    "reference",
    "flops",
    "bench",
    "visualize",
    "upcycle",
    "extract-features",
    "train-classifier",
]


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit code 2."""


def _module(name: str):
    return importlib.import_module("dcdit.cli." + name.replace("-", "_"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcdit",
        description="Dynamic Chunking Diffusion Transformers: train, sample, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"dcdit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = _module(name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("dcdit.cli."):
                continue  # command not available in this build
            raise
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    try:
        code = args._run(args)
    except (UserError, FileNotFoundError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"dcdit {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dcdit {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
