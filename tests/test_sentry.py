"""Sentry (optional): an unhandled error reaches a local fake ingest endpoint with the
request id as a tag and without phone numbers, tokens, ID numbers or Authorization."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import sentry_sdk
from aiohttp import web
from sentry_sdk.envelope import Envelope

from server.app import create_app
from server.config import Settings
from server.routing import RouteTable, add_routes
from server.sentry import FILTERED, scrub

PHONE = "13912345678"
TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiI0MiJ9.c2lnbmF0dXJlLXNlY3JldA"
ID_NUMBER = "11010519491231002X"
PROJECT = "4242"

probe = RouteTable(tags=["probe"], auth="public")


@probe.get("/api/v1/_probe/sentry-boom")
async def boom(request: web.Request) -> None:
    raise RuntimeError(f"could not bill {PHONE} with token={TOKEN} (id {ID_NUMBER})")


class FakeIngest:
    """Sentry's envelope endpoint: POST /api/<project>/envelope/ with the DSN's key."""

    def __init__(self) -> None:
        self.envelopes: list[tuple[bytes, Envelope]] = []
        self.got_event = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_post("/api/{project}/envelope/", self.envelope)

    async def envelope(self, request: web.Request) -> web.Response:
        assert request.match_info["project"] == PROJECT
        auth = request.headers.get("X-Sentry-Auth", "")
        assert "sentry_key=publickey" in auth, auth
        raw = await request.read()  # aiohttp undoes the Content-Encoding (gzip, br)
        envelope = Envelope.deserialize(raw)
        self.envelopes.append((raw, envelope))
        if any(item.type == "event" for item in envelope.items):
            self.got_event.set()
        return web.json_response({"id": "0" * 32})

    def events(self) -> list[dict[str, Any]]:
        return [
            item.payload.json
            for _, env in self.envelopes
            for item in env.items
            if item.type == "event" and item.payload.json is not None
        ]


@pytest.fixture
async def ingest(aiohttp_server: Any) -> tuple[FakeIngest, str]:
    fake = FakeIngest()
    server = await aiohttp_server(fake.app)
    return fake, f"http://publickey@{server.host}:{server.port}/{PROJECT}"


async def test_an_unhandled_error_arrives_tagged_with_its_request_id_and_scrubbed(
    aiohttp_client: Any, make_settings: Callable[..., Settings], ingest: tuple[FakeIngest, str]
) -> None:
    fake, dsn = ingest
    settings = make_settings(
        cron_enabled=False, sentry_dsn=dsn, sentry_environment="ci", sentry_traces_sample_rate=1.0
    )
    app = create_app(settings)
    add_routes(app, [probe])
    client = await aiohttp_client(app)
    resp = await client.get(
        f"/api/v1/_probe/sentry-boom?phone={PHONE}",
        headers={"X-Request-ID": "sentry-rid-1", "Authorization": f"Bearer {TOKEN}", "X-Phone": PHONE},
    )
    assert resp.status == 500
    assert (await resp.json())["error"]["code"] == "INTERNAL"
    await asyncio.wait_for(fake.got_event.wait(), 10)
    await client.close()  # cleanup flushes the rest (the transaction) and closes the SDK
    assert not sentry_sdk.is_initialized()

    (event,) = fake.events()
    assert event["tags"]["request_id"] == "sentry-rid-1"
    assert event["environment"] == "ci"
    (exc,) = event["exception"]["values"]
    assert exc["type"] == "RuntimeError"
    assert FILTERED in exc["value"] and "could not bill" in exc["value"]
    assert event["request"]["headers"].get("Authorization") in (None, FILTERED)
    for raw, _ in fake.envelopes:  # nothing personal in any item, transactions included
        for secret in (PHONE, TOKEN, ID_NUMBER, "c2lnbmF0dXJl"):
            assert secret.encode() not in raw, secret


def test_scrub_masks_keys_and_patterns_but_keeps_the_rest() -> None:
    event = {
        "message": f"user {PHONE} (+86 {PHONE}) id {ID_NUMBER} Bearer {TOKEN}",
        "extra": {"refresh_token": "r-123", "order": 7, "note": "password=hunter2 kept"},
        "request": {"headers": {"Authorization": "Basic dXNlcjpwdw==", "Accept": "*/*"}},
        "tags": {"request_id": "rid-9"},
    }
    out = scrub(event)
    assert PHONE not in out["message"] and ID_NUMBER not in out["message"] and TOKEN not in out["message"]
    assert out["extra"] == {"refresh_token": FILTERED, "order": 7, "note": f"password={FILTERED} kept"}
    assert out["request"]["headers"] == {"Authorization": FILTERED, "Accept": "*/*"}
    assert out["tags"] == {"request_id": "rid-9"}


async def test_without_a_dsn_nothing_is_initialised(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    app = create_app(make_settings(cron_enabled=False))
    add_routes(app, [probe])
    client = await aiohttp_client(app)
    assert (await client.get("/api/v1/_probe/sentry-boom")).status == 500
    assert not sentry_sdk.is_initialized()
