"""Register, log in, refresh, log out, reset: /api/v1/auth/* as API.md writes them."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from server.config import Settings
from server.keys import auth_key, redis_key
from tests.auth_support import (
    PASSWORD,
    auth_settings,
    bearer,
    error_code,
    login,
    new_phone,
    register,
    sms_code,
)
from tests.conftest import Services

USER_KEYS = {
    "id",
    "phone",
    "nickname",
    "avatar_url",
    "gender",
    "role",
    "invite_code",
    "referrer_id",
    "profile_completed",
    "membership",
    "created_at",
}


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return auth_settings(make_settings)


def users_with_phone(services: Services, database: str, phone: str) -> list[dict[str, Any]]:
    return services.query(database, "SELECT * FROM users WHERE phone = %s", phone)


async def test_asking_for_an_sms_code_answers_202_and_the_dev_endpoint_shows_it(client: Any) -> None:
    resp = await client.post(
        "/api/v1/auth/sms-codes", json={"phone": "+86 138-0013-8000", "purpose": "login"}
    )
    assert resp.status == 202
    assert await resp.json() == {"retry_after": 0}
    sent = await (await client.get("/api/v1/dev/sms/13800138000")).json()
    assert sent["purpose"] == "login" and re.fullmatch(r"\d{6}", sent["code"])


async def test_with_sms_disabled_a_code_request_is_404_and_counts_against_no_limit(
    aiohttp_client: Any, settings: Settings
) -> None:
    from server.app import create_app

    app = create_app(settings.updated(sms_provider="disabled", sms_ip_limit=1))
    client = await aiohttp_client(app)
    for _ in range(3):  # past the per-IP limit of 1 and the 60 s resend interval: never 429
        resp = await client.post("/api/v1/auth/sms-codes", json={"phone": "13800138000", "purpose": "login"})
        assert resp.status == 404
        assert await error_code(resp) == "NOT_FOUND"
    assert await app[redis_key].keys("auth:sms:*") == []
    resp = await client.post("/api/v1/auth/login", json={"phone": "13800138000", "sms_code": "000000"})
    assert resp.status == 401 and await error_code(resp) == "INVALID_CREDENTIALS"


async def test_the_dev_endpoint_answers_404_for_a_phone_that_got_no_code(client: Any) -> None:
    resp = await client.get("/api/v1/dev/sms/13800138000")
    assert resp.status == 404
    assert await error_code(resp) == "NOT_FOUND"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"phone": "12345", "purpose": "login"}, "phone"),
        ({"phone": "13800138000", "purpose": "party"}, "purpose"),
        ({"purpose": "login"}, "phone"),
    ],
)
async def test_a_bad_sms_code_request_answers_422_naming_the_field(
    client: Any, body: dict[str, str], field: str
) -> None:
    resp = await client.post("/api/v1/auth/sms-codes", json=body)
    assert resp.status == 422
    fields = (await resp.json())["error"]["details"]["fields"]
    assert [f["field"] for f in fields] == [field]


async def test_register_answers_201_with_a_token_pair_and_the_user_as_api_md_writes_it(client: Any) -> None:
    result = await register(client, "13800138000")
    assert result["token_type"] == "Bearer"
    assert result["expires_in"] == 900 and result["refresh_expires_in"] == 604800
    assert result["is_new_user"] is True
    user = result["user"]
    assert set(user) == USER_KEYS
    assert user["phone"] == "138****8000"
    assert isinstance(user["id"], str) and user["id"].isdigit()
    assert user["role"] == "user" and user["gender"] == "unknown" and user["nickname"] is None
    assert user["profile_completed"] is False and user["membership"] is None and user["referrer_id"] is None
    assert re.fullmatch(r"[A-Z2-9]{6,}", user["invite_code"])
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z", user["created_at"])
    me = await client.get("/api/v1/me", headers=bearer(result["access_token"]))
    assert await me.json() == user


async def test_register_with_a_wrong_sms_code_answers_401_and_creates_nothing(
    client: Any, services: Services, database: str
) -> None:
    phone = new_phone()
    code = await sms_code(client, phone, "register")
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    resp = await client.post(
        "/api/v1/auth/register", json={"phone": phone, "password": PASSWORD, "sms_code": wrong}
    )
    assert resp.status == 401
    assert await error_code(resp) == "INVALID_CREDENTIALS"
    assert users_with_phone(services, database, phone) == []


async def test_a_code_for_another_purpose_does_not_register(client: Any) -> None:
    phone = new_phone()
    code = await sms_code(client, phone, "login")
    resp = await client.post(
        "/api/v1/auth/register", json={"phone": phone, "password": PASSWORD, "sms_code": code}
    )
    assert resp.status == 401


async def test_registering_a_taken_phone_answers_409_phone_taken(client: Any) -> None:
    phone = new_phone()
    await register(client, phone)
    code = await sms_code(client, phone, "register")
    resp = await client.post(
        "/api/v1/auth/register", json={"phone": phone, "password": PASSWORD, "sms_code": code}
    )
    assert resp.status == 409
    assert await error_code(resp) == "PHONE_TAKEN"


@pytest.mark.parametrize("password", ["short1", "lettersonly", "1234567890", "a1" * 40])
async def test_a_weak_password_answers_422(client: Any, password: str) -> None:
    resp = await client.post(
        "/api/v1/auth/register", json={"phone": new_phone(), "password": password, "sms_code": "123456"}
    )
    assert resp.status == 422
    assert [f["field"] for f in (await resp.json())["error"]["details"]["fields"]] == ["password"]


async def test_an_invite_code_in_any_case_sets_the_referrer(client: Any) -> None:
    referrer = await register(client)
    invited = await register(client, invite_code=referrer["user"]["invite_code"].lower())
    assert invited["user"]["referrer_id"] == referrer["user"]["id"]


@pytest.mark.parametrize("which", ["unknown", "past_the_encoder", "banned", "own"])
async def test_an_unusable_invite_code_answers_422_and_creates_nothing(
    client: Any, services: Services, database: str, which: str
) -> None:
    referrer = await register(client)
    code = referrer["user"]["invite_code"]
    phone = new_phone()
    if which == "unknown":
        code = "ZZZZZZZZ"
    elif which == "past_the_encoder":  # decodes to a number above 2**63 - 1 (was a 500)
        code = "9" * 23
    elif which == "banned":
        services.query(database, "UPDATE users SET status = 'banned' WHERE id = %s", referrer["user"]["id"])
    else:
        phone = referrer["phone"]
    sms = await sms_code(client, phone, "register")
    resp = await client.post(
        "/api/v1/auth/register",
        json={"phone": phone, "password": PASSWORD, "sms_code": sms, "invite_code": code},
    )
    assert resp.status == 422
    assert await error_code(resp) == "INVITE_CODE_INVALID"
    assert len(services.query(database, "SELECT id FROM users")) == 1


async def test_login_with_a_password_answers_the_pair_and_the_user(client: Any) -> None:
    account = await register(client)
    result = await login(client, account["phone"])
    assert result["user"] == account["user"]
    assert result["is_new_user"] is False
    assert result["refresh_token"] != account["refresh_token"]


async def test_a_wrong_password_and_an_unknown_phone_get_the_same_answer(client: Any) -> None:
    account = await register(client)
    wrong = await client.post("/api/v1/auth/login", json={"phone": account["phone"], "password": "nope-123"})
    unknown = await client.post("/api/v1/auth/login", json={"phone": new_phone(), "password": "nope-123"})
    assert wrong.status == unknown.status == 401
    a, b = (await wrong.json())["error"], (await unknown.json())["error"]
    assert a["code"] == b["code"] == "INVALID_CREDENTIALS"
    assert a["message"] == b["message"]


@pytest.mark.parametrize("body", [{"password": PASSWORD, "sms_code": "123456"}, {}, {"sms_code": "12ab56"}])
async def test_login_needs_exactly_one_of_password_and_sms_code(client: Any, body: dict[str, str]) -> None:
    resp = await client.post("/api/v1/auth/login", json={"phone": new_phone(), **body})
    assert resp.status == 422


async def test_sms_login_of_an_unknown_phone_registers_it_then_logs_it_in(
    client: Any, services: Services, database: str
) -> None:
    phone = new_phone()
    first = await client.post(
        "/api/v1/auth/login", json={"phone": phone, "sms_code": await sms_code(client, phone, "login")}
    )
    assert first.status == 200
    body = await first.json()
    assert body["is_new_user"] is True and body["user"]["phone"] == f"{phone[:3]}****{phone[-4:]}"
    again = await client.post(
        "/api/v1/auth/login", json={"phone": phone, "sms_code": await sms_code(client, phone, "login")}
    )
    assert (await again.json())["is_new_user"] is False
    assert len(users_with_phone(services, database, phone)) == 1


async def test_an_sms_code_works_once(client: Any) -> None:
    phone = new_phone()
    code = await sms_code(client, phone, "login")
    first = await client.post("/api/v1/auth/login", json={"phone": phone, "sms_code": code})
    second = await client.post("/api/v1/auth/login", json={"phone": phone, "sms_code": code})
    assert (first.status, second.status) == (200, 401)


async def test_a_banned_user_cannot_log_in(client: Any, services: Services, database: str) -> None:
    account = await register(client)
    services.query(database, "UPDATE users SET status = 'banned' WHERE id = %s", account["user"]["id"])
    resp = await client.post("/api/v1/auth/login", json={"phone": account["phone"], "password": PASSWORD})
    assert resp.status == 403
    assert await error_code(resp) == "FORBIDDEN"


async def refresh(client: Any, token: str) -> Any:
    return await client.post("/api/v1/auth/refresh", json={"refresh_token": token})


async def test_refresh_answers_a_new_pair_and_the_old_refresh_token_is_dead(client: Any) -> None:
    account = await register(client)
    resp = await refresh(client, account["refresh_token"])
    assert resp.status == 200
    pair = await resp.json()
    assert set(pair) == {"access_token", "refresh_token", "token_type", "expires_in", "refresh_expires_in"}
    assert pair["refresh_token"] != account["refresh_token"]
    me = await client.get("/api/v1/me", headers=bearer(pair["access_token"]))
    assert me.status == 200
    again = await refresh(client, pair["refresh_token"])
    assert again.status == 200


async def test_reusing_a_rotated_refresh_token_revokes_the_whole_session(
    client: Any, services: Services, database: str
) -> None:
    account = await register(client)
    newer = await (await refresh(client, account["refresh_token"])).json()
    reuse = await refresh(client, account["refresh_token"])
    assert reuse.status == 401
    assert await error_code(reuse) == "TOKEN_REVOKED"
    after = await refresh(client, newer["refresh_token"])
    assert after.status == 401
    assert await error_code(after) == "TOKEN_REVOKED"
    rows = services.query(database, "SELECT revoke_reason, rotations FROM auth_sessions")
    assert rows == [{"revoke_reason": "reuse", "rotations": 1}]


async def test_a_reused_token_ends_only_its_own_session(client: Any) -> None:
    account = await register(client)
    other = await login(client, account["phone"])
    await refresh(client, account["refresh_token"])
    await refresh(client, account["refresh_token"])
    assert (await refresh(client, other["refresh_token"])).status == 200


@pytest.mark.parametrize("token", ["garbage", "a" * 32 + "." + "b" * 43, ""])
async def test_a_token_that_is_not_ours_answers_401_unauthenticated(client: Any, token: str) -> None:
    resp = await refresh(client, token)
    assert resp.status == 422 if token == "" else 401
    if token:
        assert await error_code(resp) == "UNAUTHENTICATED"


async def test_an_expired_refresh_token_answers_token_expired(
    client: Any, app: Any, services: Services, database: str
) -> None:
    account = await register(client)
    sid = account["refresh_token"].split(".")[0]
    services.query(database, "UPDATE auth_sessions SET expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND")
    await app[auth_key].sessions.forget([sid])  # what Redis's TTL does at that moment
    resp = await refresh(client, account["refresh_token"])
    assert resp.status == 401
    assert await error_code(resp) == "TOKEN_EXPIRED"


async def test_logout_ends_that_session_and_is_idempotent(client: Any) -> None:
    account = await register(client)
    other = await login(client, account["phone"])
    resp = await client.post("/api/v1/auth/logout", json={"refresh_token": account["refresh_token"]})
    assert resp.status == 204
    assert await error_code(await refresh(client, account["refresh_token"])) == "TOKEN_REVOKED"
    again = await client.post("/api/v1/auth/logout", json={"refresh_token": account["refresh_token"]})
    assert again.status == 204
    assert (await refresh(client, other["refresh_token"])).status == 200


async def test_logout_all_ends_every_session_of_the_user(client: Any) -> None:
    account = await register(client)
    other = await login(client, account["phone"])
    resp = await client.post("/api/v1/auth/logout-all", headers=bearer(other["access_token"]))
    assert resp.status == 204
    for token in (account["refresh_token"], other["refresh_token"]):
        assert await error_code(await refresh(client, token)) == "TOKEN_REVOKED"


async def test_logout_all_without_a_token_answers_401(client: Any) -> None:
    resp = await client.post("/api/v1/auth/logout-all")
    assert resp.status == 401
    assert await error_code(resp) == "UNAUTHENTICATED"


async def test_a_password_reset_sets_the_new_password_and_ends_every_session(client: Any) -> None:
    account = await register(client)
    phone = account["phone"]
    code = await sms_code(client, phone, "reset_password")
    resp = await client.post(
        "/api/v1/auth/password/reset", json={"phone": phone, "sms_code": code, "new_password": "n3w-password"}
    )
    assert resp.status == 204
    assert await error_code(await refresh(client, account["refresh_token"])) == "TOKEN_REVOKED"
    old = await client.post("/api/v1/auth/login", json={"phone": phone, "password": PASSWORD})
    assert old.status == 401
    await login(client, phone, "n3w-password")


async def test_a_password_reset_with_a_wrong_code_answers_401(client: Any) -> None:
    account = await register(client)
    resp = await client.post(
        "/api/v1/auth/password/reset",
        json={"phone": account["phone"], "sms_code": "000000", "new_password": "n3w-password"},
    )
    assert resp.status == 401
    assert await error_code(resp) == "INVALID_CREDENTIALS"


async def test_a_password_reset_for_an_unknown_phone_answers_401(client: Any) -> None:
    phone = new_phone()
    code = await sms_code(client, phone, "reset_password")
    resp = await client.post(
        "/api/v1/auth/password/reset", json={"phone": phone, "sms_code": code, "new_password": "n3w-password"}
    )
    assert resp.status == 401


async def test_sessions_are_recorded_for_audit(client: Any, services: Services, database: str) -> None:
    account = await register(client, password=PASSWORD)
    await login(client, account["phone"])
    rows = services.query(database, "SELECT method, ip, revoked_at FROM auth_sessions ORDER BY created_at")
    assert [r["method"] for r in rows] == ["register", "password"]
    assert all(r["ip"] == "127.0.0.1" and r["revoked_at"] is None for r in rows)


NASTY_BODIES: list[Any] = [
    [],
    "text",
    42,
    None,
    {"phone": None},
    {"phone": ["13800138000"]},
    {"phone": "1" * 10_000, "password": "x" * 10_000},
    {"phone": "13800138000", "password": {"$gt": ""}, "sms_code": 123456},
    {"phone": "１３８００１３８０００", "sms_code": "１２３４５６"},
    {"refresh_token": "x" * 600},
    {"refresh_token": "\u0000" * 40},
    {"code": ""},
    {"code": "\ud800"},
    {"phone": "13800138000", "purpose": "login", "invite_code": "'; DROP TABLE users; --"},
]
AUTH_POSTS = [
    "/api/v1/auth/sms-codes",
    "/api/v1/auth/register",
    "/api/v1/auth/login",
    "/api/v1/auth/wechat",
    "/api/v1/auth/refresh",
    "/api/v1/auth/logout",
    "/api/v1/auth/password/reset",
]


@pytest.mark.parametrize("path", AUTH_POSTS)
async def test_bad_input_always_gets_the_envelope_never_a_500(client: Any, path: str) -> None:
    for body in NASTY_BODIES:
        resp = await client.post(path, json=body)
        assert resp.status < 500 or resp.status == 502, (path, body, resp.status)
        if resp.status >= 400:
            assert set((await resp.json())["error"]) == {"code", "message", "request_id", "details"}
    raw = await client.post(path, data=b"\xff\xfe{", headers={"Content-Type": "application/json"})
    assert raw.status == 400
