"""Operators on accounts: list and search, ban and unban, role changes; the startup admin."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from server.app import create_app
from server.config import Settings
from tests.auth_support import PASSWORD, auth_settings, bearer, error_code, login, register
from tests.conftest import Services

ADMIN_PHONE = "13900000009"


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return auth_settings(make_settings, admin_phone=ADMIN_PHONE, admin_password=PASSWORD)


@pytest.fixture
async def admin(client: Any) -> dict[str, str]:
    result = await login(client, ADMIN_PHONE)
    return bearer(result["access_token"])


async def test_the_startup_admin_logs_in_with_a_complete_user(client: Any) -> None:
    result = await login(client, ADMIN_PHONE)
    user = result["user"]
    assert user["role"] == "admin" and user["phone"] == "139****0009" and user["invite_code"]


async def test_an_existing_user_named_as_admin_phone_becomes_admin_at_once(
    aiohttp_client: Any, settings: Settings, services: Services, database: str
) -> None:
    first = await aiohttp_client(create_app(auth_settings_without_admin(settings)))
    account = await register(first, "13900000009")
    me = await first.get("/api/v1/me", headers=bearer(account["access_token"]))
    assert (await me.json())["role"] == "user"  # now cached as a plain user
    second = await aiohttp_client(create_app(settings))
    relogged = await login(second, "13900000009")
    assert relogged["user"]["role"] == "admin"


def auth_settings_without_admin(settings: Settings) -> Settings:
    return settings.updated(admin_phone=None, admin_password=None)


async def test_users_are_listed_newest_first_in_pages(client: Any, admin: dict[str, str]) -> None:
    made = [await register(client) for _ in range(3)]
    first = await (await client.get("/api/v1/admin/users?limit=2", headers=admin)).json()
    assert [u["id"] for u in first["items"]] == [made[2]["user"]["id"], made[1]["user"]["id"]]
    assert first["items"][0]["status"] == "active" and first["items"][0]["has_password"] is True
    rest = await (
        await client.get(f"/api/v1/admin/users?limit=2&cursor={first['next_cursor']}", headers=admin)
    ).json()
    assert [u["id"] for u in rest["items"]] == [made[0]["user"]["id"], rest["items"][1]["id"]]
    assert rest["items"][1]["role"] == "admin" and rest["next_cursor"] is None


async def test_users_are_found_by_phone_id_or_nickname(client: Any, admin: dict[str, str]) -> None:
    alice = await register(client, "13712345678")
    await client.patch("/api/v1/me", json={"nickname": "Alice_100%"}, headers=bearer(alice["access_token"]))
    await register(client)

    async def search(q: str) -> list[str]:
        resp = await client.get("/api/v1/admin/users", params={"q": q}, headers=admin)
        assert resp.status == 200
        return [u["id"] for u in (await resp.json())["items"]]

    assert await search("13712345678") == [alice["user"]["id"]]
    assert await search("+86 137-1234") == [alice["user"]["id"]]
    assert await search(alice["user"]["id"]) == [alice["user"]["id"]]
    assert await search("ice_100%") == [alice["user"]["id"]]
    assert await search("ice_1000") == []


async def test_users_are_filtered_by_role_and_status(client: Any, admin: dict[str, str]) -> None:
    await register(client)
    admins = await (await client.get("/api/v1/admin/users?role=admin", headers=admin)).json()
    assert [u["role"] for u in admins["items"]] == ["admin"]
    bad = await client.get("/api/v1/admin/users?status=gone", headers=admin)
    assert bad.status == 422


async def test_a_ban_ends_sessions_refuses_login_and_refresh_and_shows_at_once(
    client: Any, admin: dict[str, str]
) -> None:
    account = await register(client)
    uid = account["user"]["id"]
    token = bearer(account["access_token"])
    assert (await client.get("/api/v1/me", headers=token)).status == 200  # cached
    resp = await client.post(f"/api/v1/admin/users/{uid}/ban", json={"reason": "spam"}, headers=admin)
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "banned" and body["ban_reason"] == "spam" and body["banned_at"].endswith("Z")
    refresh = await client.post("/api/v1/auth/refresh", json={"refresh_token": account["refresh_token"]})
    assert refresh.status == 403
    assert await error_code(refresh) == "FORBIDDEN"
    relogin = await client.post("/api/v1/auth/login", json={"phone": account["phone"], "password": PASSWORD})
    assert relogin.status == 403
    assert (await client.get("/api/v1/me", headers=token)).status == 403
    unban = await client.post(f"/api/v1/admin/users/{uid}/unban", headers=admin)
    assert (await unban.json())["status"] == "active"
    await login(client, account["phone"])


async def test_demoting_an_admin_ends_their_sessions(client: Any, admin: dict[str, str]) -> None:
    account = await register(client)
    uid = account["user"]["id"]
    await client.post(f"/api/v1/admin/users/{uid}/role", json={"role": "admin"}, headers=admin)
    promoted = await login(client, account["phone"])
    assert promoted["user"]["role"] == "admin"
    resp = await client.post(f"/api/v1/admin/users/{uid}/role", json={"role": "user"}, headers=admin)
    assert (await resp.json())["role"] == "user"
    refresh = await client.post("/api/v1/auth/refresh", json={"refresh_token": promoted["refresh_token"]})
    assert await error_code(refresh) == "TOKEN_REVOKED"


async def test_an_admin_cannot_ban_or_demote_themselves(client: Any) -> None:
    result = await login(client, ADMIN_PHONE)
    uid, token = result["user"]["id"], bearer(result["access_token"])
    ban = await client.post(f"/api/v1/admin/users/{uid}/ban", json={}, headers=token)
    assert ban.status == 409 and await error_code(ban) == "CONFLICT"
    demote = await client.post(f"/api/v1/admin/users/{uid}/role", json={"role": "user"}, headers=token)
    assert demote.status == 409


@pytest.mark.parametrize("path", ["/api/v1/admin/users/999999", "/api/v1/admin/users/abc"])
async def test_an_unknown_user_answers_404(client: Any, admin: dict[str, str], path: str) -> None:
    assert (await client.get(path, headers=admin)).status == 404
    assert (await client.post(f"{path}/ban", json={}, headers=admin)).status == 404
    assert (await client.post(f"{path}/unban", headers=admin)).status == 404


async def test_a_bad_role_answers_422(client: Any, admin: dict[str, str]) -> None:
    account = await register(client)
    resp = await client.post(
        f"/api/v1/admin/users/{account['user']['id']}/role", json={"role": "root"}, headers=admin
    )
    assert resp.status == 422


async def test_one_user_is_shown_with_ban_details(client: Any, admin: dict[str, str]) -> None:
    account = await register(client)
    resp = await client.get(f"/api/v1/admin/users/{account['user']['id']}", headers=admin)
    body = await resp.json()
    assert body["id"] == account["user"]["id"] and body["banned_at"] is None and body["has_wechat"] is False


async def test_the_dev_endpoint_does_not_exist_in_prod(
    aiohttp_client: Any, make_prod_settings: Callable[..., Settings]
) -> None:
    client = await aiohttp_client(create_app(make_prod_settings()))
    resp = await client.get("/api/v1/dev/sms/13800138000")
    assert resp.status == 404
    doc = await (await client.get("/api/openapi.json")).json()
    assert not any(p.startswith("/api/v1/dev") for p in doc["paths"])
    assert "/api/v1/auth/login" in doc["paths"]
    assert doc["paths"]["/api/v1/admin/users"]["get"]["security"] == [{"bearerAuth": []}]
    assert doc["paths"]["/api/v1/auth/login"]["post"]["security"] == []


@pytest.mark.parametrize("raw", ["²", "１２", "9" * 25, "9" * 5000, "-1", "0x10"])
async def test_odd_user_ids_in_admin_paths_and_search_are_404_or_empty_never_500(
    client: Any, admin: dict[str, str], raw: str
) -> None:
    from urllib.parse import quote

    for method, path, body in [
        ("GET", f"/api/v1/admin/users/{quote(raw)}", None),
        ("POST", f"/api/v1/admin/users/{quote(raw)}/quota", {"amount": 5, "reason": "odd id"}),
    ]:
        resp = await client.request(method, path, json=body, headers=admin)
        assert resp.status == 404, (path, resp.status)
        assert await error_code(resp) == "NOT_FOUND"
    found = await client.get(f"/api/v1/admin/users?q={quote(raw)}", headers=admin)
    if len(raw) > 100:
        assert found.status == 422  # longer than a search may be
    elif raw in ("²", "１２"):  # digits to str.isdigit, not to int(): a nickname search
        assert found.status == 200 and (await found.json())["items"] == []
    else:
        assert found.status == 200
