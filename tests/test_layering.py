"""The layering of DESIGN.md, read from the source: which fxopt modules may import passes/backends, no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> package it is installed as (pyproject.toml's package-dir)
PACKAGES = {"fxopt": "fxopt", "passes": "fxopt.passes", "backends": "fxopt.backends"}
# the facade: the only part of fxopt/ that may import fxopt.passes / fxopt.backends
FACADE = {"fxopt", "fxopt.compiler", "fxopt.recipes", "fxopt.cli", "fxopt.recipe_args", "fxopt.demo"}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every fxopt module ``name`` imports, at any depth of its code (lazy imports included)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [f"{module}.{alias.name}" for alias in node.names]
            out.update(n for n in names if n in MODULES)  # `from fxopt import passes` imports fxopt.passes
            if not all(n in MODULES for n in names):  # `from fxopt import Pass` reads the package itself
                out.add(module)
    return {m for m in out if m in MODULES}


GRAPH = nx.DiGraph()
for _name, _path in MODULES.items():
    GRAPH.add_node(_name)
    GRAPH.add_edges_from((_name, dep) for dep in _imports(_name, _path) if dep != _name)


def _reaches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_the_reader_sees_the_whole_tree():
    assert {"fxopt.compiler", "fxopt.io.dispatch", "fxopt.quant.nn.int8", "fxopt.passes.calibrate",
            "fxopt.backends.lowering"} <= set(MODULES)
    assert ("fxopt.backends.lowering", "fxopt.quant.nn") in GRAPH.edges  # `from fxopt.quant.nn import ...`
    assert ("fxopt.compiler", "fxopt.registry") in GRAPH.edges  # `from . import meta, registry`


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _reaches(m, "fxopt")
                                          and not _reaches(m, "fxopt.passes") and not _reaches(m, "fxopt.backends")
                                          and m not in FACADE))
def test_core_never_imports_passes_or_backends(module):
    bad = sorted(d for d in GRAPH.successors(module) if _reaches(d, "fxopt.passes") or _reaches(d, "fxopt.backends")
                 or d in FACADE - {"fxopt"})
    assert not bad, f"{module} imports {bad}: the core must not depend on passes/, backends/ or the facade"


def test_backends_never_import_passes():
    bad = sorted((m, d) for m, d in GRAPH.edges if _reaches(m, "fxopt.backends") and _reaches(d, "fxopt.passes"))
    assert not bad


def test_no_import_cycles():
    # a package importing its own submodules is how packages work; anything else in a cycle is a tangle
    cycles = [c for c in nx.simple_cycles(GRAPH)
              if not (len(c) == 2 and any(c[i].startswith(c[1 - i] + ".") for i in (0, 1)))]
    assert not cycles, f"import cycles: {cycles[:5]}"
