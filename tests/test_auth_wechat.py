"""WeChat mini-program login against a local fake jscode2session, and phone binding."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from server.app import create_app
from server.config import Settings
from tests.auth_support import (
    auth_settings,
    bearer,
    error_code,
    fake_wechat,
    new_phone,
    register,
    sms_code,
)
from tests.conftest import Services
from tests.fakes.wechat import FakeWeChat


@pytest.fixture
def wechat() -> FakeWeChat:
    return fake_wechat()


@pytest.fixture
async def wechat_server(aiohttp_server: Any, wechat: FakeWeChat) -> TestServer:
    server: TestServer = await aiohttp_server(wechat.app())
    return server


@pytest.fixture
def settings(make_settings: Callable[..., Settings], wechat_server: TestServer) -> Settings:
    return auth_settings(make_settings, wechat_api_base=str(wechat_server.make_url("/")))


async def wx_login(client: Any, code: str) -> Any:
    return await client.post("/api/v1/auth/wechat", json={"code": code})


async def test_a_new_openid_creates_an_account_and_says_so(
    client: Any, wechat: FakeWeChat, services: Services, database: str
) -> None:
    resp = await wx_login(client, wechat.issue("o-alice", unionid="u-alice"))
    assert resp.status == 200
    body = await resp.json()
    assert body["is_new_user"] is True
    assert body["user"]["phone"] is None and body["token_type"] == "Bearer"
    assert "session_key" not in str(body)
    rows = services.query(database, "SELECT wechat_openid, wechat_unionid, invite_code FROM users")
    assert rows == [
        {"wechat_openid": "o-alice", "wechat_unionid": "u-alice", "invite_code": body["user"]["invite_code"]}
    ]
    me = await client.get("/api/v1/me", headers=bearer(body["access_token"]))
    assert me.status == 200


async def test_the_same_openid_logs_into_the_same_account(client: Any, wechat: FakeWeChat) -> None:
    first = await (await wx_login(client, wechat.issue("o-bob"))).json()
    second = await (await wx_login(client, wechat.issue("o-bob", unionid="u-bob"))).json()
    assert second["is_new_user"] is False
    assert second["user"]["id"] == first["user"]["id"]


async def test_the_session_key_is_never_stored(
    client: Any, wechat: FakeWeChat, services: Services, database: str
) -> None:
    await wx_login(client, wechat.issue("o-carol"))
    columns = services.query(
        database, "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s", database
    )
    assert not any("session_key" in c["COLUMN_NAME"] for c in columns)


@pytest.mark.parametrize(
    ("errcode", "status", "code"),
    [
        (40029, 401, "INVALID_CREDENTIALS"),
        (40163, 401, "INVALID_CREDENTIALS"),
        (45011, 429, "RATE_LIMITED"),
        (-1, 502, "UPSTREAM_FAILED"),
        (40226, 502, "UPSTREAM_FAILED"),
    ],
)
async def test_wechat_errors_map_to_api_codes(
    client: Any, wechat: FakeWeChat, errcode: int, status: int, code: str
) -> None:
    wechat.fail_next(errcode)
    resp = await wx_login(client, wechat.issue())
    assert resp.status == status
    assert await error_code(resp) == code
    if status == 429:
        assert int(resp.headers["Retry-After"]) >= 1


async def test_an_unknown_and_a_used_code_answer_401(client: Any, wechat: FakeWeChat) -> None:
    assert (await wx_login(client, "never-issued")).status == 401
    code = wechat.issue()
    assert (await wx_login(client, code)).status == 200
    again = await wx_login(client, code)
    assert again.status == 401
    assert await error_code(again) == "INVALID_CREDENTIALS"


async def test_a_wrong_app_secret_answers_502(
    aiohttp_client: Any, make_settings: Callable[..., Settings], wechat_server: TestServer, wechat: FakeWeChat
) -> None:
    settings = auth_settings(
        make_settings, wechat_api_base=str(wechat_server.make_url("/")), wechat_secret="not-the-secret"
    )
    client = await aiohttp_client(create_app(settings))
    resp = await wx_login(client, wechat.issue())
    assert resp.status == 502
    assert (await resp.json())["error"]["details"] == {"errcode": 40125}


async def test_a_wechat_that_does_not_answer_in_time_gives_502(
    aiohttp_client: Any, make_settings: Callable[..., Settings], wechat_server: TestServer, wechat: FakeWeChat
) -> None:
    settings = auth_settings(
        make_settings, wechat_api_base=str(wechat_server.make_url("/")), wechat_timeout=0.2
    )
    client = await aiohttp_client(create_app(settings))
    wechat.hold()
    resp = await wx_login(client, wechat.issue())
    assert resp.status == 502
    assert await error_code(resp) == "UPSTREAM_FAILED"


async def test_an_unconfigured_wechat_login_answers_502(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    client = await aiohttp_client(create_app(make_settings()))
    resp = await wx_login(client, "any")
    assert resp.status == 502


async def test_a_banned_wechat_user_cannot_log_in(
    client: Any, wechat: FakeWeChat, services: Services, database: str
) -> None:
    await wx_login(client, wechat.issue("o-dave"))
    services.query(database, "UPDATE users SET status = 'banned' WHERE wechat_openid = 'o-dave'")
    resp = await wx_login(client, wechat.issue("o-dave"))
    assert resp.status == 403


async def bind(client: Any, token: str, phone: str, code: str) -> Any:
    return await client.post(
        "/api/v1/me/phone", json={"phone": phone, "sms_code": code}, headers=bearer(token)
    )


async def test_a_wechat_account_binds_a_free_phone_with_a_register_code(
    client: Any, wechat: FakeWeChat
) -> None:
    account = await (await wx_login(client, wechat.issue())).json()
    phone = new_phone()
    resp = await bind(client, account["access_token"], phone, await sms_code(client, phone, "register"))
    assert resp.status == 200
    assert (await resp.json())["phone"] == f"{phone[:3]}****{phone[-4:]}"
    sms = await client.post(
        "/api/v1/auth/login", json={"phone": phone, "sms_code": await sms_code(client, phone, "login")}
    )
    assert (await sms.json())["user"]["id"] == account["user"]["id"]
    other = new_phone()
    again = await bind(client, account["access_token"], other, await sms_code(client, other, "register"))
    assert again.status == 409
    assert await error_code(again) == "CONFLICT"


async def test_binding_a_phone_that_has_an_account_answers_phone_taken_and_merges_nothing(
    client: Any, wechat: FakeWeChat, services: Services, database: str
) -> None:
    existing = await register(client)
    account = await (await wx_login(client, wechat.issue())).json()
    code = await sms_code(client, existing["phone"], "register")
    resp = await bind(client, account["access_token"], existing["phone"], code)
    assert resp.status == 409
    assert await error_code(resp) == "PHONE_TAKEN"
    assert len(services.query(database, "SELECT id FROM users")) == 2


async def test_binding_with_a_wrong_code_answers_401(client: Any, wechat: FakeWeChat) -> None:
    account = await (await wx_login(client, wechat.issue())).json()
    resp = await bind(client, account["access_token"], new_phone(), "123456")
    assert resp.status == 401
