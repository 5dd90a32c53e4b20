"""Registry, import-cycle finder and atomic text writes."""

import os
import sys
import textwrap

import pytest

from shin_common import Registry
from shin_common.files import write_text_atomic
from shin_common.imports import import_cycles


def test_registry_registers_once_and_names_the_choices_on_a_miss():
    schedules: Registry = Registry("staleness schedule")

    @schedules.register("constant")
    def constant(stages):
        return [stages] * stages

    schedules.add("linear", len)
    assert schedules.get("constant") is constant and schedules.names() == ("constant", "linear")
    assert "linear" in schedules and list(schedules) == ["constant", "linear"] and len(schedules) == 2
    with pytest.raises(ValueError, match=r"^unknown staleness schedule 'cubic'; expected one of: constant, linear$"):
        schedules.get("cubic")
    with pytest.raises(ValueError, match="staleness schedule 'linear' is already registered"):
        schedules.add("linear", max)
    assert schedules.remove("linear") is len and schedules.names() == ("constant",)


def _package(root, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_import_cycles_counts_lazy_imports_and_ignores_type_checking(tmp_path, monkeypatch):
    _package(
        tmp_path / "cyc",
        {
            "__init__.py": "from cyc.a import A\n",
            "a.py": "from cyc import b\nA = 1\n",
            "b.py": "def f():\n    from cyc.a import A  # hidden in a function: still a cycle\n    return A\n",
            "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cyc.d import D\n",
            "d.py": "from . import c\nD = 1\n",
            "sub/__init__.py": "from .e import E\n",
            "sub/e.py": "from ..a import A\nE = A\n",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("cyc", None)
    assert import_cycles("cyc") == [["cyc.a", "cyc.b", "cyc.a"]]


def test_import_cycles_of_the_shared_package_itself():
    assert import_cycles("shin_common") == []


def test_write_text_atomic_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    target = tmp_path / "table.md"
    write_text_atomic(target, "first\n")
    os.chmod(target, 0o640)
    write_text_atomic(target, "second ü\n")
    assert target.read_text(encoding="utf-8") == "second ü\n" and (os.stat(target).st_mode & 0o777) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]
