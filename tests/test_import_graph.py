"""No import cycle in ``mqa_gen``, lazy imports (inside functions) included.

The graph is read from the source with :mod:`ast`, never by importing. A module M has an edge to a
module N when running M (its top level or any of its functions) can make Python run or use N:

* **explicit** edges go to what an import statement names: ``import a.b.c`` → ``a.b.c``;
  ``from a.b import c`` → ``a.b.c`` when that is a module, else ``a.b`` (``c`` is then one of
  its attributes, so M needs ``a/b/__init__.py`` to have run); relative forms alike;
  ``importlib.import_module("a.b")`` → ``a.b``, and ``import_module(f"{__name__}.{x}")`` → every
  direct submodule of M's package (the CLI's lazily imported verbs).
* **implicit** edges go to the packages Python executes on the way: importing ``a.b.c`` first runs
  ``a/__init__.py`` and ``a/b/__init__.py``. Such an edge is left out when that package is M itself
  or one of M's own parent packages: M is running, so they have started already and the import
  does not run them again (``kernels/__init__`` importing ``kernels.attention``, which lives in it,
  is ordinary package loading, not a cycle).

Imports under ``if TYPE_CHECKING:`` never run and are left out. A cycle is a cycle of these edges.
Each module is its own test case, so every cycle shows, each with the import sites along it.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "mqa_gen"


@dataclass
class ImportGraph:
    """``edges[m][n]`` = where m imports n (``"path:line"``, first site); ``unresolved`` lists import
    sites of the package that name no module or attribute this walk can place."""

    modules: dict[str, Path]
    packages: set[str]
    edges: dict[str, dict[str, str]] = field(default_factory=dict)
    unresolved: list[str] = field(default_factory=list)


def _module_files(root: Path, package: str) -> tuple[dict[str, Path], set[str]]:
    modules, packages = {}, set()
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
            packages.add(".".join(parts))
        modules[".".join(parts)] = path
    return modules, packages


def _parents(name: str) -> list[str]:
    """``"a.b.c"`` → ``["a", "a.b"]``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (their ``else`` is kept)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(reversed(node.orelse))
            continue
        stack.extend(reversed(list(ast.iter_child_nodes(node))))  # reversed: visited in source order


