"""The package layout is a picture of the design: the import graph of src/dcdit, lazy imports included.

Read with ``ast`` (nothing is imported), so an import hidden inside a function
counts as much as one at the top of a module: a cycle is a cycle whenever it is
taken. ``from dcdit.a import b`` is an edge to ``dcdit.a.b`` when that is a
module, else to ``dcdit.a``; importing ``dcdit.a.b`` from outside ``dcdit.a``
is also an edge to the package ``dcdit.a`` (its ``__init__`` runs first).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dcdit

SRC = Path(dcdit.__file__).resolve().parent


def module_name(path: Path, root: Path = SRC) -> str:
    parts = ("dcdit",) + path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = SRC) -> dict[str, dict[str, list[int]]]:
    """module -> {imported dcdit module -> line numbers}, every import statement in the file (lazy ones too)."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, dict[str, list[int]]] = {}
    for name, path in modules.items():
        edges: dict[str, list[int]] = {}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import dcdit.a.b.c` of a name: its module
                    target = target.rpartition(".")[0]
                if target.startswith("dcdit") and target != name:
                    edges.setdefault(target, []).append(node.lineno)
                # importing dcdit.a.b from outside dcdit.a runs dcdit/a/__init__.py first
                parts = target.split(".")
                for k in range(2, len(parts)):
                    parent = ".".join(parts[:k])
                    if not (name + ".").startswith(parent + "."):
                        edges.setdefault(parent, []).append(node.lineno)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, dict]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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


def reachable(graph: dict[str, dict], start: str) -> dict[str, str]:
    """Every module reachable from ``start``, each with the module that first reached it."""
    seen = {start: ""}
    todo = [start]
    while todo:
        v = todo.pop()
        for w in graph.get(v, {}):
            if w not in seen:
                seen[w] = v
                todo.append(w)
    return seen


def path_to(seen: dict[str, str], target: str) -> str:
    chain = [target]
    while seen[chain[-1]]:
        chain.append(seen[chain[-1]])
    return " -> ".join(reversed(chain))


def test_graph_reader_sees_lazy_and_relative_imports(tmp_path):
    """The reader itself: a function-local import is an edge, `from pkg import mod` reaches the module."""
    pkg = tmp_path / "dcdit"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("from .core import thing\n")
    (pkg / "low" / "core.py").write_text("def thing():\n    from dcdit import high\n    return high\n")
    (pkg / "high.py").write_text("from dcdit.low import core\nimport dcdit.low.core as c\n")
    g = import_graph(pkg)
    assert g["dcdit.low.core"] == {"dcdit.high": [2]}
    assert g["dcdit.high"] == {"dcdit.low.core": [1, 2], "dcdit.low": [1, 2]}
    assert g["dcdit.low"] == {"dcdit.low.core": [1]}
    assert find_cycles(g) == [["dcdit.high", "dcdit.low", "dcdit.low.core"]]


def test_no_import_cycle():
    """No two modules of dcdit import each other, directly or round a loop, at module level or lazily."""
    cycles = find_cycles(import_graph())
    assert cycles == [], "import cycles (lazy imports included): " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("low", ["dcdit.checkpoint", "dcdit.models", "dcdit.models.dit", "dcdit.models.dcdit",
                                 "dcdit.models.factory", "dcdit.models.layers", "dcdit.chunking",
                                 "dcdit.attention", "dcdit.diffusion", "dcdit.utils"])
def test_low_floors_never_reach_up(low):
    """The checkpoint reader, the models and what they stand on never reach training, sampling, evaluation,
    the CLI, or the training objective (diffusion losses), by any chain of imports."""
    seen = reachable(import_graph(), low)
    up = ("dcdit.training", "dcdit.sampling", "dcdit.evaluation", "dcdit.cli", "dcdit.demo")
    bad = sorted(m for m in seen if m.startswith(up) or m == "dcdit.diffusion.losses" and low.startswith(
        ("dcdit.models", "dcdit.chunking", "dcdit.attention")))
    assert not bad, f"{low} reaches up: " + "; ".join(path_to(seen, m) for m in bad)


def test_models_never_import_the_objective_or_training():
    """dcdit.models imports neither dcdit.training nor dcdit.diffusion (the objective lives there)."""
    graph = import_graph()
    bad = [(m, t, lines) for m, edges in graph.items() if m.startswith("dcdit.models")
           for t, lines in edges.items() if t.startswith(("dcdit.training", "dcdit.diffusion"))]
    assert not bad, f"models import training / the diffusion objective: {bad}"
