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


# What a handler may import from server/ (docs/architecture.md "What a handler imports"):
# the HTTP layer's infrastructure, and per capability only its entry point (the package,
# whose __init__ names it, or its facade module) and its schemas (the wire shapes).
HANDLER_INFRASTRUCTURE = {
    "server",  # __version__
    "server.config",  # Settings (which routes a deployment registers)
    "server.errors",
    "server.keys",
    "server.openapi",
    "server.paging",
    "server.routing",
    "server.templates",
    "server.timing",
}
ENTRY_POINT_MODULES = ("facade", "schemas")


def _handler_may_import(graph: grimp.ImportGraph, module: str) -> bool:
    if not module.startswith("server.") or module in HANDLER_INFRASTRUCTURE:
        return True  # another handler, or infrastructure of the HTTP layer
    _, capability, *rest = module.split(".")
    package = f"server.{capability}"
    if not graph.find_children(package):
        return False  # a loose module of server/ (db, redis, figures…): not for handlers
    return rest == [] or (len(rest) == 1 and rest[0] in ENTRY_POINT_MODULES)


def _handler_imports_outside_the_allow_list(graph: grimp.ImportGraph) -> set[tuple[str, str]]:
    return {
        (handler, imported)
        for handler in graph.find_descendants("handlers") | {"handlers"}
        for imported in graph.find_modules_directly_imported_by(handler)
        if not _handler_may_import(graph, imported)
    }


def test_handlers_import_only_entry_points_schemas_and_infrastructure() -> None:
    """A handler calls a capability's entry point with its schemas; anything else it
    needs, the entry point offers (a method or a re-export)."""
    offending = _handler_imports_outside_the_allow_list(_graph())
    listed = "\n".join(f"{handler} imports {imported}" for handler, imported in sorted(offending))
    assert not listed, f"handlers importing outside the allow-list:\n{listed}"


def test_the_allow_list_check_finds_an_import_of_a_capability_internal() -> None:
    graph = _graph()
    for internal in ("server.media.assets", "server.auth.middleware", "server.db", "server.media.storage"):
        graph.add_import(importer="handlers.tasks", imported=internal, line_number=1, line_contents="x")
    for allowed in ("server.tasks.facade", "server.auth", "server.auth.schemas", "server.paging"):
        graph.add_import(importer="handlers.tasks", imported=allowed, line_number=1, line_contents="x")
    found = {imported for handler, imported in _handler_imports_outside_the_allow_list(graph)}
    assert {"server.media.assets", "server.auth.middleware", "server.db", "server.media.storage"} <= found
    assert found.isdisjoint({"server.tasks.facade", "server.auth", "server.auth.schemas", "server.paging"})
