"""GET /demo, the reference web client: served in dev and test only, same-origin CSP.
The browser drives it in tests/e2e/test_demo_browser.py (`make e2e`)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from server.app import create_app
from server.config import Settings


def csp_directives(header: str) -> dict[str, list[str]]:
    out = {}
    for part in header.split(";"):
        name, *values = part.split()
        out[name] = values
    return out


async def test_the_demo_page_is_html_with_a_self_only_csp_in_test(client: Any) -> None:
    resp = await client.get("/demo")
    assert resp.status == 200
    assert resp.content_type == "text/html" and resp.charset == "utf-8"
    html = await resp.text()
    for element_id in ("phone", "send-code", "sms-code", "login", "credits", "feature", "inputs", "run"):
        assert f'id="{element_id}"' in html
    for element_id in ("progress", "status", "result", "events", "ws-state", "last-seq"):
        assert f'id="{element_id}"' in html
    # Nothing inline, nothing from another origin: the CSP below has no 'unsafe-inline'.
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/demo/demo.js" defer>']
    assert "<style" not in html and " style=" not in html and "http" not in html.replace("http-equiv", "")
    csp = csp_directives(resp.headers["Content-Security-Policy"])
    assert csp["default-src"] == ["'none'"]
    for directive in ("script-src", "style-src", "img-src"):
        assert csp[directive] == ["'self'"], directive
    host = resp.url.host + ":" + str(resp.url.port)
    assert csp["connect-src"] == ["'self'", f"ws://{host}", f"wss://{host}"]
    assert csp["frame-ancestors"] == ["'none'"]
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert "unsafe" not in resp.headers["Content-Security-Policy"]


async def test_the_script_and_stylesheet_have_their_types(client: Any) -> None:
    js = await client.get("/demo/demo.js")
    assert js.status == 200 and js.content_type == "text/javascript"
    body = await js.text()
    assert "`/dev/sms/" in body and "Idempotency-Key" in body and '"resume"' in body
    css = await client.get("/demo/demo.css")
    assert css.status == 200 and css.content_type == "text/css"


async def test_a_malformed_host_adds_nothing_to_the_csp(client: Any) -> None:
    resp = await client.get("/demo", headers={"Host": "evil.example; script-src *"})
    assert resp.status == 200
    assert "connect-src 'self';" in resp.headers["Content-Security-Policy"]


async def test_the_demo_is_not_in_the_openapi_document_as_json(client: Any) -> None:
    doc = await (await client.get("/api/openapi.json")).json()
    assert list(doc["paths"]["/demo"]) == ["get"]
    assert "/demo/demo.js" not in doc["paths"]


async def test_the_demo_does_not_exist_in_prod(
    aiohttp_client: Any, make_prod_settings: Callable[..., Settings]
) -> None:
    client = await aiohttp_client(create_app(make_prod_settings()))
    for path in ("/demo", "/demo/demo.js", "/demo/demo.css", "/demo/favicon.svg"):
        resp = await client.get(path)
        assert resp.status == 404, path
        assert (await resp.json())["error"]["code"] == "NOT_FOUND"
    doc = await (await client.get("/api/openapi.json")).json()
    assert not any(p.startswith("/demo") for p in doc["paths"])


async def test_the_demo_can_buy_a_credit_pack_through_the_dev_paid_endpoint(client: Any) -> None:
    html = await (await client.get("/demo")).text()
    js = await (await client.get("/demo/demo.js")).text()
    assert 'id="pack"' in html and 'id="buy"' in html
    assert '"/products"' in js and '"/orders"' in js and "`/dev/orders/${order.order_no}/paid`" in js
