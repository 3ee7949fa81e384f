"""GET /demo: the reference web client, registered only when APP_ENV is dev or test.

One page (`index.html`), one script (`demo.js`), one stylesheet (`demo.css`) and an
icon from this directory, read at each request so edits show on reload; no build step, nothing
from another origin. The Content-Security-Policy allows only this origin: no inline
script or style, no frames, no plug-ins. Driven by tests/e2e/test_demo_browser.py.
"""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web

from server.config import Settings
from server.routing import RouteTable

routes = RouteTable(tags=["dev"], auth="public")

PAGE_DIR = Path(__file__).resolve().parent
_HOST_OK = re.compile(r"^[A-Za-z0-9.-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")


def content_security_policy(request: web.Request) -> str:
    """'self' only. The WebSocket's own ws:/wss: origin is spelled out as well, for
    browsers whose 'self' does not cover it yet; a malformed Host adds nothing."""
    connect = "'self'"
    if _HOST_OK.match(request.host):
        connect += f" ws://{request.host} wss://{request.host}"
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        f"connect-src {connect}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def _file(request: web.Request, name: str, content_type: str) -> web.FileResponse:
    return web.FileResponse(
        PAGE_DIR / name,
        headers={
            "Content-Type": content_type,
            "Content-Security-Policy": content_security_policy(request),
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "same-origin",  # no-referrer makes Chromium send `Origin: null` with POSTs
        },
    )


@routes.get("/demo", content_type="text/html", summary="Reference web client (dev and test only)")
async def demo_page(request: web.Request) -> web.StreamResponse:
    """Log in with an SMS code, upload a photo, run a feature, watch its live events."""
    return _file(request, "index.html", "text/html; charset=utf-8")


@routes.get("/demo/demo.js", content_type="text/javascript", include_in_schema=False)
async def demo_script(request: web.Request) -> web.StreamResponse:
    return _file(request, "demo.js", "text/javascript; charset=utf-8")


@routes.get("/demo/demo.css", content_type="text/css", include_in_schema=False)
async def demo_style(request: web.Request) -> web.StreamResponse:
    return _file(request, "demo.css", "text/css; charset=utf-8")


@routes.get("/demo/favicon.svg", content_type="image/svg+xml", include_in_schema=False)
async def demo_icon(request: web.Request) -> web.StreamResponse:
    return _file(request, "favicon.svg", "image/svg+xml")


def route_tables(settings: Settings) -> list[RouteTable]:
    return [routes] if settings.app_env in ("dev", "test") else []
