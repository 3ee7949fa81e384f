"""The credits API: GET /me/quota, the ledger, and the admin adjustment."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from actors.user import UserActor
from server.app import create_app
from server.config import Settings
from server.credits.ledger import Confirm, Grant, Reserve
from server.keys import actor_system_key
from tests.auth_support import auth_settings, bearer, error_code, register
from tests.conftest import Services


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return auth_settings(
        make_settings, cron_enabled=False, admin_phone="13900000001", admin_password="admin-pass-1"
    )


async def admin_token(client: Any) -> str:
    resp = await client.post("/api/v1/auth/login", json={"phone": "13900000001", "password": "admin-pass-1"})
    assert resp.status == 200, await resp.text()
    return str((await resp.json())["access_token"])


async def test_a_new_user_has_zero_credits(client: Any) -> None:
    me = await register(client)
    resp = await client.get("/api/v1/me/quota", headers=bearer(me["access_token"]))
    assert resp.status == 200
    assert await resp.json() == {"balance": 0, "reserved": 0, "available": 0}


async def test_the_ledger_lists_every_change_newest_first_in_pages(client: Any, app: web.Application) -> None:
    me = await register(client)
    uid = int(me["user"]["id"])
    u = app[actor_system_key].ref(UserActor, uid)
    await u.ask(Grant(100, "grant", ref="welcome", reason="welcome gift"))
    await u.ask(Reserve("task-1", 30, ttl=60))
    await u.ask(Confirm("task-1"))
    resp = await client.get("/api/v1/me/quota", headers=bearer(me["access_token"]))
    assert await resp.json() == {"balance": 70, "reserved": 0, "available": 70}

    resp = await client.get("/api/v1/me/quota/ledger?limit=2", headers=bearer(me["access_token"]))
    page = await resp.json()
    assert [(e["kind"], e["amount"], e["balance_after"]) for e in page["items"]] == [
        ("confirm", -30, 70),
        ("reserve", -30, 100),
    ]
    assert page["items"][0]["task_id"] == "task-1"
    assert page["items"][1]["available_after"] == 70
    resp = await client.get(
        f"/api/v1/me/quota/ledger?limit=2&cursor={page['next_cursor']}", headers=bearer(me["access_token"])
    )
    rest = await resp.json()
    assert [(e["kind"], e["amount"]) for e in rest["items"]] == [("grant", 100)]
    assert rest["next_cursor"] is None


async def test_a_bad_cursor_or_limit_answers_422(client: Any) -> None:
    me = await register(client)
    deep = base64.urlsafe_b64encode(b"[" * 5000).decode().rstrip("=")  # nested past the recursion limit
    for query in ("limit=0", "limit=101", "cursor=not-ours", f"cursor={deep}"):
        resp = await client.get(f"/api/v1/me/quota/ledger?{query}", headers=bearer(me["access_token"]))
        assert resp.status == 422, query
        assert await error_code(resp) == "VALIDATION_FAILED"


async def test_quota_needs_a_token(client: Any) -> None:
    resp = await client.get("/api/v1/me/quota")
    assert resp.status == 401
    assert await error_code(resp) == "UNAUTHENTICATED"


async def test_an_admin_adjusts_credits_with_a_reason_but_never_below_zero_available(client: Any) -> None:
    me = await register(client)
    uid = me["user"]["id"]
    token = await admin_token(client)
    resp = await client.post(
        f"/api/v1/admin/users/{uid}/quota", json={"amount": 50, "reason": "goodwill"}, headers=bearer(token)
    )
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"balance": 50, "reserved": 0, "available": 50}
    resp = await client.post(
        f"/api/v1/admin/users/{uid}/quota", json={"amount": -60, "reason": "oops"}, headers=bearer(token)
    )
    assert resp.status == 402
    assert await error_code(resp) == "QUOTA_INSUFFICIENT"
    resp = await client.post(
        f"/api/v1/admin/users/{uid}/quota", json={"amount": -50, "reason": "reset"}, headers=bearer(token)
    )
    assert await resp.json() == {"balance": 0, "reserved": 0, "available": 0}
    ledger = await (await client.get("/api/v1/me/quota/ledger", headers=bearer(me["access_token"]))).json()
    assert [(e["kind"], e["amount"]) for e in ledger["items"]] == [("adjust", -50), ("adjust", 50)]
    assert ledger["items"][0]["reason"].startswith("reset (by admin ")


async def test_an_adjustment_under_an_idempotency_key_is_applied_once_across_two_instances(
    client: Any, aiohttp_client: Any, settings: Settings, services: Services, database: str
) -> None:
    client2 = await aiohttp_client(create_app(settings))  # a second instance, same MariaDB and Redis
    me = await register(client)
    uid = me["user"]["id"]
    admin = bearer(await admin_token(client))

    async def adjust(c: Any, amount: int, key: str | None, reason: str = "goodwill", user: Any = uid) -> Any:
        headers = admin if key is None else {**admin, "Idempotency-Key": key}
        resp = await c.post(
            f"/api/v1/admin/users/{user}/quota", json={"amount": amount, "reason": reason}, headers=headers
        )
        return resp.status, await resp.json()

    # A retried click: 12 at once over both instances, one adjustment.
    answers = await asyncio.gather(*(adjust((client, client2)[i % 2], 40, "grant-1") for i in range(12)))
    assert {status for status, _ in answers} == {200}, answers
    rows = services.query(
        database, "SELECT balance_delta FROM quota_ledger WHERE user_id = %s AND kind = 'adjust'", uid
    )
    assert [int(r["balance_delta"]) for r in rows] == [40]
    assert (await adjust(client2, 40, "grant-1"))[1] == {"balance": 40, "reserved": 0, "available": 40}

    # The same key with another amount, reason or user: 409, nothing written.
    other = (await register(client))["user"]["id"]
    for amount, reason, user in ((41, "goodwill", uid), (40, "bonus", uid), (40, "goodwill", other)):
        status, body = await adjust(client, amount, "grant-1", reason, user)
        assert status == 409 and body["error"]["code"] == "IDEMPOTENCY_CONFLICT", body
    assert (
        services.query(database, "SELECT COUNT(*) AS n FROM quota_ledger WHERE kind = 'adjust'")[0]["n"] == 1
    )

    # A refused one writes nothing, so its key is still free; another key is another adjustment.
    status, body = await adjust(client, -50, "take-1")
    assert status == 402 and body["error"]["code"] == "QUOTA_INSUFFICIENT"
    assert (await adjust(client, -30, "take-1"))[1]["balance"] == 10
    assert (await adjust(client2, 5, None))[1]["balance"] == 15  # no key: applied each time
    assert (await adjust(client2, 5, None))[1]["balance"] == 20
    status, body = await adjust(client, 5, "x" * 129)
    assert status == 422 and body["error"]["details"]["fields"][0]["field"] == "header.Idempotency-Key"
    assert (await (await client.get("/api/v1/me/quota", headers=bearer(me["access_token"]))).json())[
        "balance"
    ] == 20


async def test_an_adjustment_validates_its_body_and_its_user(client: Any) -> None:
    me = await register(client)
    token = await admin_token(client)
    uid = me["user"]["id"]
    resp = await client.post(
        f"/api/v1/admin/users/{uid}/quota", json={"amount": 0, "reason": " "}, headers=bearer(token)
    )
    assert resp.status == 422
    fields = {f["field"] for f in (await resp.json())["error"]["details"]["fields"]}
    assert fields == {"amount", "reason"}
    resp = await client.post(
        "/api/v1/admin/users/999999/quota", json={"amount": 5, "reason": "x"}, headers=bearer(token)
    )
    assert resp.status == 404
    resp = await client.post(
        f"/api/v1/admin/users/{uid}/quota",
        json={"amount": 5, "reason": "x"},
        headers=bearer(me["access_token"]),
    )
    assert resp.status == 403


async def test_sign_up_credits_are_granted_once_through_the_ledger(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    from server.credits.ledger import check_all
    from server.keys import db_key

    app = create_app(auth_settings(make_settings, cron_enabled=False, signup_credits=20))
    client = await aiohttp_client(app)
    me = await register(client)
    resp = await client.get("/api/v1/me/quota", headers=bearer(me["access_token"]))
    assert await resp.json() == {"balance": 20, "reserved": 0, "available": 20}
    ledger = await (await client.get("/api/v1/me/quota/ledger", headers=bearer(me["access_token"]))).json()
    assert [(e["kind"], e["amount"], e["reason"]) for e in ledger["items"]] == [
        ("grant", 20, "sign-up credits")
    ]
    _, problems = await check_all(app[db_key])
    assert problems == []
