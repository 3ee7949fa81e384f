"""Fixtures and helpers shared by the Alipay and refund tests: both fake gateways, one
app configured for both on two instances (sharing MariaDB and Redis), an admin.

A test module takes the fixtures by naming them at module level."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from server.app import create_app
from server.config import Settings
from tests.auth_support import PASSWORD, auth_settings, bearer, fake_wechat, login, register
from tests.conftest import Services, run_command
from tests.fakes.alipay import AlipayKeys, FakeAlipay
from tests.fakes.wechat import FakeWeChat
from tests.fakes.wechatpay import FakeWeChatPay, Keys

ADMIN_PHONE = "13900000009"
_keys = itertools.count()


@pytest.fixture(scope="session")
def wx_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys.generate(tmp_path_factory.mktemp("wechatpay"))


@pytest.fixture(scope="session")
def ali_keys(tmp_path_factory: pytest.TempPathFactory) -> AlipayKeys:
    return AlipayKeys.generate(tmp_path_factory.mktemp("alipay"))


@pytest.fixture
async def wxpay_gateway(aiohttp_server: Any, wx_keys: Keys) -> tuple[FakeWeChatPay, str]:
    fake = FakeWeChatPay(wx_keys)
    server: TestServer = await aiohttp_server(fake.app())
    return fake, str(server.make_url("")).rstrip("/")


@pytest.fixture
async def alipay_gateway(aiohttp_server: Any, ali_keys: AlipayKeys) -> tuple[FakeAlipay, str]:
    fake = FakeAlipay(ali_keys)
    server: TestServer = await aiohttp_server(fake.app())
    return fake, str(server.make_url("/gateway.do"))


@pytest.fixture
def wxpay(wxpay_gateway: tuple[FakeWeChatPay, str]) -> FakeWeChatPay:
    return wxpay_gateway[0]


@pytest.fixture
def alipay(alipay_gateway: tuple[FakeAlipay, str]) -> FakeAlipay:
    return alipay_gateway[0]


@pytest.fixture
async def wechat_server(aiohttp_server: Any) -> tuple[FakeWeChat, str]:
    """The fake WeChat login API (jscode2session): accounts that can pay by JSAPI."""
    wechat = fake_wechat()
    server: TestServer = await aiohttp_server(wechat.app())
    return wechat, str(server.make_url("/"))


@pytest.fixture
def settings(
    make_settings: Callable[..., Settings],
    wx_keys: Keys,
    ali_keys: AlipayKeys,
    wxpay_gateway: tuple[FakeWeChatPay, str],
    alipay_gateway: tuple[FakeAlipay, str],
    wechat_server: tuple[FakeWeChat, str],
) -> Settings:
    both = {**wx_keys.settings(wxpay_gateway[1]), **ali_keys.settings(alipay_gateway[1])}
    return auth_settings(
        make_settings,
        cron_enabled=False,
        admin_phone=ADMIN_PHONE,
        admin_password=PASSWORD,
        wechat_api_base=wechat_server[1],
        **both,
    )


@pytest.fixture
async def client2(aiohttp_client: Any, settings: Settings) -> TestClient[Any, Any]:
    """A second instance on the same MariaDB and Redis."""
    client: TestClient[Any, Any] = await aiohttp_client(create_app(settings))
    return client


@pytest.fixture
async def admin(client: TestClient[Any, Any]) -> dict[str, str]:
    return bearer((await login(client, ADMIN_PHONE))["access_token"])


async def buyer(client: TestClient[Any, Any]) -> dict[str, str]:
    return bearer((await register(client))["access_token"])


async def order(
    client: TestClient[Any, Any],
    who: dict[str, str],
    product_id: str = "credits-100",
    channel: str = "alipay_qr",
    key: str | None = None,
) -> dict[str, Any]:
    """A new order (201), under `key` or a fresh Idempotency-Key."""
    resp = await client.post(
        "/api/v1/orders",
        json={"product_id": product_id, "channel": channel},
        headers={**who, "Idempotency-Key": key or f"k{next(_keys)}"},
    )
    assert resp.status == 201, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def quota(client: TestClient[Any, Any], who: dict[str, str]) -> dict[str, int]:
    body: dict[str, int] = await (await client.get("/api/v1/me/quota", headers=who)).json()
    return body


async def me(client: TestClient[Any, Any], who: dict[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = await (await client.get("/api/v1/me", headers=who)).json()
    return body


async def admin_order(client: TestClient[Any, Any], admin: dict[str, str], order_no: str) -> dict[str, Any]:
    resp = await client.get(f"/api/v1/admin/orders/{order_no}", headers=admin)
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


def notifications(services: Services, database: str) -> list[dict[str, Any]]:
    return services.query(database, "SELECT * FROM payment_notifications ORDER BY id")


async def assert_books_clean(settings: Settings) -> None:
    for command in ("check-quota", "check-orders"):
        code, out = await run_command(settings, command)
        assert code == 0, out
