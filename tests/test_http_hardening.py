"""The HTTP edge under stress (issue 10): lost dependencies, clients that vanish or trickle,
answers aiohttp would write itself, and CORS."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, WSServerHandshakeError, web
from aiohttp.test_utils import TestClient
from loguru import logger

from server.app import create_app
from server.config import Settings
from server.embedded import EmbeddedMariaDB, EmbeddedRedis, ensure_database
from server.errors import ErrorCode
from tests.auth_support import auth_settings, bearer, register

APP_ORIGIN = "https://app.example.com"


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(cron_enabled=False)  # no job logging its own errors in the middle


def envelope_code(body: bytes, request_id: str) -> str:
    """The code of an error envelope, after checking its shape and request id."""
    err = json.loads(body)["error"]
    assert set(err) == {"code", "message", "request_id", "details"}
    assert err["request_id"] == request_id
    return str(err["code"])


async def expect_envelope(resp: Any, status: int, code: ErrorCode) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    assert envelope_code(await resp.read(), resp.headers["X-Request-ID"]) == code.value
    return dict(resp.headers)


@contextmanager
def logged(fragment: str) -> Iterator[asyncio.Event]:
    """An event set when a log line containing `fragment` is written."""
    seen = asyncio.Event()
    sink = logger.add(lambda m: seen.set() if fragment in m else None, format="{message}")
    try:
        yield seen
    finally:
        logger.remove(sink)


@contextmanager
def errors_logged() -> Iterator[list[str]]:
    """Every loguru line at ERROR or above while the block runs."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="ERROR", format="{message}")
    try:
        yield lines
    finally:
        logger.remove(sink)


async def metric_lines(client: TestClient[Any, Any] | ClientSession, fragment: str) -> list[str]:
    text = await (await client.get("/metrics")).text()
    return [line for line in text.splitlines() if fragment in line and not line.startswith("#")]


