"""The packages import each other without cycles, read with ``ast`` (nothing is imported).

A module-level cycle makes import order matter; any cycle, even through imports inside functions (which run after
every module has loaded), hides which module is the lower layer. Imports under ``if TYPE_CHECKING:`` never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("muffin", "eval", "llava", "omnilmm", "utils")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    """Every module of ``PACKAGES`` by dotted name (a package by its ``__init__``)."""
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(body: list[ast.stmt], nested: bool) -> list[ast.Import | ast.ImportFrom]:
    """Import statements of ``body`` that can run: those at module level (in if / try / with blocks too) and, with
    ``nested``, those inside functions and classes; never those under ``if TYPE_CHECKING:``."""
    out: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            out += _imports(node.orelse, nested)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if nested:
                out += _imports(node.body, nested)
        else:  # if / try / with / for / while / match: the statements of each block
            for field in ("body", "orelse", "finalbody"):
                out += _imports(getattr(node, field, None) or [], nested)
            for block in (*(getattr(node, "handlers", None) or ()), *(getattr(node, "cases", None) or ())):
                out += _imports(block.body, nested)
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path], nested: bool = False) -> set[str]:
    """The modules of ``modules`` that ``name`` imports (at module level; with ``nested`` also inside functions);
    ``from pkg import sub`` counts as ``pkg.sub`` when ``sub`` is a module, else as ``pkg``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _imports(ast.parse(path.read_text(encoding="utf-8")).body, nested):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            while target and target not in modules:  # "import a.b.c" of a non-module name: its deepest module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_cycle_finder_on_a_hand_made_graph() -> None:
    """a -> b -> c -> a is one cycle; d -> a and c -> e hang off it; f <-> g is a second one."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "e"}, "d": {"a"}, "e": set(), "f": {"g"}, "g": {"f"}}
    assert import_cycles(graph) == [["a", "b", "c"], ["f", "g"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_edges_follow_python_import_rules(tmp_path: Path) -> None:
    """``from pkg import sub`` is an edge to the submodule, ``from pkg import name`` to the package, relative
    imports resolve from the importing module's package, and imports inside functions or TYPE_CHECKING are no
    edges."""
    files = {
        "p/__init__.py": "from p.a import f\n",
        "p/a.py": "from . import b\nfrom .b import g\ndef f():\n    import p.c\n",
        "p/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p import a\ntry:\n    import p.c\n"
        "except ImportError:\n    pass\ng = 1\n",
        "p/c.py": "from p import g_missing\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    mods = {module_name(p, tmp_path): p for p in sorted((tmp_path / "p").rglob("*.py"))}
    graph = {m: imports_of(m, p, mods) for m, p in mods.items()}
    assert graph == {"p": {"p.a"}, "p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p"}}
    assert import_cycles(graph) == [["p", "p.a", "p.b", "p.c"]]
    nested = {m: imports_of(m, p, mods, nested=True) for m, p in mods.items()}
    assert nested["p.a"] == {"p.b", "p.c"} and nested["p.b"] == {"p.c"}  # the function's import; not TYPE_CHECKING


# Cycles other sessions are removing; each names its owner. Remove an entry when its cycle is gone (the test
# below fails while an entry is stale, so the list cannot silently outlive the cycle).
EXPECTED_CYCLES: list[list[str]] = []


@pytest.mark.parametrize("nested", [False, True], ids=["module-level", "with-function-imports"])
def test_no_import_cycles(nested: bool) -> None:
    modules = package_modules()
    graph = {name: imports_of(name, path, modules, nested) for name, path in modules.items()}
    cycles = import_cycles(graph)
    unexpected = [c for c in cycles if c not in EXPECTED_CYCLES]
    assert not unexpected, "import cycles (move the shared code to a module both import): " + "; ".join(
        " <-> ".join(c) for c in unexpected
    )
    if not nested:
        stale = [c for c in EXPECTED_CYCLES if c not in cycles]
        assert not stale, f"these expected cycles are gone: remove them from EXPECTED_CYCLES: {stale}"
