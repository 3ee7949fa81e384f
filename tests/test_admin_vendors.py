"""GET /api/v1/admin/vendors: each vendor's live figures, for admins only."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from PIL import Image

from server.config import Settings
from server.keys import vendors_key
from server.vendors.adapters import VendorError, VendorResult
from tests.auth_support import auth_settings, bearer, error_code, register
from tests.fakes.vendor import FakeVendor

ADMIN_PHONE = "13900000012"
ADMIN_PASSWORD = "admin-pass-12"


@pytest.fixture
def settings(make_settings: Callable[..., Settings], fake: FakeVendor) -> Settings:
    fake_vendor = {
        "kind": "http",
        "base_url": f"{fake.base_url}/http",
        "api_key": fake.api_key,
        "operations": {"enhance": ["image"]},
        "concurrency": 1,
        "qps": 50,
        "mailbox": 7,
        "retries": 0,
        "breaker_threshold": 3,
    }
    return auth_settings(
        make_settings,
        cron_enabled=False,
        admin_phone=ADMIN_PHONE,
        admin_password=ADMIN_PASSWORD,
        vendors={"fake": fake_vendor, "local": {"concurrency": 2}},
    )


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "PNG")
    return buf.getvalue()


async def admin(client: Any) -> dict[str, str]:
    resp = await client.post("/api/v1/auth/login", json={"phone": ADMIN_PHONE, "password": ADMIN_PASSWORD})
    assert resp.status == 200, await resp.text()
    return bearer((await resp.json())["access_token"])


async def vendors(client: Any, headers: dict[str, str]) -> dict[str, dict[str, Any]]:
    resp = await client.get("/api/v1/admin/vendors", headers=headers)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert [v["name"] for v in body] == sorted(v["name"] for v in body)
    return {v["name"]: v for v in body}


async def until(predicate: Callable[[], bool]) -> None:
    """Let the loop run until `predicate()` holds (yields only; never a timed sleep)."""
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def test_the_figures_follow_a_held_call_and_the_two_behind_it(
    client: Any, app: web.Application, fake: FakeVendor
) -> None:
    headers = await admin(client)
    idle = await vendors(client, headers)
    assert set(idle) == {"fake", "local"}
    v = idle["fake"]
    assert (v["kind"], v["operations"], v["limit"], v["qps"], v["mailbox_capacity"]) == (
        "http",
        ["enhance"],
        1,
        50.0,
        7,
    )
    assert (v["in_flight"], v["queued"], v["calls"]["started"], v["calls"]["ok"]) == (0, 0, 0, 0)
    assert v["breaker"] == {"state": "closed", "failures": 0, "opens": 0, "retry_in": 0.0}
    assert v["latency"] == {"attempts": 0, "mean_seconds": None, "p50_seconds": None, "p99_seconds": None}
    assert v["errors"] == {} and v["last_error"] is None
    assert idle["local"]["kind"] == "local" and idle["local"]["limit"] == 2

    facade = app[vendors_key]
    fake.hold = asyncio.Event()
    calls: list[asyncio.Task[VendorResult]] = [
        asyncio.create_task(facade.call("fake", "enhance", {"image": png()})) for _ in range(3)
    ]
    await fake.until(lambda: fake.in_flight == 1)
    await until(
        lambda: facade.stats()["fake"]["queue_depth"] == 2
    )  # one held by the actor, one in its mailbox

    busy = (await vendors(client, headers))["fake"]
    assert (busy["in_flight"], busy["queued"], busy["calls"]["started"]) == (1, 2, 1)

    fake.hold.set()
    await asyncio.gather(*calls)
    await until(lambda: facade.stats()["fake"]["in_flight"] == 0)

    done = (await vendors(client, headers))["fake"]
    assert (done["in_flight"], done["queued"]) == (0, 0)
    assert (done["calls"]["started"], done["calls"]["ok"], done["calls"]["failed"]) == (3, 3, 0)
    latency = done["latency"]
    assert latency["attempts"] == 3
    assert latency["mean_seconds"] > 0 and 0 < latency["p50_seconds"] <= latency["p99_seconds"]


async def test_a_failed_call_shows_in_errors_and_last_error(
    client: Any, app: web.Application, fake: FakeVendor
) -> None:
    headers = await admin(client)
    fake.fail_next(500)
    with pytest.raises(VendorError, match="500"):
        await app[vendors_key].call("fake", "enhance", {"image": png()})
    v = (await vendors(client, headers))["fake"]
    assert v["calls"]["failed"] == 1 and v["errors"] == {"server": 1}
    assert v["breaker"]["failures"] == 1 and v["breaker"]["state"] == "closed"
    assert v["last_error"]["kind"] == "server" and v["last_error"]["at"].endswith("Z")
    assert v["latency"]["attempts"] == 1


async def test_a_user_gets_403_and_no_token_401(client: Any) -> None:
    me = await register(client)
    resp = await client.get("/api/v1/admin/vendors", headers=bearer(me["access_token"]))
    assert resp.status == 403 and await error_code(resp) == "FORBIDDEN"
    resp = await client.get("/api/v1/admin/vendors")
    assert resp.status == 401 and await error_code(resp) == "UNAUTHENTICATED"


async def test_the_route_is_in_the_openapi_document_with_its_schema(client: Any) -> None:
    doc = await (await client.get("/api/openapi.json")).json()
    op = doc["paths"]["/api/v1/admin/vendors"]["get"]
    assert "admin" in op["tags"] and {"200", "403"} <= set(op["responses"])
    assert "AdminVendor" in doc["components"]["schemas"]
