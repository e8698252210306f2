"""The package's layering, read statically (ast) from every module of fedtina/, server/ and clients/, imports inside
functions and under TYPE_CHECKING included: no import cycle; no experiment imports another (the harness aside); no
library layer imports an app layer (the methods, the experiments, the ServerApp or the ClientApp)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedtina", "server", "clients")
LIBRARY = tuple(f"fedtina.{p}" for p in ("data", "features", "zoo", "tina", "server", "client", "adversary",
                                         "runtime", "report"))
APPS = ("fedtina.methods", "fedtina.experiments", "server", "clients")
HARNESS = "fedtina.experiments.harness"


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the packages (a package is its __init__.py)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, source: str, known: set[str], is_package: bool = False) -> set[str]:
    """The modules of `known` that module `name` imports anywhere in `source`: `from a import b` is module a.b when
    that is one, else a; `import a.b.c` is the deepest of a.b.c, a.b, a that is known."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: from the module's package, `level - 1` packages up
                pkg = name.split(".")[: None if is_package else -1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {n: imports(n, p.read_text(), set(mods), p.name == "__init__.py") for n, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) per strongly connected component of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return [_cycle_in(g, set(c), c[0]) for c in comps]


def _cycle_in(g: dict[str, set[str]], comp: set[str], start: str) -> list[str]:
    """A shortest path start -> ... -> start inside one component (breadth first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(g[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in no cycle of {sorted(comp)}")


def _inside(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_cycle_finder_names_each_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}}
    assert cycles(g) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_are_resolved_to_modules_also_inside_functions():
    known = {"pkg", "pkg.sub", "pkg.sub.mod", "pkg.other"}
    src = ("import os\nfrom pkg.sub import mod\nfrom pkg import thing\n"
           "def f():\n    from . import other\n    import pkg.sub.missing\n")
    assert imports("pkg.mine", src, known) == {"pkg.sub.mod", "pkg", "pkg.other", "pkg.sub"}
    assert imports("pkg.sub", "from .mod import x\n", known, is_package=True) == {"pkg.sub.mod"}


def test_no_import_cycle():
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in found)


def test_experiments_do_not_import_one_another():
    bad = [f"{m} imports {t}" for m, ts in graph().items() if _inside(m, ("fedtina.experiments",))
           for t in sorted(ts) if t.startswith("fedtina.experiments.") and t != HARNESS]
    assert not bad, "experiments import one another (only the harness is shared):\n  " + "\n  ".join(bad)


def test_library_layers_do_not_import_the_apps():
    bad = [f"{m} imports {t}" for m, ts in graph().items() if _inside(m, LIBRARY)
           for t in sorted(ts) if _inside(t, APPS)]
    assert not bad, "a library layer imports an app layer:\n  " + "\n  ".join(bad)
