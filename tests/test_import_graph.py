"""The module import graph of ``fedpeft`` has no cycle, counting imports inside functions too: shared
pieces live in leaf modules (``fedpeft.seeding``, ``data/experiment.py``, ``metering/metric_values.py``,
``deploy/flower/node.py``) instead of being imported lazily to dodge a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "fedpeft").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _import_graph() -> dict[str, set[str]]:
    """Module -> fedpeft modules it imports anywhere in its body (``from a.b import c`` counts as a.b.c
    when that is a module, else a.b)."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedpeft"):
                targets = [resolve(f"{node.module}.{alias.name}") for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [resolve(alias.name) for alias in node.names if alias.name.startswith("fedpeft")]
            else:
                continue
            graph[module].update(t for t in targets if t and t != module)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_search_finds_a_planted_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_even_through_function_level_imports():
    graph = _import_graph()
    assert "fedpeft.federation.engine" in graph and graph["fedpeft.federation.engine"]  # the walk found imports
    assert _find_cycle(graph) is None


def test_the_formerly_cyclic_pairs_now_depend_one_way():
    graph = _import_graph()

    def imports(package: str, other: str) -> bool:
        return any(t == other or t.startswith(other + ".") for m, ts in graph.items()
                   if m == package or m.startswith(package + ".") for t in ts)

    assert imports("fedpeft.federation", "fedpeft.strategies") and not imports("fedpeft.strategies", "fedpeft.federation")
    assert imports("fedpeft.report", "fedpeft.metering") and not imports("fedpeft.metering", "fedpeft.report")
    assert imports("fedpeft.data.dataset", "fedpeft.data.builtin")
    assert not imports("fedpeft.data.builtin", "fedpeft.data.dataset")
    assert imports("fedpeft.deploy.flower.client_app", "fedpeft.deploy.flower.worker")
    assert not imports("fedpeft.deploy.flower.worker", "fedpeft.deploy.flower.client_app")
