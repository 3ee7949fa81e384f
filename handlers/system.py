"""Service endpoints: health, readiness, metrics, API docs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import swagger_ui
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from server import __version__
from server.errors import ErrorCode, NotFound
from server.keys import (
    db_key,
    metrics_key,
    migrator_key,
    openapi_key,
    redis_key,
    settings_key,
)
from server.openapi import build_spec
from server.routing import RouteSpec, RouteTable, json_response

routes = RouteTable(tags=["service"], auth="public")

SWAGGER_DIR = Path(swagger_ui.__file__).parent / "static"
# The files Swagger UI ships (one flat directory), by name: only these are served.
SWAGGER_FILES = {p.name: p for p in SWAGGER_DIR.iterdir() if p.is_file()}
READY_TIMEOUT_S = 2.0

DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Wardrobe Server API</title>
<link rel="stylesheet" href="/api/docs/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/api/docs/static/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({url: "/api/openapi.json", dom_id: "#swagger-ui",
  deepLinking: true, persistAuthorization: true});
</script></body></html>
"""


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    checks: dict[str, str]


@routes.get("/healthz", response=Health)
async def healthz(request: web.Request) -> Health:
    """Liveness: 200 while the process serves."""
    return Health(status="ok")


@routes.get("/readyz", response=Readiness, extra_responses={503: "Not ready; `checks` names what failed"})
async def readyz(request: web.Request) -> web.Response:
    """Readiness: MySQL and Redis answer and no migration is pending."""
    checks: dict[str, str] = {}

    async def check(name: str, coro: Any) -> None:
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                result = await coro
            checks[name] = result if isinstance(result, str) else "ok"
        except Exception as exc:  # any failure makes the instance unready, with its reason
            checks[name] = f"failed: {type(exc).__name__}: {exc}"[:200]

    async def migrations() -> str:
        pending = await request.app[migrator_key].pending()
        if pending:
            raise RuntimeError("pending: " + ", ".join(m.path.name for m in pending))
        return "ok"

    await asyncio.gather(
        check("db", request.app[db_key].ping()),
        check("redis", request.app[redis_key].ping()),
        check("migrations", migrations()),
    )
    ok = all(v == "ok" for v in checks.values())
    return json_response({"status": "ok" if ok else "unavailable", "checks": checks}, 200 if ok else 503)


@routes.get("/metrics", content_type="text/plain", summary="Prometheus metrics (text format 0.0.4)")
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[metrics_key].registry)
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


@routes.get("/api/openapi.json", summary="This OpenAPI 3.1 document")
async def openapi_json(request: web.Request) -> web.Response:
    return json_response(request.app[openapi_key])


@routes.get("/api/docs", content_type="text/html", summary="Swagger UI (served offline)")
async def docs(request: web.Request) -> web.Response:
    return web.Response(text=DOCS_HTML, content_type="text/html")


@routes.get(
    "/api/docs/static/{name}",
    content_type="application/octet-stream",
    include_in_schema=False,
    errors=[ErrorCode.NOT_FOUND],
)
async def docs_static(request: web.Request) -> web.StreamResponse:
    """Swagger UI's own files. Not `add_static`: its FileResponse answers a missing file
    with an empty 404 while the response is sent, past the error envelope."""
    path = SWAGGER_FILES.get(request.match_info["name"])
    if path is None:
        raise NotFound(f"No file {request.match_info['name']!r} in the API docs")
    return web.FileResponse(path)


def setup(app: web.Application, specs: list[RouteSpec]) -> None:
    """Called by the app factory after every route is added, with their declarations."""
    app[openapi_key] = build_spec(specs, version=__version__, server_url=app[settings_key].public_base_url)
