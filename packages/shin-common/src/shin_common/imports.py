"""Import cycles inside one package, found from its source (for each package's own test).

Every ``import`` counts, the ones inside functions too: an import moved into a function to hide a
cycle still ties the two modules together. Imports under ``if TYPE_CHECKING:`` do not count (they
never run).
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path


def _module_files(package: str) -> dict[str, Path]:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{package!r} is not an importable package")
    root = Path(next(iter(spec.submodule_search_locations)))
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's own modules that ``module`` imports (a package import counts as its ``__init__``)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.add(alias.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    source = ".".join([*base, child.module] if child.module else base)
                else:
                    source = child.module or ""
                submodules = {f"{source}.{alias.name}" for alias in child.names} & known
                found.update(submodules)
                if len(submodules) < len(child.names):  # some names come from the module ``source`` itself
                    found.add(source)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {name for name in found if name in known and name != module}


def import_cycles(package: str) -> list[list[str]]:
    """Every cycle of imports between modules of ``package`` (each as ``[a, b, ..., a]``).

    ``from a.b import c`` is an edge to the module ``a.b.c`` when there is one, else to ``a.b``; the
    parent packages that Python also initialises are not followed, so a package ``__init__`` that
    exports its submodules' names does not put every submodule on a cycle.
    """
    files = _module_files(package)
    known = set(files)
    graph = {module: _imports(module, path, known) for module, path in files.items()}
    cycles: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    for start in sorted(graph):
        stack: list[tuple[str, list[str]]] = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for target in sorted(graph[node]):
                if target == start:
                    key = frozenset(path)
                    if key not in seen:
                        seen.add(key)
                        cycles.append([*path, start])
                elif target not in path and target > start:
                    stack.append((target, [*path, target]))
    return cycles
