"""The dependency rule of the monorepo (docs/architecture.md), checked on the source tree.

Method packages may import shin_common but never each other; shin_common imports none of them;
every method package declares shin-common by version range, never by path.
"""

import ast
import tomllib
from pathlib import Path

import pytest

PACKAGES_DIR = Path(__file__).resolve().parents[2]
METHODS = {
    "recon-prune": "recon_prune",
    "cbm-intervene": "cbm_intervene",
    "sam-overparam": "sam_overparam",
    "basisrot-pipeline": "basisrot_pipeline",
}
ALL_IMPORTS = {"shin-common": "shin_common", **METHODS}

pytestmark = pytest.mark.skipif(
    not all((PACKAGES_DIR / dist / "src").is_dir() for dist in ALL_IMPORTS),
    reason="runs in the monorepo checkout only",
)


def imported_top_level_modules(package_dir: Path) -> dict[str, set[str]]:
    """Map each top-level module name imported anywhere in the package's code to the files doing it."""
    found: dict[str, set[str]] = {}
    for file in sorted(package_dir.rglob("*.py")):
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in {
                "import_module",
                "__import__",
            }:
                names = [a.value for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(file.name)
    return found


@pytest.mark.parametrize("dist", list(ALL_IMPORTS))
def test_no_imports_across_method_packages(dist):
    own = ALL_IMPORTS[dist]
    imports = imported_top_level_modules(PACKAGES_DIR / dist)
    forbidden = {mod: files for mod, files in imports.items() if mod in METHODS.values() and mod != own}
    assert not forbidden, f"{dist} imports other method packages: {forbidden}"


def test_the_checker_sees_imports(tmp_path):
    (tmp_path / "m.py").write_text("import recon_prune.x\nfrom cbm_intervene import y\nimport os\n")
    assert {"recon_prune", "cbm_intervene", "os"} <= set(imported_top_level_modules(tmp_path))


@pytest.mark.parametrize("dist", list(METHODS))
def test_shin_common_declared_by_version_range(dist):
    project = tomllib.loads((PACKAGES_DIR / dist / "pyproject.toml").read_text())["project"]
    deps = [d.replace(" ", "") for d in project["dependencies"]]
    shared = [d for d in deps if d.startswith("shin-common")]
    assert shared == ["shin-common>=0.1,<0.2"], shared
    assert not any("@" in d or "file:" in d or "packages/" in d for d in deps), deps
    assert project["scripts"] == {dist: f"{METHODS[dist]}.cli:main"}
