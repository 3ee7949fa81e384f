"""Helpers shared by the account tests: cheap argon2, a fake WeChat, sign-up in one call."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from server.config import Settings
from server.db import Conn, Database
from server.keys import db_key
from tests.fakes.wechat import FakeWeChat

PASSWORD = "s3cret-pass"
WECHAT_APPID = "wx-test-app"
WECHAT_SECRET = "wx-test-secret"
_phones = itertools.count(10_000_000)

# Cheap argon2 so a test can make many accounts; tests of the default cost say so.
FAST = {"argon2_time_cost": 1, "argon2_memory_kib": 8, "sms_resend_interval": 0}


def new_phone() -> str:
    return f"139{next(_phones):08d}"


def auth_settings(make_settings: Callable[..., Settings], **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        **FAST,
        "wechat_appid": WECHAT_APPID,
        "wechat_secret": WECHAT_SECRET,
        "wechat_api_base": "http://127.0.0.1:9",  # never the real WeChat: tests pass a fake's URL
    }
    values.update(overrides)
    return make_settings(**values)


def fake_wechat() -> FakeWeChat:
    return FakeWeChat(WECHAT_APPID, WECHAT_SECRET)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def sms_code(client: TestClient[Any, Any], phone: str, purpose: str) -> str:
    """Ask for a code as the app would, and read it as a developer would."""
    resp = await client.post("/api/v1/auth/sms-codes", json={"phone": phone, "purpose": purpose})
    assert resp.status == 202, await resp.text()
    sent = await (await client.get(f"/api/v1/dev/sms/{phone}")).json()
    assert sent["purpose"] == purpose
    return str(sent["code"])


async def register(
    client: TestClient[Any, Any],
    phone: str | None = None,
    *,
    password: str = PASSWORD,
    invite_code: str | None = None,
) -> dict[str, Any]:
    """Register a new account over HTTP; returns the 201 body (tokens and user)."""
    phone = phone or new_phone()
    body: dict[str, Any] = {
        "phone": phone,
        "password": password,
        "sms_code": await sms_code(client, phone, "register"),
    }
    if invite_code is not None:
        body["invite_code"] = invite_code
    resp = await client.post("/api/v1/auth/register", json=body)
    assert resp.status == 201, await resp.text()
    result: dict[str, Any] = await resp.json()
    result["phone"] = phone
    return result


async def login(client: TestClient[Any, Any], phone: str, password: str = PASSWORD) -> dict[str, Any]:
    resp = await client.post("/api/v1/auth/login", json={"phone": phone, "password": password})
    assert resp.status == 200, await resp.text()
    result: dict[str, Any] = await resp.json()
    return result


async def error_code(resp: Any) -> str:
    body = await resp.json()
    return str(body["error"]["code"])


class SqlCounter:
    """Counts every connection a Database hands out (each query or transaction takes one)."""

    def __init__(self, app: web.Application) -> None:
        self.count = 0
        db: Database = app[db_key]
        original = db.connection

        @asynccontextmanager
        async def counting() -> AsyncIterator[Conn]:
            self.count += 1
            async with original() as conn:
                yield conn

        db.connection = counting  # type: ignore[method-assign]
