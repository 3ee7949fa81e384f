"""One module per API area; each exposes a `routes` RouteTable."""

from __future__ import annotations

from aiohttp import web

from handlers import admin_features, admin_users, auth, dev, files, quota, service, tasks, users, ws
from server.keys import route_specs_key, settings_key
from server.routing import RouteTable, add_routes

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
]


def setup_routes(app: web.Application) -> None:
    tables = [*ROUTE_TABLES, *dev.route_tables(app[settings_key])]  # dev: only in dev/test
    app[route_specs_key] = add_routes(app, tables)
    service.setup(app)
