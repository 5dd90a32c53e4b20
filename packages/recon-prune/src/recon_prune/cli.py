"""``recon-prune`` command line (also ``python -m recon_prune``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from recon_prune import __version__
from shin_common import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recon-prune", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    if args.command is None:
        parser.print_help()
    return 0
