"""The layout's rules, checked on the import graph (grimp, the engine of import-linter,
which `make lint` also runs with the contracts in setup.cfg)."""

from __future__ import annotations

import grimp

PACKAGES = ("server", "actors", "handlers")
# The actor runtime's modules refer to each other by design (an actor holds refs,
# the system makes actors); that package is the one place a cycle is allowed.
CYCLES_ALLOWED_IN = "actors.runtime"


def _graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, include_external_packages=False, cache_dir=None)


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    adjacency = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in sorted(graph.modules)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in adjacency[v]:
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
                found.append(sorted(component))

    for module in adjacency:
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_itself_back_outside_the_actor_runtime() -> None:
    """TYPE_CHECKING imports count: grimp reads every import statement."""
    cycles = [c for c in _cycles(_graph()) if not all(m.startswith(CYCLES_ALLOWED_IN) for m in c)]
    assert cycles == []


def test_the_cycle_check_finds_a_cycle_when_there_is_one() -> None:
    graph = _graph()
    graph.add_import(importer="server.errors", imported="server.db", line_number=1, line_contents="x")
    assert any("server.errors" in c and "server.db" in c for c in _cycles(graph))


def test_handlers_reach_capabilities_only_through_their_facades() -> None:
    """Handlers never talk to an actor, nor to a capability's SQL behind its facade."""
    graph = _graph()
    offending = [
        (handler, imported)
        for handler in sorted(graph.find_descendants("handlers") | {"handlers"})
        for imported in sorted(graph.find_modules_directly_imported_by(handler))
        if imported.startswith("actors")
    ]
    assert offending == []


def test_capability_modules_never_reach_into_the_app() -> None:
    """Only the composition root (server/app.py), the HTTP middleware and handlers read
    app state through server.keys; a capability gets what it needs passed in."""
    graph = _graph()
    allowed = {"server.app", "server.middleware", "server.routing", "server.auth.middleware"}
    importers = {
        m
        for m in graph.find_modules_that_directly_import("server.keys")
        if not m.startswith("handlers") and m not in allowed
    }
    assert importers == set()
