"""The one ``main()`` of every console script: parse, delegate, report errors in one line.

Known errors (a bad value, a bad or corrupt file, a file-system error, a missing optional extra)
print ``TOOL COMMAND: error: ...`` on one line and exit 2; Ctrl-C prints one line and exits 130.
``--debug`` (anywhere on the command line) or ``SHIN_DEBUG=1`` shows the traceback instead.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import NoReturn

from shin_common.errors import MissingExtraError
from shin_common.logs import setup_logging

DEBUG_ENV = "SHIN_DEBUG"
KNOWN_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, MissingExtraError)

Handler = Callable[[argparse.Namespace], int | None]


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _debug_requested() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = []
    for action in parser._actions:  # argparse keeps subcommands only here
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found.extend([sub, *_subparsers(sub)])
    return found


def _one_line_usage_errors(parser: argparse.ArgumentParser) -> None:
    """Make argparse report a bad flag in one line too (it prints the whole usage by default)."""

    def error(message: str, _parser: argparse.ArgumentParser = parser) -> NoReturn:
        _parser.exit(2, f"{_parser.prog}: error: {_one_line(message)} (see {_parser.prog} --help)\n")

    parser.error = error  # type: ignore[method-assign]


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` and each of its subcommands a ``--debug`` flag."""
    for each in [parser, *_subparsers(parser)]:
        if not any("--debug" in a.option_strings for a in each._actions):
            each.add_argument(
                "--debug",
                action="store_true",
                default=argparse.SUPPRESS if each is not parser else False,
                help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)",
            )


def run_command(
    parser: argparse.ArgumentParser,
    handlers: Mapping[str, Handler],
    argv: Sequence[str] | None = None,
    *,
    resumable: Collection[str] = (),
) -> int:
    """Parse ``argv``, run the chosen command's handler and turn known errors into one line.

    ``resumable`` names the commands whose interrupted runs a rerun continues; their Ctrl-C line
    says so.
    """
    add_debug_flag(parser)
    for each in [parser, *_subparsers(parser)]:
        _one_line_usage_errors(each)
    args = parser.parse_args(argv)
    command = getattr(args, "command", None)
    if command is None:
        parser.print_help()
        return 0
    debug = bool(getattr(args, "debug", False)) or _debug_requested()
    prefix = f"{parser.prog} {command}"
    try:
        setup_logging()
        status = handlers[command](args)
    except KeyboardInterrupt:
        if debug:
            raise
        hint = "; rerun the same command to resume" if command in resumable else ""
        print(f"{prefix}: interrupted{hint}", file=sys.stderr)
        return 130
    except KNOWN_ERRORS as exc:
        if debug:
            raise
        print(f"{prefix}: error: {_one_line(str(exc)) or type(exc).__name__}", file=sys.stderr)
        return 2
    return 0 if status is None else int(status)
