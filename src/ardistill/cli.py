"""Command line: a thin argparse shell; every subcommand calls one importable function.

Each subcommand is registered by an ``_add_<name>`` function below (kebab-case flags). Keep the
work in the library modules: a handler only parses, calls, and prints.
"""

from __future__ import annotations

import argparse
import sys


def _add_version(sub):
    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=lambda args: print(__import__("ardistill").__version__))


# Subcommand registrations, in the order they appear in --help.
_REGISTRATIONS = [_add_version]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ardistill", description="Autoregressive distillation of diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _REGISTRATIONS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"ardistill {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(out) if isinstance(out, int) else 0
