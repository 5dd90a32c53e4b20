"""Replace one script's marked section of a benchmark page, leaving the other sections alone.

Each benchmark script owns the text between ``<!-- NAME: begin -->`` and ``<!-- NAME: end -->`` of
its package's page under ``docs/benchmarks/``; a missing section is appended, so the scripts
sharing a page can run in any order without deleting each other's results.
"""

from __future__ import annotations

from pathlib import Path

DOCS_BENCHMARKS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"


def markers(name: str) -> tuple[str, str]:
    """The begin and end comments that delimit section ``name``."""
    return f"<!-- {name}: begin -->", f"<!-- {name}: end -->"


def replace_section(path: str | Path, name: str, lines: list[str], *, title: str | None = None) -> str:
    """Write ``lines`` as section ``name`` of the page ``path`` and return the page's new text.

    A page that does not exist yet starts with ``title`` (default ``# <file stem> benchmarks``).
    """
    page = Path(path)
    begin, end = markers(name)
    section = "\n".join([begin, *lines, end])
    if page.exists():
        text = page.read_text(encoding="utf-8")
    else:
        text = (title if title is not None else f"# {page.stem} benchmarks") + "\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text, encoding="utf-8")
    return text
