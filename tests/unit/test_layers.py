"""The house's layering: app/ (domain) never imports the Serve shell (deployments/) or the lab
(bench/); deployments/ never imports bench/; no import cycles; small modules. (That the wheel
carries no benchmark code is checked with the Dockerfile: tests/unit/test_cluster_files.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

ABOVE = {"app": {"deployments", "bench", "tests"}, "deployments": {"bench", "tests"}}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer", sorted(ABOVE))
def test_no_layer_imports_one_above_it(layer):
    offenders = {str(p.relative_to(ROOT)): sorted(_imports(p) & ABOVE[layer])
                 for p in (ROOT / layer).rglob("*.py") if _imports(p) & ABOVE[layer]}
    assert not offenders, offenders


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _module_imports(path: Path, known: set[str]) -> set[str]:
    """Modules of this repo that `path` imports, anywhere in it (lazy imports count: a cycle through
    a function-level import is still a cycle a reader has to untangle)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n:
                out.add(n)
    return out


def test_no_import_cycles():
    files = [p for layer in ("app", "deployments", "bench") for p in (ROOT / layer).rglob("*.py")]
    known = {_module_name(p) for p in files}
    graph = {_module_name(p): _module_imports(p, known) - {_module_name(p)} for p in files}
    # A package's __init__ re-exporting its own submodules is not a cycle worth naming.
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not (d.startswith(name + ".") or name.startswith(d + ".") and
                                               d in graph and d == name.rpartition(".")[0])}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_modules_stay_small_and_the_model_server_stays_a_shell():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for layer in ("app", "deployments", "bench") for p in (ROOT / layer).rglob("*.py")}
    assert sizes["deployments/model_server.py"] <= 150
    assert not {p: n for p, n in sizes.items() if n > 400}
