"""``shin-common``: inspect the shared pieces (``shin-common corpus`` describes the offline corpus)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from shin_common import __version__
from shin_common.corpus import stdlib_corpus
from shin_common.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shin-common",
        description="Shared plumbing of the shin research toolkit.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("corpus", help="describe the standard-library corpus: splits, sizes, checksum")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    if args.command == "corpus":
        print(json.dumps(stdlib_corpus().describe(), indent=2))
        return 0
    parser.print_help()
    return 0
