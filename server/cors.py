"""CORS for the JSON API, through aiohttp-cors (issue 10).

A web front end on its own origin (app.example.com calling api.example.com) may call
every `/api/` route once its origin is in CORS_ALLOWED_ORIGINS; nothing is allowed by
default. aiohttp-cors answers the preflights (OPTIONS, 200 or 403) and adds the headers
to the answers of the other methods, error envelopes included. The WebSocket is left
out: browsers do not preflight it, and it checks WS_ALLOWED_ORIGINS itself.
"""

from __future__ import annotations

import aiohttp_cors
from aiohttp import web

from server.routing import route_spec_of

# What a page may send beyond the CORS-safelisted headers, and what it may read back.
ALLOW_HEADERS = ("Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID")
EXPOSE_HEADERS = ("X-Request-ID", "Retry-After")
PREFIX = "/api/"


def allowed_origins(setting: str) -> list[str]:
    """CORS_ALLOWED_ORIGINS as origins the way browsers send them (lower case, no slash)."""
    return [o.strip().rstrip("/").lower() for o in setting.split(",") if o.strip()]


def setup_cors(app: web.Application, origins: list[str]) -> None:
    """Enable CORS on every `/api/` route declared so far, except protocol switches."""
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]  # aiohttp-cors 0.8 is untyped
        allow_headers=ALLOW_HEADERS, expose_headers=EXPOSE_HEADERS
    )
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in origins})
    for route in list(app.router.routes()):
        spec = route_spec_of(route.handler)
        if spec is not None and spec.path.startswith(PREFIX) and spec.status != 101:
            cors.add(route)
