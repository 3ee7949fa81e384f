"""Alipay QR orders against a fake gateway that checks our RSA2 signatures and signs its
answers and notifications like Alipay, on two app instances sharing MariaDB and Redis.
The SDK runs for real in the server's thread pool."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from server.app import create_app
from server.config import Settings
from server.keys import settings_key
from server.payments.alipay import fen_of, yuan
from tests import payments_support as support
from tests.auth_support import auth_settings
from tests.conftest import Services
from tests.fakes.alipay import AlipayKeys, FakeAlipay
from tests.fakes.tls import self_signed, server_context
from tests.fakes.wechatpay import sign
from tests.payments_support import assert_books_clean, buyer, notifications, order, quota

# The shared fixtures (pytest finds them by these module-level names).
wx_keys, ali_keys, wxpay_gateway, alipay_gateway = (
    support.wx_keys,
    support.ali_keys,
    support.wxpay_gateway,
    support.alipay_gateway,
)
settings, client2, alipay, admin = support.settings, support.client2, support.alipay, support.admin
wechat_server = support.wechat_server  # the fake WeChat login API the settings name


async def deliver(client: TestClient[Any, Any], body: bytes, slash: str = "") -> str:
    resp = await client.post(
        f"/api/v1/payments/alipay/notify{slash}",
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
    )
    assert resp.status == 200
    return await resp.text()


async def status_of(client: TestClient[Any, Any], who: dict[str, str], order_no: str) -> str:
    resp = await client.get(f"/api/v1/orders/{order_no}", headers=who)
    assert resp.status == 200, await resp.text()
    return str((await resp.json())["status"])


def test_yuan_strings_convert_exactly_to_and_from_fen() -> None:
    assert [yuan(990), yuan(1), yuan(100), yuan(123456)] == ["9.90", "0.01", "1.00", "1234.56"]
    assert [fen_of("9.90"), fen_of("9.9"), fen_of("0.01"), fen_of("29.90"), fen_of("7")] == [
        990,
        990,
        1,
        2990,
        700,
    ]
    assert [fen_of(x) for x in ("1e3", "-1.00", "9.999", "", " 9.90", None, 9.9)] == [None] * 7


async def test_an_alipay_qr_order_is_paid_by_its_notification_once(
    client: Any, alipay: FakeAlipay, services: Services, database: str
) -> None:
    who = await buyer(client)
    made = await order(client, who)
    assert made["channel"] == "alipay_qr" and made["pay_params"]["qr_code"].startswith(
        "https://qr.alipay.com/"
    )
    assert alipay.trades[made["order_no"]]["total_amount"] == "9.90"
    alipay.pay(made["order_no"])

    assert await deliver(client, alipay.notification(made["order_no"])) == "success"
    assert await deliver(client, alipay.notification(made["order_no"]), slash="/") == "success"

    assert (await quota(client, who))["balance"] == 100
    assert await status_of(client, who, made["order_no"]) == "paid"
    assert [n["outcome"] for n in notifications(services, database)] == ["applied", "duplicate"]
    assert all(n["provider"] == "alipay" and n["verified"] for n in notifications(services, database))
    assert alipay.refused == 0
    await assert_books_clean(client.app[settings_key])


async def test_the_same_alipay_notification_20_times_on_two_instances_credits_once(
    client: Any, client2: Any, alipay: FakeAlipay, services: Services, database: str
) -> None:
    who = await buyer(client)
    made = await order(client, who)
    alipay.pay(made["order_no"])
    body = alipay.notification(made["order_no"])

    answers = await asyncio.gather(*(deliver((client, client2)[i % 2], body) for i in range(20)))

    assert answers == ["success"] * 20
    assert (await quota(client, who))["balance"] == 100
    outcomes = [n["outcome"] for n in notifications(services, database)]
    assert outcomes.count("applied") == 1 and outcomes.count("duplicate") == 19
    await assert_books_clean(client.app[settings_key])


async def test_bad_alipay_notifications_change_nothing_and_are_recorded_as_refused(
    client: Any, alipay: FakeAlipay, services: Services, database: str
) -> None:
    who = await buyer(client)
    made = await order(client, who)
    no = made["order_no"]
    alipay.pay(no)
    stranger = "2026" + "0" * 28
    alipay.trades[stranger] = {**alipay.trades[no], "out_trade_no": stranger}
    bad = {
        "tampered amount": alipay.notification(no, tamper={"total_amount": "0.01"}),
        "signed by another key": alipay.notification(no, tamper={"sign": sign(alipay.keys.app, "x")}),
        "wrong amount": alipay.notification(no, amount_fen=1),
        "other app": alipay.notification(no, app_id="2021999999999999"),
        "not paid": alipay.notification(no, trade_status="WAIT_BUYER_PAY"),
        "changed order": alipay.notification(no, tamper={"out_trade_no": stranger}),
        "unknown order": alipay.notification(stranger),
        "garbage": b"\xff\xfe not a form",
    }

    answers = {name: await deliver(client, body) for name, body in bad.items()}

    assert set(answers.values()) == {"failure"}
    assert (await quota(client, who))["balance"] == 0
    assert await status_of(client, who, no) == "pending"
    recorded = notifications(services, database)
    assert [n["outcome"] for n in recorded] == ["refused"] * len(bad)
    reasons = [n["reason"] for n in recorded]
    assert reasons[0] == reasons[1] == "bad signature" and not recorded[0]["verified"]
    assert reasons[2] == "amount 1 differs from the order's 990" and recorded[2]["verified"]
    assert reasons[3].startswith("appid '2021999999999999' is not ours")
    assert reasons[4] == "not a payment success: WAIT_BUYER_PAY"
    assert reasons[5] == "bad signature"  # out_trade_no is signed: changing it breaks the signature
    assert reasons[6] == "unknown order" and recorded[6]["verified"]
    assert reasons[7] == "unreadable notification"


async def test_a_paid_alipay_order_without_notification_is_found_by_reading_it(
    client: Any, alipay: FakeAlipay, services: Services, database: str
) -> None:
    who = await buyer(client)
    made = await order(client, who)
    alipay.pay(made["order_no"])
    services.query(
        database,
        "UPDATE orders SET created_at = created_at - INTERVAL 60 SECOND WHERE order_no = %s",
        made["order_no"],
    )

    assert await status_of(client, who, made["order_no"]) == "paid"
    assert (await quota(client, who))["balance"] == 100
    assert "alipay.trade.query" in alipay.calls


async def test_closing_an_alipay_order_closes_it_there_and_one_paid_first_ends_paid(
    client: Any, alipay: FakeAlipay
) -> None:
    who = await buyer(client)
    unpaid, paid = await order(client, who), await order(client, who)
    alipay.pay(paid["order_no"])

    closed = await client.post(f"/api/v1/orders/{unpaid['order_no']}/close", headers=who)
    raced = await client.post(f"/api/v1/orders/{paid['order_no']}/close", headers=who)

    assert (await closed.json())["status"] == "closed"
    assert alipay.trades[unpaid["order_no"]]["trade_status"] == "TRADE_CLOSED"
    assert (await raced.json())["status"] == "paid"
    assert (await quota(client, who))["balance"] == 100


# ---------------------------------------------------------------- over TLS, as in production


async def tls_gateway(
    aiohttp_server: Any, keys: AlipayKeys, cert: tuple[Path, Path]
) -> tuple[FakeAlipay, str]:
    fake = FakeAlipay(keys)
    server: TestServer = await aiohttp_server(fake.app(), ssl=server_context(cert))
    url = str(server.make_url("/gateway.do"))
    assert url.startswith("https://")
    return fake, url


async def test_alipay_over_tls_verifies_the_gateway_certificate_against_the_ca_store(
    aiohttp_server: Any,
    aiohttp_client: Any,
    make_settings: Callable[..., Settings],
    ali_keys: AlipayKeys,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    services: Services,
    database: str,
) -> None:
    # The CA store is what the operating system's would be: here one certificate.
    trusted, untrusted = self_signed(tmp_path, "trusted"), self_signed(tmp_path, "untrusted")
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    # The apps install urlopen's opener (share_tls_context): back to urllib's own after.
    request.addfinalizer(lambda: urllib.request.install_opener(None))
    for cert, works in ((trusted, True), (untrusted, False)):
        monkeypatch.setenv("SSL_CERT_FILE", str(trusted[0]))
        fake, url = await tls_gateway(aiohttp_server, ali_keys, cert)
        app = create_app(auth_settings(make_settings, cron_enabled=False, **ali_keys.settings(url)))
        client: TestClient[Any, Any] = await aiohttp_client(app)
        who = await buyer(client)
        for attempt in range(2):
            if attempt == 1:
                # The context was made at start, with the store it had: a context made per
                # call (urllib's default) would now load the system's, which lacks ours.
                monkeypatch.delenv("SSL_CERT_FILE")
            resp = await client.post(
                "/api/v1/orders",
                json={"product_id": "credits-100", "channel": "alipay_qr"},
                headers={**who, "Idempotency-Key": f"tls-{works}-{attempt}"},
            )
            body = await resp.json()
            if works:
                assert resp.status == 201, body
                assert body["pay_params"]["qr_code"].startswith("https://qr.alipay.com/")
            else:  # a gateway whose certificate the store does not vouch for is never spoken to
                assert resp.status == 502 and body["error"]["code"] == "UPSTREAM_FAILED", body
                assert "CERTIFICATE_VERIFY_FAILED" in body["error"]["message"], body
        assert len(fake.trades) == (2 if works else 0)
    orders = services.query(database, "SELECT order_no FROM orders")
    assert len(orders) == 2  # the untrusted gateway's attempts wrote nothing
