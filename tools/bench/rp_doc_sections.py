"""Replace one script's marked section of docs/benchmarks/recon-prune.md, leaving the others alone.

Each benchmark script owns the text between ``<!-- NAME: begin -->`` and ``<!-- NAME: end -->``; a
missing section is appended, so the scripts can run in any order without deleting each other's
results.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH_DOC = ROOT / "docs" / "benchmarks" / "recon-prune.md"
TITLE = "# recon-prune benchmarks"


def replace_section(name: str, lines: list[str], path: Path = BENCH_DOC) -> str:
    """Write ``lines`` as the section ``name`` of ``path`` and return the whole new text."""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    section = "\n".join([begin, *lines, end])
    text = path.read_text(encoding="utf-8") if path.exists() else TITLE + "\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")
    return text
