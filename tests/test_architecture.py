"""The floors of the package and what each may import (docs/architecture.md).

Imports are read from the source with ``ast``, at module level and inside
functions alike (a lazy import is a dependency too); only imports under
``if TYPE_CHECKING:`` are left out, as they never run.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fixedram"
# format/ is a pure codec: bytes in, structures out; no threads, processes or devices.
IMPURE = {"threading", "subprocess", "fcntl", "socket", "selectors", "mmap", "termios"}


def _module(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:``."""
    out: list[ast.AST] = []
    stack = [tree]
    while stack:
        n = stack.pop()
        if isinstance(n, ast.If) and isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING":
            stack.extend(n.orelse)
            continue
        out.append(n)
        stack.extend(ast.iter_child_nodes(n))
    return out


def imports() -> dict[str, set[str]]:
    """Module -> the modules it imports (absolute names; fixedram's and others')."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in SRC.rglob("*.py"):
        mod = _module(path)
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for n in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(n, ast.Import):
                graph[mod].update(a.name for a in n.names)
            elif isinstance(n, ast.ImportFrom):
                if n.level:
                    base = pkg.split(".")
                    base = base[:len(base) - n.level + 1]
                    target = ".".join(base + ([n.module] if n.module else []))
                else:
                    target = n.module or ""
                graph[mod].add(target)
                for a in n.names:  # `from . import x` names a module
                    if (SRC.parent / Path(*f"{target}.{a.name}".split("."))).with_suffix(
                            ".py").exists():
                        graph[mod].add(f"{target}.{a.name}")
        graph.setdefault(mod, set())
    return graph


def _floor(mod: str) -> str:
    """The package a module belongs to: fixedram.format, fixedram.io, ... or the
    top-level module itself (fixedram.save, fixedram.errors)."""
    parts = mod.split(".")
    return ".".join(parts[:2])


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state, path = [], {}, []

    def visit(v: str) -> None:
        state[v] = 1
        path.append(v)
        for w in sorted(edges.get(v, ())):
            if state.get(w) == 1:
                found.append([*path[path.index(w):], w])
            elif w not in state:
                visit(w)
        path.pop()
        state[v] = 2

    for v in sorted(edges):
        if v not in state:
            visit(v)
    return found


def test_format_is_a_pure_codec() -> None:
    bad = {m: sorted(i.split(".")[0] for i in deps if i.split(".")[0] in IMPURE)
           for m, deps in imports().items() if m.startswith("fixedram.format")}
    assert {m: v for m, v in bad.items() if v} == {}


def test_no_cycle_between_packages() -> None:
    edges: dict[str, set[str]] = defaultdict(set)
    for m, deps in imports().items():
        for d in deps:
            if d.startswith("fixedram.") and _floor(d) != _floor(m) and _floor(m) != "fixedram":
                edges[_floor(m)].add(_floor(d))
    assert _cycles(edges) == []


def test_no_cycle_inside_format() -> None:
    g = imports()
    edges = {m: {d for d in deps if d.startswith("fixedram.format.") and d in g}
             for m, deps in g.items() if m.startswith("fixedram.format.")}
    assert _cycles(edges) == []


def test_layering_rules() -> None:
    g = imports()

    def uses(prefix: str, target: str) -> list[str]:
        return sorted(m for m, deps in g.items() if m.startswith(prefix)
                      and any(d == target or d.startswith(target + ".") for d in deps))

    assert uses("fixedram.tools", "fixedram.bridge") == []
    assert uses("fixedram.tools", "fixedram.engine") == []
    assert uses("fixedram.memory", "fixedram.tools") == []
    assert uses("fixedram.format", "fixedram.memory") == []
    assert uses("fixedram.io", "fixedram.format") == []


def test_cli_opens_saves_one_way() -> None:
    """The command line opens every save with open_save: no reader class of its own."""
    bad = []
    for path in (SRC / "cli").glob("*.py"):
        text = path.read_text()
        for name in ("MigrationFile", "OnePassFile", "open_sequential", "seekable_path",
                     "is_one_pass"):
            if name in text:
                bad.append(f"{path.name}: {name}")
    assert bad == []


def test_no_arg_type_ignores() -> None:
    hits = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if "type: ignore[arg-type]" in line]
    assert hits == []