@asynccontextmanager
async def served(app: web.Application) -> AsyncIterator[tuple[ClientSession, int]]:
    """`app` served on 127.0.0.1 as `run.py serve` serves it (web.run_app's AppRunner: a client
    that goes away does not cancel its handler, as it does under aiohttp's TestServer); a
    session on it, and its port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = int(runner.addresses[0][1])
        async with ClientSession(base_url=f"http://127.0.0.1:{port}") as session:
            yield session, port
    finally:
        await runner.cleanup()


# --- 5. a lost database or Redis: 503 UNAVAILABLE, then recovery by itself ---------------------


async def test_a_lost_database_answers_503_unavailable_and_the_server_recovers_when_it_returns(
    aiohttp_client: Any, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    mariadb = EmbeddedMariaDB(tmp_path, fast=True)  # its own: the session's is shared by every test
    await asyncio.to_thread(mariadb.start)
    try:
        await asyncio.to_thread(ensure_database, mariadb, "lost")
        settings = auth_settings(make_settings, database_url=mariadb.url("lost"), cron_enabled=False)
        client = await aiohttp_client(create_app(settings))
        headers = bearer((await register(client))["access_token"])
        assert (await client.get("/api/v1/me/quota/ledger", headers=headers)).status == 200

        await asyncio.to_thread(mariadb.stop)
        with errors_logged() as errors:
            lost = await expect_envelope(
                await client.get("/api/v1/me/quota/ledger", headers=headers), 503, ErrorCode.UNAVAILABLE
            )
            assert int(lost["Retry-After"]) >= 1
            ready = await client.get("/readyz")
            assert ready.status == 503 and (await ready.json())["checks"]["db"].startswith("failed")
        assert errors == []  # an outage is a warning, not a traceback per request

        await asyncio.to_thread(mariadb.start)
        assert (await client.get("/api/v1/me/quota/ledger", headers=headers)).status == 200
        assert (await client.get("/readyz")).status == 200
        assert await metric_lines(client, 'status="500"') == []
        await client.close()
    finally:
        await asyncio.to_thread(mariadb.stop)


async def test_a_lost_redis_answers_503_unavailable_and_the_server_recovers_when_it_returns(
    aiohttp_client: Any, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    redis = EmbeddedRedis(tmp_path)
    await asyncio.to_thread(redis.start)
    try:
        settings = auth_settings(
            make_settings, redis_url=redis.url(), cron_enabled=False, profile_local_cache_size=0
        )
        client = await aiohttp_client(create_app(settings))
        headers = bearer((await register(client))["access_token"])
        assert (await client.get("/api/v1/me", headers=headers)).status == 200

        await asyncio.to_thread(redis.stop)
        with errors_logged() as errors:
            lost = await expect_envelope(
                await client.get("/api/v1/me", headers=headers), 503, ErrorCode.UNAVAILABLE
            )
            assert int(lost["Retry-After"]) >= 1
            ready = await client.get("/readyz")
            assert ready.status == 503 and (await ready.json())["checks"]["redis"].startswith("failed")
        assert not [e for e in errors if "/api/v1/me" in e]

        await asyncio.to_thread(redis.start)
        assert (await client.get("/api/v1/me", headers=headers)).status == 200
        assert (await client.get("/readyz")).status == 200
        assert await metric_lines(client, 'status="500"') == []
        await client.close()
    finally:
        await asyncio.to_thread(redis.stop)


# --- 6. clients that go away mid-body, or send it too slowly ------------------------------------


async def disconnect_mid_body(host: str, port: int) -> None:
    """POST half a JSON body once the handler reads it (after its 100 Continue), then hang up."""
    with logged("POST /api/v1/auth/login ") as answered:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\nExpect: 100-continue\r\n\r\n"
        )
        assert (await reader.readline()).startswith(b"HTTP/1.1 100")
        await reader.readline()
        writer.write(b'{"phone": "1390')
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        await answered.wait()


LOGIN_COUNTS = 'wardrobe_http_requests_total{method="POST",route="/api/v1/auth/login"'


@pytest.mark.parametrize("server", ["run.py", "TestServer"])
async def test_a_client_that_disconnects_mid_body_is_counted_499_and_logs_no_error(
    server: str, aiohttp_client: Any, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """As served by run.py, the read fails with ConnectionResetError; under TestServer
    (handler_cancellation=True) the handler is cancelled instead. Both are a 499."""
    with errors_logged() as errors:
        if server == "run.py":
            async with served(create_app(settings)) as (session, port):
                await disconnect_mid_body("127.0.0.1", port)
                counts = await metric_lines(session, LOGIN_COUNTS)
        else:
            client = await aiohttp_client(create_app(settings))
            await disconnect_mid_body(str(client.host), int(client.port or 0))
            counts = await metric_lines(client, LOGIN_COUNTS)
    assert counts == [LOGIN_COUNTS + ',status="499"} 1.0']
    assert errors == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_body_trickled_past_request_body_timeout_answers_408_and_closes(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    client = await aiohttp_client(create_app(make_settings(request_body_timeout=1, cron_enabled=False)))
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 10000\r\n\r\n{"
    )

    async def trickle() -> None:
        while True:  # one byte every 200 ms: 50 minutes for the whole body
            await asyncio.sleep(0.2)
            writer.write(b" ")
            await writer.drain()

    trickling = asyncio.create_task(trickle())
    try:
        async with asyncio.timeout(15):
            answer = await reader.read()  # to EOF: the server closes after answering
    finally:
        trickling.cancel()
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), head
    headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    assert headers["Connection"] == "close"
    assert envelope_code(body, headers["X-Request-ID"]) == ErrorCode.REQUEST_TIMEOUT.value


# --- 7. answers aiohttp would write without the envelope ----------------------------------------


async def test_a_9000_byte_authorization_header_reaches_the_app_and_gets_the_401_envelope(
    client: TestClient[Any, Any],
) -> None:
    resp = await client.get("/api/v1/me", headers={"Authorization": "Bearer " + "a" * 8993})
    await expect_envelope(resp, 401, ErrorCode.UNAUTHENTICATED)
    assert "aaaaaaaa" not in await resp.text()


async def test_a_missing_swagger_asset_answers_the_404_envelope(client: TestClient[Any, Any]) -> None:
    await expect_envelope(await client.get("/api/docs/static/nonexistent.js"), 404, ErrorCode.NOT_FOUND)
    await expect_envelope(await client.get("/api/docs/static/../../setup.cfg"), 404, ErrorCode.NOT_FOUND)
    found = await client.get("/api/docs/static/swagger-ui-bundle.js")
    assert found.status == 200 and "javascript" in found.content_type


# --- 17. CORS through aiohttp-cors ---------------------------------------------------------------


@pytest.fixture
def cors_settings(make_settings: Callable[..., Settings]) -> Settings:
    return auth_settings(
        make_settings, cron_enabled=False, cors_allowed_origins=f"{APP_ORIGIN}, https://admin.example.com/"
    )


def preflight(origin: str, method: str, headers: str = "") -> dict[str, str]:
    asked = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers:
        asked["Access-Control-Request-Headers"] = headers
    return asked


async def test_a_preflight_from_an_allowed_origin_is_answered_with_the_allowed_headers(
    aiohttp_client: Any, cors_settings: Settings
) -> None:
    client = await aiohttp_client(create_app(cors_settings))
    resp = await client.options(
        "/api/v1/tasks", headers=preflight(APP_ORIGIN, "POST", "authorization, content-type, idempotency-key")
    )
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert resp.headers["Access-Control-Allow-Methods"] == "POST"
    allowed = {h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
    assert allowed == {"authorization", "content-type", "idempotency-key"}
    me = await client.options("/api/v1/me", headers=preflight(APP_ORIGIN, "PATCH", "x-request-id"))
    assert me.status == 200 and me.headers["Access-Control-Allow-Methods"] == "PATCH"


async def test_a_preflight_from_another_origin_is_a_403_envelope_without_cors_headers(
    aiohttp_client: Any, cors_settings: Settings
) -> None:
    client = await aiohttp_client(create_app(cors_settings))
    for origin, method, asked in [
        ("https://evil.example.com", "GET", ""),  # origin not listed
        (APP_ORIGIN, "GET", "x-custom"),  # header not allowed
        (APP_ORIGIN, "DELETE", ""),  # no such route on /api/v1/me
    ]:
        resp = await client.options("/api/v1/me", headers=preflight(origin, method, asked))
        headers = await expect_envelope(resp, 403, ErrorCode.FORBIDDEN)
        assert not [h for h in headers if h.lower().startswith("access-control-")]


async def test_a_request_from_an_allowed_origin_exposes_request_id_and_retry_after(
    aiohttp_client: Any, cors_settings: Settings
) -> None:
    client = await aiohttp_client(create_app(cors_settings))
    account = await register(client)
    resp = await client.get("/api/v1/me", headers={"Origin": APP_ORIGIN, **bearer(account["access_token"])})
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    exposed = {h.strip() for h in resp.headers["Access-Control-Expose-Headers"].split(",")}
    assert exposed == {"X-Request-ID", "Retry-After"}
    assert "Access-Control-Allow-Credentials" not in resp.headers
    # An error answer carries them too, or the page could not read why it failed.
    denied = await client.get("/api/v1/me", headers={"Origin": APP_ORIGIN})
    assert denied.status == 401 and denied.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    other = await client.get("/api/v1/me", headers={"Origin": "https://evil.example.com"})
    assert "Access-Control-Allow-Origin" not in other.headers


async def test_no_origin_is_allowed_by_default(client: TestClient[Any, Any]) -> None:
    resp = await client.options("/api/v1/me", headers=preflight(APP_ORIGIN, "GET"))
    await expect_envelope(resp, 403, ErrorCode.FORBIDDEN)
    resp = await client.get("/healthz", headers={"Origin": APP_ORIGIN})
    assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers


async def test_the_websocket_keeps_its_own_origin_check_and_gets_no_cors_headers(
    aiohttp_client: Any, cors_settings: Settings
) -> None:
    client = await aiohttp_client(create_app(cors_settings))
    with pytest.raises(WSServerHandshakeError) as refused:
        await client.ws_connect("/api/v1/ws", origin=APP_ORIGIN)  # not in WS_ALLOWED_ORIGINS
    assert refused.value.status == 403
    assert "Access-Control-Allow-Origin" not in (refused.value.headers or {})
    ws = await client.ws_connect("/api/v1/ws")  # no Origin: the mini-program
    await ws.close()