def import_graph(root: Path, package: str) -> ImportGraph:
    """The import graph of every module of ``package`` (a folder under ``root``), per the module doc."""
    modules, packages = _module_files(root, package)
    graph = ImportGraph(modules, packages)
    for name, path in modules.items():
        own_package = name if name in packages else name.rpartition(".")[0]
        started = {name, *_parents(name)}  # already running whenever `name` runs
        out: dict[str, str] = {}
        graph.edges[name] = out

        def add(target: str, line: int, explicit: bool) -> None:
            if target != name and (explicit or target not in started):
                out.setdefault(target, f"{path.relative_to(root)}:{line}")

        def place(target: str, line: int) -> None:
            """Edges for running ``target``: its parent packages (implicit), then itself."""
            for parent in _parents(target):
                if parent in modules:
                    add(parent, line, explicit=False)
            if target in modules:
                add(target, line, explicit=True)
            else:
                graph.unresolved.append(f"{path.relative_to(root)}:{line} {target}")

        def ours(target: str) -> bool:
            return target == package or target.startswith(package + ".")

        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if ours(alias.name):
                        place(alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = own_package.split(".")[: len(own_package.split(".")) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                if not ours(base):
                    continue
                submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                attributes = len(submodules) < len(node.names)  # names (or *) defined in `base` itself
                for parent in _parents(base):
                    if parent in modules:
                        add(parent, node.lineno, explicit=False)
                if base in modules:
                    add(base, node.lineno, explicit=attributes)
                else:
                    graph.unresolved.append(f"{path.relative_to(root)}:{node.lineno} {base}")
                for sub in submodules:
                    add(sub, node.lineno, explicit=True)
            elif isinstance(node, ast.Call) and _is_import_module(node.func):
                for target in _dynamic_targets(node, name, own_package, modules):
                    if target is None:
                        graph.unresolved.append(f"{path.relative_to(root)}:{node.lineno} "
                                                f"import_module({ast.unparse(node.args[0]) if node.args else ''})")
                    elif ours(target):
                        place(target, node.lineno)
    return graph


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module")


def _dynamic_targets(call: ast.Call, name: str, own_package: str, modules: dict[str, Path]) -> list[str | None]:
    """What ``import_module(arg)`` may import: a literal name, or for ``f"{__name__}.{x}"`` every
    direct submodule of the package ``__name__`` names; ``[None]`` when the argument is neither."""
    if not call.args:
        return [None]
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith("."):
        return [arg.value]
    if (isinstance(arg, ast.JoinedStr) and len(arg.values) >= 2
            and isinstance(arg.values[0], ast.FormattedValue)
            and isinstance(arg.values[0].value, ast.Name) and arg.values[0].value.id in ("__name__", "__package__")
            and isinstance(arg.values[1], ast.Constant) and str(arg.values[1].value).startswith(".")):
        base = name if arg.values[0].value.id == "__name__" else own_package
        return [m for m in modules if m.rpartition(".")[0] == base]
    return [None]


def shortest_cycle(graph: ImportGraph, start: str) -> list[str] | None:
    """The shortest import path from ``start`` back to itself (``[start, …, start]``), or None."""
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph.edges.get(node, {})):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if nxt not in previous:
                previous[nxt] = node
                queue.append(nxt)
    return None


def describe(graph: ImportGraph, cycle: list[str]) -> str:
    return "\n".join(f"  {a} → {b}   ({graph.edges[a][b]})" for a, b in zip(cycle, cycle[1:]))


GRAPH = import_graph(ROOT, PACKAGE)


def test_the_walk_sees_the_package():
    """Guards against a vacuous pass: the walk finds every kind of edge on real modules."""
    edges = GRAPH.edges
    assert len(GRAPH.modules) > 30
    assert "mqa_gen.gguf_tokenizer" in edges["mqa_gen.tokenizer"]  # top level, relative
    assert "mqa_gen.layer" in edges["mqa_gen"]  # `from . import layer` inside __getattr__
    assert "mqa_gen.cli.generate" in edges["mqa_gen.cli"]  # import_module(f"{__name__}.{module}")
    assert GRAPH.unresolved == []


@pytest.mark.parametrize("module", sorted(GRAPH.modules))
def test_module_is_in_no_import_cycle(module):
    cycle = shortest_cycle(GRAPH, module)
    if cycle is not None:
        pytest.fail(f"import cycle through {module}:\n{describe(GRAPH, cycle)}", pytrace=False)


# ───────────────────────────── the rules, on a package made for them ─────────────────────────────


def write_package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def cycles(graph: ImportGraph) -> set[tuple[str, ...]]:
    found = set()
    for m in graph.modules:
        cycle = shortest_cycle(graph, m)
        if cycle:
            i = cycle.index(min(cycle[:-1]))  # one rotation per cycle
            found.add(tuple(cycle[i:-1] + cycle[:i]))
    return found


def test_package_loading_is_not_a_cycle(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "def __getattr__(n):\n    from . import a\n    return a\n",
        "pkg/a.py": "from . import b\nfrom .sub import x\n",
        "pkg/b.py": "import pkg.sub.y\n",
        "pkg/sub/__init__.py": "from .x import f\nfrom . import y\n",
        "pkg/sub/x.py": "from . import y\nfrom .. import leaf\ndef f(): pass\n",
        "pkg/leaf.py": "",
        "pkg/sub/y.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph.edges["pkg"] == {"pkg.a": "pkg/__init__.py:2"}
    assert set(graph.edges["pkg.a"]) == {"pkg.b", "pkg.sub", "pkg.sub.x"}  # pkg.sub runs first: implicit
    assert set(graph.edges["pkg.sub"]) == {"pkg.sub.x", "pkg.sub.y"}
    assert set(graph.edges["pkg.sub.x"]) == {"pkg.sub.y", "pkg.leaf"}  # a submodule: no edge to pkg
    assert set(graph.edges["pkg.b"]) == {"pkg.sub", "pkg.sub.y"}
    assert graph.edges["pkg.sub.y"] == {}  # TYPE_CHECKING imports never run
    assert cycles(graph) == set() and graph.unresolved == []


def test_real_cycles_are_found(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f():\n    from .b import g\n",  # lazy
        "pkg/b.py": "from .a import f\ndef g(): pass\n",
        "pkg/k/__init__.py": "SETTING = 1\nfrom .w import h\nfrom pkg import c\n",
        "pkg/k/w.py": "from . import SETTING\ndef h(): pass\n",  # uses the package's own attribute
        "pkg/k/q.py": "",
        "pkg/c.py": "import pkg.k.q\n",  # runs pkg/k/__init__ first, which imports c
        "pkg/k/z.py": "",
        "pkg/cli/__init__.py": "import importlib\ndef get(v):\n    return importlib.import_module(f'{__name__}.{v}')\n",
        "pkg/cli/run.py": "from pkg import c\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert set(graph.edges["pkg.cli"]) == {"pkg.cli.run"}
    assert cycles(graph) == {("pkg.a", "pkg.b"), ("pkg.k", "pkg.k.w"), ("pkg.c", "pkg.k")}
    assert describe(graph, shortest_cycle(graph, "pkg.a")) == ("  pkg.a → pkg.b   (pkg/a.py:2)\n"
                                                               "  pkg.b → pkg.a   (pkg/b.py:1)")


def test_unplaceable_imports_are_reported(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "import importlib\nimport pkg.missing\nimportlib.import_module(name_from_somewhere)\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph.unresolved == ["pkg/a.py:2 pkg.missing", "pkg/a.py:3 import_module(name_from_somewhere)"]
