"""One module per API area; each exposes a `routes` RouteTable."""

from __future__ import annotations

from aiohttp import web

from handlers import (
    admin_features,
    admin_users,
    auth,
    demo,
    dev,
    files,
    ops,
    payments,
    quota,
    service,
    tasks,
    users,
    ws,
)
from server.keys import route_specs_key, settings_key
from server.routing import RouteTable, add_routes
from server.templates import setup_templates

ROUTE_TABLES: list[RouteTable] = [
    service.routes,
    files.routes,
    auth.routes,
    users.routes,
    admin_users.routes,
    quota.routes,
    quota.admin_routes,
    ws.routes,
    tasks.public,
    tasks.routes,
    admin_features.routes,
    ops.routes,
    payments.public,
    payments.routes,
    payments.admin_routes,
]


def setup_routes(app: web.Application) -> None:
    settings = app[settings_key]
    tables = [*ROUTE_TABLES, *dev.route_tables(settings), *demo.route_tables(settings)]  # only in dev/test
    app[route_specs_key] = add_routes(app, tables)
    service.setup(app)
    setup_templates(app)  # the one Jinja2 environment (ROOT/templates), for /ops and others
    ops.setup(app)
