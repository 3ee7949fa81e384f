"""The error envelope, request ids, readiness, metrics, OpenAPI and docs."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from openapi_spec_validator import validate
from pydantic import BaseModel, Field

from actors import Actor, ActorRef
from server.app import create_app
from server.config import ConfigError, Settings
from server.db import GroupExecute, is_duplicate
from server.errors import Busy, ErrorCode
from server.keys import actor_system_key, db_key, redis_key
from server.routing import RouteTable, add_routes
from tests.conftest import ROOT


class EchoIn(BaseModel):
    name: str = Field(min_length=1, max_length=5)
    count: int = Field(ge=0)


probe = RouteTable(tags=["probe"], auth="public")


@probe.post("/api/v1/_probe/echo", body=EchoIn, response=EchoIn)
async def echo(request: web.Request, body: EchoIn) -> EchoIn:
    return body


@probe.get("/api/v1/_probe/boom")
async def boom(request: web.Request) -> None:
    raise RuntimeError("the probe exploded on purpose")


@probe.get("/api/v1/_probe/hold-db")
async def hold_db(request: web.Request) -> dict[str, str]:
    async with request.app[db_key].connection():
        return {"held": "yes"}


class Held(Actor[str]):
    """Handles one message at a time and waits on `gate` in each."""

    mailbox_size = 1

    def __init__(self, gate: asyncio.Event, started: asyncio.Event) -> None:
        self.gate = gate
        self.started = started

    async def receive(self, msg: str) -> str:
        self.started.set()
        await self.gate.wait()
        return msg


held_key: web.AppKey[list[ActorRef[str]]] = web.AppKey("held_actor")  # filled by the test


@probe.post("/api/v1/_probe/tell")
async def tell_held(request: web.Request) -> dict[str, str]:
    request.app[held_key][0].tell("hello")
    return {"queued": "yes"}


@pytest.fixture
def app(settings: Settings) -> web.Application:
    app = create_app(settings)
    add_routes(app, [probe])
    app[held_key] = []
    return app


def assert_envelope(body: dict[str, Any], code: ErrorCode, request_id: str) -> None:
    assert set(body) == {"error"}
    err = body["error"]
    assert err["code"] == code.value
    assert err["request_id"] == request_id
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["details"], dict)


async def test_unknown_route_answers_404_envelope_with_its_request_id(client: Any) -> None:
    resp = await client.get("/api/v1/nope")
    assert resp.status == 404
    rid = resp.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    assert_envelope(await resp.json(), ErrorCode.NOT_FOUND, rid)


async def test_request_ids_made_by_the_server_differ_per_request(client: Any) -> None:
    made = [(await client.get("/healthz")).headers["X-Request-ID"] for _ in range(20)]
    assert len(set(made)) == 20 and all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in made)


def test_a_forked_process_makes_request_ids_of_its_own() -> None:
    code = (
        "import os, server.middleware as m; r, w = os.pipe(); pid = os.fork()\n"
        "if pid == 0: os.write(w, m._RID_PREFIX.encode()); os._exit(0)\n"
        "os.waitpid(pid, 0); print(m._RID_PREFIX != os.read(r, 64).decode())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"  # a forked worker makes its own ids


async def test_request_id_sent_by_the_client_is_echoed(client: Any) -> None:
    resp = await client.get("/healthz", headers={"X-Request-ID": "front-end-42"})
    assert resp.headers["X-Request-ID"] == "front-end-42"
    resp = await client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert resp.headers["X-Request-ID"] != "bad id\twith spaces"


async def test_delete_on_healthz_answers_405_envelope(client: Any) -> None:
    resp = await client.delete("/healthz")
    assert resp.status == 405
    assert resp.headers["Allow"] == "GET"
    assert_envelope(await resp.json(), ErrorCode.METHOD_NOT_ALLOWED, resp.headers["X-Request-ID"])


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b'{"name": "x",', {}),
        (b"[" * 100_000 + b"]" * 100_000, {}),  # nested past Python's recursion limit
        (b'{"name": "x", "count": ' + b"1" * 5000 + b"}", {}),  # past int()'s 4,300 digits
        (b'{"name": "x", "count": NaN}', {}),  # Python's json takes it; JSON has no NaN
        (b'{"name": "\xff"}', {}),  # not UTF-8
        (b'{"name": "x", "count": 1, "more": {"k": ["\\udc00"]}}', {}),  # a lone surrogate: no text
        (b'{"name": "x", "count": 1}', {"Content-Encoding": "gzip"}),  # not gzip
    ],
)
async def test_malformed_json_answers_400_malformed_request(
    client: Any, body: bytes, headers: dict[str, str]
) -> None:
    resp = await client.post(
        "/api/v1/_probe/echo", data=body, headers={"Content-Type": "application/json", **headers}
    )
    assert resp.status == 400
    assert_envelope(await resp.json(), ErrorCode.MALFORMED_REQUEST, resp.headers["X-Request-ID"])
    if "Content-Encoding" in headers:  # unreadable: this connection is not used again
        assert resp.headers["Connection"] == "close"
    assert (await client.get("/healthz")).status == 200


async def test_a_body_of_another_content_type_answers_400(client: Any) -> None:
    resp = await client.post("/api/v1/_probe/echo", data={"name": "x"})
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "MALFORMED_REQUEST"


async def test_field_errors_answer_422_with_each_field(client: Any) -> None:
    resp = await client.post("/api/v1/_probe/echo", json={"name": "toolong", "count": -1})
    assert resp.status == 422
    body = await resp.json()
    assert_envelope(body, ErrorCode.VALIDATION_FAILED, resp.headers["X-Request-ID"])
    fields = {f["field"] for f in body["error"]["details"]["fields"]}
    assert fields == {"name", "count"}


async def test_a_valid_body_reaches_the_handler(client: Any) -> None:
    resp = await client.post("/api/v1/_probe/echo", json={"name": "abc", "count": 2})
    assert resp.status == 200
    assert await resp.json() == {"name": "abc", "count": 2}
    paired = b'{"name": "\\ud83d\\ude00", "count": 2}'  # an escaped pair is one character: fine
    resp = await client.post("/api/v1/_probe/echo", data=paired, headers={"Content-Type": "application/json"})
    assert resp.status == 200 and await resp.json() == {"name": "\U0001f600", "count": 2}


async def test_an_oversized_json_body_answers_413(client: Any, settings: Settings) -> None:
    big = b'{"name": "' + b"x" * (settings.http.json_body_max + 10) + b'", "count": 1}'
    resp = await client.post("/api/v1/_probe/echo", data=big, headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "PAYLOAD_TOO_LARGE"


async def test_a_handler_that_raises_answers_500_with_the_traceback_only_in_the_log(
    client: Any, log_lines: list[str]
) -> None:
    resp = await client.get("/api/v1/_probe/boom", headers={"X-Request-ID": "trace-me"})
    assert resp.status == 500
    text = await resp.text()
    assert "Traceback" not in text and "exploded" not in text
    assert_envelope(await resp.json(), ErrorCode.INTERNAL, "trace-me")
    logged = "".join(log_lines)
    assert "Traceback" in logged and "the probe exploded on purpose" in logged


async def test_an_exhausted_pool_answers_503_busy_with_retry_after(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    app = create_app(make_settings(db_pool_min=0, db_pool_max=1, db_acquire_timeout=0.2))
    add_routes(app, [probe])
    client = await aiohttp_client(app)
    db = app[db_key]
    async with db.connection():
        resp = await client.get("/api/v1/_probe/hold-db")
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert (await resp.json())["error"]["code"] == "BUSY"
    resp = await client.get("/api/v1/_probe/hold-db")
    assert resp.status == 200
    metrics = await (await client.get("/metrics")).text()
    assert "wardrobe_db_pool_acquire_timeouts_total 1.0" in metrics


GX = "INSERT INTO gx (id, v) SELECT %s, %s FROM DUAL WHERE %s"  # 1 row, or 0 when the flag is false


async def test_group_execute_answers_each_caller_as_alone_in_shared_round_trips(
    client: Any, app: web.Application
) -> None:
    db = app[db_key]
    await db.execute("CREATE TABLE gx (id INT PRIMARY KEY, v INT NOT NULL)")
    await db.execute("INSERT INTO gx VALUES (7, 0)")
    gx = GroupExecute(db, GX)
    # 30 at once: 0, 5, 10 … write nothing (0), 7 is taken (its own IntegrityError), the rest 1;
    # and one whose arguments cannot be escaped (a dict): its own TypeError, never sent.
    calls = [gx(i, i, i % 5 != 0) for i in range(30)] + [gx({"id": 99}, 0, True)]
    answers = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(answers.pop(), TypeError)
    duplicate = answers.pop(7)
    assert isinstance(duplicate, Exception) and is_duplicate(duplicate)
    assert answers == [0 if i % 5 == 0 else 1 for i in range(30) if i != 7]
    rows = await db.fetchall("SELECT id, v FROM gx ORDER BY id")
    assert [(r["id"], r["v"]) for r in rows] == [(i, 0 if i == 7 else i) for i in range(30) if i % 5]
    # One round trip for all 30; the server stopped at 7, so 8…29 went again in a second.
    assert (gx.rounds, gx.statements) == (2, 30 + 22)


async def test_group_execute_leaves_out_a_caller_cancelled_before_its_round(
    client: Any, app: web.Application
) -> None:
    db = app[db_key]
    await db.execute("CREATE TABLE gx (id INT PRIMARY KEY, v INT NOT NULL)")
    gx = GroupExecute(db, GX)
    calls = [asyncio.create_task(gx(i, i, True)) for i in range(3)]
    await asyncio.sleep(0)  # all three are queued; the round has not started
    calls[1].cancel()
    assert await calls[0] == 1 and await calls[2] == 1
    assert calls[1].cancelled()
    assert [r["id"] for r in await db.fetchall("SELECT id FROM gx ORDER BY id")] == [0, 2]
    assert (gx.rounds, gx.statements) == (1, 2)


async def test_group_execute_gives_a_pool_timeout_to_every_caller_of_the_round(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    app = create_app(make_settings(db_pool_min=0, db_pool_max=1, db_acquire_timeout=0.2))
    await aiohttp_client(app)
    db = app[db_key]
    await db.execute("CREATE TABLE gx (id INT PRIMARY KEY, v INT NOT NULL)")
    gx = GroupExecute(db, GX)
    async with db.connection():  # the only connection
        answers = await asyncio.gather(*(gx(i, i, True) for i in range(5)), return_exceptions=True)
    assert all(isinstance(a, Busy) for a in answers), answers
    assert gx.rounds == 1 and await db.fetchval("SELECT COUNT(*) FROM gx") == 0
    assert await asyncio.gather(*(gx(i, i, True) for i in range(5))) == [1] * 5


async def test_readyz_is_200_when_db_redis_and_migrations_are_current(client: Any) -> None:
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok", "checks": {"db": "ok", "redis": "ok", "migrations": "ok"}}


@probe.get("/api/v1/_probe/redis")
async def use_redis(request: web.Request) -> dict[str, str]:
    await request.app[redis_key].ping()
    return {"redis": "ok"}


class _Watched(deque[Any]):
    """The pool's waiter queue, telling when a caller starts waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.added = asyncio.Event()

    def append(self, item: Any) -> None:
        super().append(item)
        self.added.set()


