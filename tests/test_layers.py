"""No import cycles among overstory's modules, lazy (function-level) imports included.

``lint-imports`` (``[tool.importlinter]`` in pyproject.toml) checks that the layers point
one way; a cycle inside one layer (two domain modules, say) is not a layer violation,
so this test looks for cycles between any two modules, on the graph import-linter
builds (grimp: every ``import`` statement, at any depth of a function). Imports under
``if TYPE_CHECKING:`` never run and are left out here (the layers contract still counts
them). A failure prints each cycle with its import lines.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Mapping, Set

import grimp
import pytest


def strongly_connected(edges: Mapping[str, Set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one node (each a cycle or
    several), each sorted, in a stable order (Tarjan's algorithm, without recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, targets = work[-1]
            advanced = False
            for target in targets:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(edges.get(target, ())))))
                    advanced = True
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def a_cycle(edges: Mapping[str, Set[str]], component: list[str]) -> list[str]:
    """One shortest cycle through the component's first module, as a path that ends
    where it starts."""
    start, inside = component[0], set(component)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for target in sorted(edges.get(node, ())):
            if target == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, start]
            if target in inside and target not in came_from:
                came_from[target] = node
                queue.append(target)
    raise AssertionError(f"no cycle through {start} in {component}")


def import_edges(graph: grimp.ImportGraph) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for module in graph.modules:
        imported = graph.find_modules_directly_imported_by(module)
        edges[module] = set(imported)
    return edges


def describe(graph: grimp.ImportGraph, path: list[str]) -> str:
    lines = []
    for importer, imported in itertools.pairwise(path):
        details = graph.get_import_details(importer=importer, imported=imported)
        where = "; ".join(f"l.{d['line_number']}: {d['line_contents']}" for d in details)
        lines.append(f"  {importer} -> {imported}  ({where})")
    return "\n".join(lines)


def test_the_cycle_finder_finds_cycles_and_only_cycles() -> None:
    edges = {
        "a": {"b"},
        "b": {"c"},
        "c": {"a", "d"},  # a -> b -> c -> a
        "d": {"e"},
        "e": {"d"},  # d <-> e
        "f": {"a"},  # leads into a cycle, is in none
    }
    components = strongly_connected(edges)
    assert components == [["a", "b", "c"], ["d", "e"]]
    assert a_cycle(edges, components[0]) == ["a", "b", "c", "a"]
    assert a_cycle(edges, components[1]) == ["d", "e", "d"]
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": set()}) == []


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("overstory", exclude_type_checking_imports=True, cache_dir=None)


def test_the_graph_counts_lazy_imports(graph: grimp.ImportGraph) -> None:
    # overstory/app.py imports the provider pool inside a function only: if the graph
    # missed function-level imports, cycles through them would go unseen.
    details = graph.get_import_details(
        importer="overstory.app", imported="overstory.providers.pool"
    )
    assert details, "overstory.app's lazy import of overstory.providers.pool is not in the graph"
    assert details[0]["line_contents"].startswith("from .providers.pool import")


def test_no_import_cycles_in_overstory(graph: grimp.ImportGraph) -> None:
    edges = import_edges(graph)
    components = strongly_connected(edges)
    report = "\n\n".join(
        f"{len(c)} modules import each other: {', '.join(c)}\n" + describe(graph, a_cycle(edges, c))
        for c in components
    )
    assert not components, f"import cycles in overstory:\n\n{report}"
