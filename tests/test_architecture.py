"""The repository's structural rules, checked on the source text (nothing is imported):

* no module of fastalign/ imports another in a cycle -- counting every import statement in a
  file, at top level or inside a function (a late import hides a cycle from Python, not from a
  reader), except those under `if TYPE_CHECKING:`, which never run -- and the subpackages are
  layers: no cycle either when each subpackage (fastalign.trainer, fastalign.algorithms, ...)
  counts as one node (the trainer may run algorithms; algorithms must not reach back into it);
* no source file in fastalign/ or csrc/ is over MAX_LINES lines (one purpose per file);
* no file refers to a path outside the repository (users have only the repository).

Edges: `import a.b` is an edge to the module a.b; `from a import n` is an edge to a.n when that
is a module, else to a (the package's __init__). Importing a.b also runs a/__init__.py, but that
parent edge is not counted: a package importing its own submodules is how packages are built,
and counting it would make every submodule's import of a sibling a cycle through the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fastalign"
MAX_LINES = 400
SOURCE_SUFFIXES = {".py", ".cpp", ".cu", ".h", ".cuh"}
GENERATED = {"fastalign/_build_info.py"}  # written by setup.py


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom in the tree, skipping the bodies of `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str, modules) -> str | None:
    """The most specific fastalign module that `name` names (None outside fastalign)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _edges(module: str, path: Path, modules) -> dict[str, int]:
    """{imported fastalign module: first line importing it}."""
    is_package = path.name == "__init__.py"
    out: dict[str, int] = {}
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from the package containing this module
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                targets.append(full if full in modules else base)
        for t in targets:
            m = _resolve(t, modules)
            if m is not None and m != module:
                out.setdefault(m, node.lineno)
    return out


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _a_cycle(graph, component) -> list[str]:
    """One concrete cycle inside a strongly connected component, for the error message."""
    comp = set(component)
    start = component[0]
    path, seen = [start], {start}
    while True:
        nxt = next(w for w in sorted(graph[path[-1]]) if w in comp)
        if nxt in seen:
            return path[path.index(nxt):] + [nxt]
        path.append(nxt)
        seen.add(nxt)


def test_import_graph_has_no_cycles():
    modules = _modules()
    graph = {m: _edges(m, p, modules) for m, p in modules.items()}
    problems = []
    for comp in _cycles(graph):
        cyc = _a_cycle(graph, comp)
        steps = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in zip(cyc, cyc[1:])]
        problems.append(f"cycle among {comp}:\n    " + "\n    ".join(steps))
    assert not problems, "import cycles in fastalign/:\n" + "\n".join(problems)


def test_subpackages_are_layers():
    modules = _modules()
    graph = {m: _edges(m, p, modules) for m, p in modules.items()}

    def layer(m):  # fastalign.a.b -> fastalign.a when fastalign.a is a package
        parts = m.split(".")
        return ".".join(parts[:2]) if len(parts) > 2 else m

    layers: dict[str, dict[str, int]] = {}
    where: dict[tuple, str] = {}
    for m, out in graph.items():
        for t, line in out.items():
            a, b = layer(m), layer(t)
            if a != b:
                layers.setdefault(a, {}).setdefault(b, line)
                where.setdefault((a, b), f"{m}:{line} imports {t}")
            layers.setdefault(b, {})
    problems = []
    for comp in _cycles(layers):
        cyc = _a_cycle(layers, comp)
        problems.append(" -> ".join(cyc) + "\n    " + "\n    ".join(where[(a, b)] for a, b in zip(cyc, cyc[1:])))
    assert not problems, "subpackages importing each other in a cycle:\n" + "\n".join(problems)


def test_cycle_checker_finds_a_late_import_cycle(tmp_path):
    # the checker itself: a cycle closed by an import inside a function is found; one under
    # TYPE_CHECKING is not an edge
    src = {
        "a": "import fastalign.b\n",
        "b": "def f():\n    from fastalign import a\n",
        "c": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import fastalign.a\n",
    }
    modules = {f"fastalign.{k}": tmp_path / f"{k}.py" for k in src}
    for k, text in src.items():
        (tmp_path / f"{k}.py").write_text(text)
    graph = {m: _edges(m, p, modules) for m, p in modules.items()}
    assert graph["fastalign.c"] == {}
    assert _cycles(graph) == [["fastalign.a", "fastalign.b"]]


def test_no_source_file_is_too_long():
    too_long = []
    for top in ("fastalign", "csrc"):
        for p in sorted((ROOT / top).rglob("*")):
            rel = p.relative_to(ROOT).as_posix()
            if p.suffix in SOURCE_SUFFIXES and p.is_file() and rel not in GENERATED:
                n = len(p.read_text().splitlines())
                if n > MAX_LINES:
                    too_long.append(f"{rel}: {n} lines")
    assert not too_long, f"files over {MAX_LINES} lines (split them by purpose):\n" + "\n".join(too_long)


def test_nothing_points_outside_the_repository():
    offenders = []
    for top in ("fastalign", "csrc", "docs", "README.md", "scripts", "benchmarks"):
        base = ROOT / top
        files = [base] if base.is_file() else sorted(base.rglob("*"))
        for p in files:
            if p.is_file() and p.suffix in SOURCE_SUFFIXES | {".md", ".sh", ".yaml", ".txt"}:
                for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
                    if "../shared" in line or "DESIGN.md" in line:
                        offenders.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "references to files users do not have:\n" + "\n".join(offenders)
