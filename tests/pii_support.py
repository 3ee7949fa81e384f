"""Helpers of the distributor and personal-data tests: valid ID numbers, an admin with
`pii:read`, applications over HTTP."""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

from aiohttp.test_utils import TestClient

from server.config import Settings
from server.pii.identity import make_id
from tests.auth_support import bearer, login, register
from tests.conftest import run_command

ADMIN_PHONE = "13900000019"
_serials = itertools.count(100)


def new_id(born: dt.date = dt.date(1990, 3, 7)) -> str:
    """A valid, unused ID number of an adult (serials never repeat in a session)."""
    n = next(_serials)
    return make_id(born, region=f"{110101 + n // 1000}", serial=f"{n % 1000:03d}")


async def user(client: TestClient[Any, Any], **kw: Any) -> tuple[dict[str, str], int, dict[str, Any]]:
    body = await register(client, **kw)
    return bearer(body["access_token"]), int(body["user"]["id"]), body


async def apply(
    client: TestClient[Any, Any], who: dict[str, str], name: str, number: str, expect: int = 201
) -> dict[str, Any]:
    resp = await client.post(
        "/api/v1/distributors/apply", json={"real_name": name, "id_card_no": number}, headers=who
    )
    assert resp.status == expect, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def admin_with(client: TestClient[Any, Any], settings: Settings, *perms: str) -> dict[str, str]:
    """The ADMIN_PHONE admin, granted `perms` through run.py, freshly logged in."""
    for perm in perms:
        code, out = await run_command(settings, "grant", "--phone", ADMIN_PHONE, "--permission", perm)
        assert code == 0, out
    return bearer((await login(client, ADMIN_PHONE))["access_token"])


async def approve(client: TestClient[Any, Any], admin: dict[str, str], user_id: int) -> dict[str, Any]:
    resp = await client.post(f"/api/v1/admin/distributors/{user_id}/approve", json={}, headers=admin)
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body
