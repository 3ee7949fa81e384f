"""One module per API area; each exposes a `routes` RouteTable."""

from __future__ import annotations

from aiohttp import web

from handlers import (
    admin_features,
    admin_users,
    admin_vendors,
    auth,
    credits,
    demo,
    dev,
    distributors,
    files,
    ops,
    payments,
    system,
    tasks,
    users,
    ws,
)
from server.keys import settings_key
from server.routing import RouteTable, add_routes
from server.templates import setup_templates

ROUTE_TABLES: list[RouteTable] = [
    system.routes,
    files.routes,
    auth.routes,
    users.routes,
    admin_users.routes,
    credits.routes,
    credits.admin_routes,
    ws.routes,
    tasks.public,
    tasks.routes,
    admin_features.routes,
    admin_vendors.routes,
    ops.routes,
    payments.public,
    payments.routes,
    payments.admin_routes,
    distributors.routes,
    distributors.admin_routes,
    distributors.pii_routes,
]


def setup_routes(app: web.Application) -> None:
    settings = app[settings_key]
    tables = [*ROUTE_TABLES, *dev.route_tables(settings), *demo.route_tables(settings)]  # only in dev/test
    system.setup(app, add_routes(app, tables))
    setup_templates(app)  # the one Jinja2 environment (ROOT/templates), for /ops and others
    ops.setup(app)
