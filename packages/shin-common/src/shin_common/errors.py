"""The errors a command line reports in one line (see :func:`shin_common.runner.run_command`).

Every one of them is a ``ValueError`` or an ``ImportError``, so library users who already catch
those keep working; the runner tells them apart from bugs, which still show their traceback.
"""

from __future__ import annotations

import os


class CorruptFileError(ValueError):
    """A file that exists but cannot be read as what it should be (truncated, garbage, foreign)."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path!r} is corrupt or not a file this tool wrote: {reason}")


class UnsafeFileError(CorruptFileError):
    """A file that would need arbitrary code to load (a pickle holding objects other than tensors)."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        ValueError.__init__(
            self,
            f"refusing to load {self.path!r}: it holds Python objects other than tensors and plain "
            f"containers, which could run code on load ({reason}); it was not written by this tool",
        )


class MissingExtraError(ImportError):
    """An optional dependency that the requested work needs is not installed."""

    def __init__(self, module: str, install: str, purpose: str) -> None:
        super().__init__(f"{purpose} needs {module}, which is not installed; install it with: pip install {install!r}")


class OutputDirectoryError(ValueError):
    """An output directory that breaks the run-directory rules (docs/run-contract.md)."""


class ConfigMismatchError(OutputDirectoryError):
    """An output directory holding a run of a different configuration.

    ``keys`` names every differing key; ``changes`` (``key: old -> new`` each, when the caller knows
    both values) is what the message shows, so a user sees at once which setting to restore.
    """

    def __init__(self, path: str | os.PathLike[str], keys: list[str], changes: list[str] | None = None) -> None:
        self.keys = keys
        self.changes = changes or keys
        shown = ", ".join(self.changes[:8])
        if len(self.changes) > 8:
            shown += f" and {len(self.changes) - 8} more"
        super().__init__(
            f"output directory {str(path)!r} holds a run with a different config (differing: {shown}); "
            "use the same settings to continue it, choose another directory, or pass --overwrite to replace that run"
        )
