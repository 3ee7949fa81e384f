"""One module per API area; each exposes a `routes` RouteTable."""

from __future__ import annotations

from aiohttp import web

from handlers import service
from server.keys import route_specs_key
from server.routing import RouteTable, add_routes

ROUTE_TABLES: list[RouteTable] = [service.routes]


def setup_routes(app: web.Application) -> None:
    app[route_specs_key] = add_routes(app, ROUTE_TABLES)
    service.setup(app)