async def test_an_exhausted_redis_pool_answers_503_busy_with_retry_after(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    app = create_app(make_settings(redis_max_connections=3, redis_timeout=0.3))
    add_routes(app, [probe])
    client = await aiohttp_client(app)
    pool = app[redis_key].connection_pool
    held = []
    with pytest.raises(Busy):  # take every connection: the next one waits 0.3 s, then Busy
        while True:
            held.append(await pool.get_connection())
    resp = await client.get("/api/v1/_probe/redis")
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    assert (await resp.json())["error"]["code"] == "BUSY"
    # A call that finds the pool full waits for a release instead of failing.
    pool._waiters = watched = _Watched()  # type: ignore[attr-defined]
    waiting = asyncio.create_task(client.get("/api/v1/_probe/redis"))
    await asyncio.wait_for(watched.added.wait(), 5)
    await pool.release(held.pop())
    assert (await waiting).status == 200
    for conn in held:
        await pool.release(conn)
    assert (await client.get("/api/v1/_probe/redis")).status == 200


async def test_the_redis_client_uses_redis_pys_own_connections(app: web.Application, client: Any) -> None:
    from redis.asyncio.connection import UnixDomainSocketConnection

    redis = app[redis_key]
    assert redis.connection_pool.connection_class is UnixDomainSocketConnection  # no patched subclass
    await redis.set("pack:test", bytearray(b"\x00value"), ex=60)
    assert await redis.get("pack:test") == b"\x00value"


async def test_readyz_is_503_naming_pending_migrations(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    client = await aiohttp_client(create_app(make_settings(migrate_on_start=False)))
    resp = await client.get("/readyz")
    assert resp.status == 503
    checks = (await resp.json())["checks"]
    assert checks["db"] == "ok" and checks["redis"] == "ok"
    assert "0001_users.sql" in checks["migrations"]


async def test_metrics_count_requests_by_route_template_and_show_pool_gauges(client: Any) -> None:
    await client.get("/healthz")
    await client.get("/api/v1/_probe/boom")
    text = await (await client.get("/metrics")).text()
    assert 'wardrobe_http_requests_total{method="GET",route="/healthz",status="200"} 1.0' in text
    assert 'wardrobe_http_requests_total{method="GET",route="/api/v1/_probe/boom",status="500"} 1.0' in text
    assert 'wardrobe_http_request_duration_seconds_bucket{le="0.005",method="GET",route="/healthz"}' in text
    for gauge in (
        "wardrobe_db_pool_size",
        "wardrobe_db_pool_free",
        "wardrobe_db_pool_in_use",
        "wardrobe_db_pool_waiting",
        "wardrobe_db_pool_max 10.0",
    ):
        assert gauge in text
    assert "process_resident_memory_bytes" in text


async def test_openapi_document_is_valid_3_1_and_lists_every_route(client: Any, app: web.Application) -> None:
    resp = await client.get("/api/openapi.json")
    doc = await resp.json()
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    for path in ("/healthz", "/readyz", "/metrics", "/api/docs", "/api/openapi.json"):
        assert path in doc["paths"], path
    for responses in (op["responses"] for item in doc["paths"].values() for op in item.values()):
        assert "500" in responses


async def test_swagger_ui_renders_with_no_external_asset(client: Any) -> None:
    resp = await client.get("/api/docs")
    assert resp.status == 200
    html = await resp.text()
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and all(a.startswith("/") for a in assets)
    assert "//" not in "".join(a[1:] for a in assets)
    for asset in assets:
        got = await client.get(asset)
        assert got.status == 200, asset
        assert len(await got.read()) > 1000


def test_prod_refuses_a_default_secret_and_embedded_servers() -> None:
    settings = Settings(_env_file=None, app_env="prod")  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="JWT_SECRET"):
        settings.check_for_start()
    good = Settings(  # type: ignore[call-arg]
        _env_file=None,
        app_env="prod",
        jwt_secret="x" * 40,
        sms_provider="disabled",
        database_url="mysql://u:p@db:3306/w",
        redis_url="redis://r:6379/0",
    )
    good.check_for_start()


async def test_concurrent_requests_share_the_pool_without_leaking(client: Any, app: web.Application) -> None:
    answers = await asyncio.gather(*(client.get("/api/v1/_probe/hold-db") for _ in range(50)))
    assert [r.status for r in answers] == [200] * 50
    stats = app[db_key].pool_stats()
    assert stats["in_use"] == 0 and stats["waiting"] == 0


async def test_a_full_actor_mailbox_answers_503_busy_with_retry_after(
    client: Any, app: web.Application
) -> None:
    gate, started = asyncio.Event(), asyncio.Event()
    ref = app[actor_system_key].spawn(Held(gate, started))
    app[held_key].append(ref)
    ref.tell("first")
    await started.wait()  # "first" is being handled; the mailbox (1) is empty
    assert (await client.post("/api/v1/_probe/tell")).status == 200  # fills the mailbox
    resp = await client.post("/api/v1/_probe/tell")
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    assert (await resp.json())["error"]["code"] == "BUSY"
    gate.set()


def test_parse_uint_takes_only_ascii_digits_of_bounded_length() -> None:
    from server.errors import parse_uint

    assert parse_uint("0") == 0 and parse_uint("42") == 42 and parse_uint("9" * 19) == 10**19 - 1
    for raw in (None, "", "²", "１２", "-1", "+1", " 1", "1.0", "0x1", "9" * 20, "9" * 5000):
        assert parse_uint(raw) is None, raw
    assert parse_uint("123456", max_digits=5) is None


async def test_every_log_line_of_a_request_carries_its_request_id(client: Any) -> None:
    from loguru import logger

    from server.logging import _with_request_id

    lines: list[str] = []
    logger.configure(patcher=_with_request_id)  # as setup_logging does
    sink = logger.add(lambda m: lines.append(f"{m.record['extra'].get('request_id')} {m.record['message']}"))
    try:
        await client.get("/api/v1/_probe/boom", headers={"X-Request-ID": "trace-42"})
        await client.get("/healthz", headers={"X-Request-ID": "trace-43"})
        logger.info("outside any request")
    finally:
        logger.remove(sink)
        logger.configure(patcher=None)
    assert "trace-42 unhandled error in GET /api/v1/_probe/boom" in lines
    assert any(line.startswith("trace-42 GET /api/v1/_probe/boom 500") for line in lines)
    assert any(line.startswith("trace-43 GET /healthz 200") for line in lines)
    assert "None outside any request" in lines  # a line outside any request has none


_PROD_LOGGING = """
import logging
from loguru import logger
from server.logging import REQUEST_ID, setup_logging
setup_logging("INFO", json=True)
logger.info("outside any request")
REQUEST_ID.set("trace-7")
logger.info("{} {} {}", "GET", "/healthz", 200, route="/healthz", status=200)
logger.debug("below the level")
logger.bind(actor="user:13912345678").warning("phone 13912345678")
try:
    raise ValueError("id 110101199001011234")
except ValueError:
    logger.exception("failed")
logging.getLogger("aiohttp.server").warning("from the %s", "stdlib")
"""


def test_prod_logs_one_flat_json_object_a_line_masked_with_the_request_id() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROD_LOGGING],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(line["level"], line["request_id"]) for line in lines] == [
        ("INFO", "-"),
        ("INFO", "trace-7"),
        ("WARNING", "trace-7"),
        ("ERROR", "trace-7"),
        ("WARNING", "trace-7"),
    ]
    access = lines[1]
    assert (access["message"], access["route"], access["status"]) == ("GET /healthz 200", "/healthz", 200)
    assert access["logger"] == "__main__" and access["function"] == "<module>" and access["line"] == 8
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", access["time"])
    assert (lines[2]["message"], lines[2]["actor"]) == ("phone 139****5678", "user:139****5678")
    failed = lines[3]["message"]
    assert failed.startswith("failed\nTraceback") and "ValueError: id 1101**********1234" in failed
    assert lines[4]["message"] == "from the stdlib"
    assert "13912345678" not in done.stderr and "110101199001011234" not in done.stderr
