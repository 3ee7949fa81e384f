"""Products, orders and WeChat Pay against a fake gateway that checks our signatures,
on two app instances sharing MariaDB and Redis. The SDK runs for real in the server's
thread pool, so every provider call is driven through HTTP."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from server.app import create_app
from server.config import Settings
from server.errors import AppError, Busy, ErrorCode
from server.hub import RedisEventHub
from server.keys import hub_key, payments_key
from server.metrics import Metrics
from server.payments.pool import SdkPool
from server.payments.wechat import attach_of
from tests import payments_support as support
from tests.auth_support import auth_settings, bearer, error_code, register
from tests.conftest import Services, run_command
from tests.fakes.wechat import FakeWeChat
from tests.fakes.wechatpay import APPID, FakeWeChatPay, Keys, verify


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys.generate(tmp_path_factory.mktemp("wechatpay"))


@pytest.fixture
async def gateway(aiohttp_server: Any, keys: Keys) -> tuple[FakeWeChatPay, str]:
    fake = FakeWeChatPay(keys)
    server: TestServer = await aiohttp_server(fake.app())
    return fake, str(server.make_url("")).rstrip("/")


wechat_server = support.wechat_server  # the fake WeChat login API (a shared fixture)


@pytest.fixture
def fake(gateway: tuple[FakeWeChatPay, str]) -> FakeWeChatPay:
    return gateway[0]


@pytest.fixture
def settings(
    make_settings: Callable[..., Settings],
    keys: Keys,
    gateway: tuple[FakeWeChatPay, str],
    wechat_server: tuple[FakeWeChat, str],
) -> Settings:
    return auth_settings(
        make_settings, cron_enabled=False, wechat_api_base=wechat_server[1], **keys.settings(gateway[1])
    )


@pytest.fixture
async def client2(aiohttp_client: Any, settings: Settings) -> TestClient[Any, Any]:
    """A second instance on the same MariaDB and Redis."""
    client: TestClient[Any, Any] = await aiohttp_client(create_app(settings))
    return client


async def buyer(client: TestClient[Any, Any]) -> dict[str, str]:
    return bearer((await register(client))["access_token"])


async def wechat_buyer(client: TestClient[Any, Any], wechat: FakeWeChat) -> dict[str, str]:
    resp = await client.post("/api/v1/auth/wechat", json={"code": wechat.issue()})
    assert resp.status == 200, await resp.text()
    return bearer((await resp.json())["access_token"])


async def order(
    client: TestClient[Any, Any],
    who: dict[str, str],
    product_id: str = "credits-100",
    channel: str = "wechat_native",
    key: str | None = None,
) -> dict[str, Any]:
    """support.order, WeChat Pay Native unless told."""
    return await support.order(client, who, product_id, channel, key)


async def deliver(client: TestClient[Any, Any], note: tuple[dict[str, str], bytes], slash: str = "") -> int:
    headers, body = note
    resp = await client.post(f"/api/v1/payments/wechat/notify{slash}", data=body, headers=headers)
    return resp.status


async def balance(client: TestClient[Any, Any], who: dict[str, str]) -> int:
    return int((await (await client.get("/api/v1/me/quota", headers=who)).json())["balance"])


async def me(client: TestClient[Any, Any], who: dict[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = await (await client.get("/api/v1/me", headers=who)).json()
    return body


async def status_of(client: TestClient[Any, Any], who: dict[str, str], order_no: str) -> str:
    resp = await client.get(f"/api/v1/orders/{order_no}", headers=who)
    assert resp.status == 200, await resp.text()
    return str((await resp.json())["status"])


def notifications(services: Services, database: str) -> list[dict[str, Any]]:
    return services.query(database, "SELECT * FROM payment_notifications ORDER BY id")


def backdate(services: Services, database: str, order_no: str, seconds: int, *, expire: bool = False) -> None:
    services.query(
        database,
        "UPDATE orders SET created_at = created_at - INTERVAL %s SECOND"
        + (", expires_at = created_at" if expire else "")
        + " WHERE order_no = %s",
        seconds,
        order_no,
    )


async def assert_books_clean(settings: Settings) -> None:
    for command in ("check-quota", "check-orders"):
        code, out = await run_command(settings, command)
        assert code == 0, out


# ---------------------------------------------------------------- products


async def test_the_seeded_products_are_listed_with_the_configured_channels(client: Any) -> None:
    body = await (await client.get("/api/v1/products")).json()
    assert [(p["id"], p["price_fen"], p["credits"], p["membership_days"]) for p in body["items"]] == [
        ("credits-100", 990, 100, 0),
        ("member-month", 2990, 300, 30),
        ("credits-500", 3990, 500, 0),
    ]
    assert body["channels"] == ["wechat_jsapi", "wechat_native"]


async def test_without_merchant_settings_no_channel_is_offered_and_ordering_is_422(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    client = await aiohttp_client(create_app(auth_settings(make_settings, cron_enabled=False)))
    assert (await (await client.get("/api/v1/products")).json())["channels"] == []
    resp = await client.post(
        "/api/v1/orders",
        json={"product_id": "credits-100", "channel": "wechat_native"},
        headers={**await buyer(client), "Idempotency-Key": "k"},
    )
    assert resp.status == 422
    assert (await resp.json())["error"]["details"]["fields"][0]["field"] == "channel"


async def test_a_ca_bundle_that_requests_would_load_on_every_wechat_pay_call_is_warned_of(
    aiohttp_client: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch, log_lines: list[str]
) -> None:
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    await aiohttp_client(create_app(settings))
    warned = [line for line in log_lines if "CA_BUNDLE" in line]
    assert len(warned) == 1 and "REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt is set" in warned[0]
    log_lines.clear()
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    await aiohttp_client(create_app(settings))
    assert not [line for line in log_lines if "CA_BUNDLE" in line]


# ---------------------------------------------------------------- paying


async def test_a_native_order_is_paid_by_its_notification_once(
    client: Any, fake: FakeWeChatPay, services: Services, database: str, settings: Settings
) -> None:
    who = await buyer(client)
    placed = await order(client, who)
    assert placed["status"] == "pending" and placed["amount_fen"] == 990
    assert placed["pay_params"]["code_url"].startswith("weixin://wxpay/")
    assert len(placed["order_no"]) <= 32 and placed["order_no"].isalnum()
    fake.pay(placed["order_no"])
    note = fake.notification(placed["order_no"])
    assert await deliver(client, note) == 204
    assert await deliver(client, note, slash="/") == 204  # WeChat retries; the trailing slash too
    assert await balance(client, who) == 100
    assert await status_of(client, who, placed["order_no"]) == "paid"
    ledger = services.query(database, "SELECT kind, ref, order_no FROM quota_ledger WHERE kind = 'grant'")
    assert ledger == [{"kind": "grant", "ref": placed["order_no"], "order_no": placed["order_no"]}]
    assert [(n["outcome"], n["verified"]) for n in notifications(services, database)] == [
        ("applied", 1),
        ("duplicate", 1),
    ]
    assert fake.refused == 0
    text = await (await client.get("/metrics")).text()  # what the ops board reads
    for line in (
        'wardrobe_payment_orders_total{channel="wechat_native",status="pending"} 1.0',
        'wardrobe_payment_orders_total{channel="wechat_native",status="paid"} 1.0',
        'wardrobe_payment_paid_fen_total{channel="wechat_native"} 990.0',
        'wardrobe_payment_provider_calls_total{op="create",outcome="ok",provider="wechat"} 1.0',
        'wardrobe_payment_provider_call_seconds_count{op="create",provider="wechat"} 1.0',
        'wardrobe_payment_notifications_total{outcome="applied",provider="wechat"} 1.0',
        'wardrobe_payment_notifications_total{outcome="duplicate",provider="wechat"} 1.0',
    ):
        assert line in text, line
    await assert_books_clean(settings)


async def test_a_jsapi_order_gives_request_payment_params_signed_by_the_merchant_key(
    client: Any, fake: FakeWeChatPay, keys: Keys, wechat_server: tuple[FakeWeChat, str]
) -> None:
    who = await wechat_buyer(client, wechat_server[0])
    placed = await order(client, who, channel="wechat_jsapi")
    p = placed["pay_params"]
    assert p["appId"] == APPID and p["signType"] == "RSA" and p["package"].startswith("prepay_id=wx")
    message = f"{p['appId']}\n{p['timeStamp']}\n{p['nonceStr']}\n{p['package']}\n"
    assert verify(keys.merchant.public_key(), message, p["paySign"])
    assert fake.trades[placed["order_no"]]["payer"]["openid"]
    fake.pay(placed["order_no"])
    assert await deliver(client, fake.notification(placed["order_no"])) == 204
    assert await balance(client, who) == 100


async def test_the_same_notification_20_times_on_two_instances_credits_once(
    client: Any, client2: Any, fake: FakeWeChatPay, services: Services, database: str, settings: Settings
) -> None:
    who = await buyer(client)
    placed = await order(client, who, product_id="credits-500")
    fake.pay(placed["order_no"])
    note = fake.notification(placed["order_no"])
    statuses = await asyncio.gather(*(deliver((client, client2)[i % 2], note) for i in range(20)))
    assert statuses == [204] * 20
    assert await balance(client2, who) == 500
    outcomes = [n["outcome"] for n in notifications(services, database)]
    assert outcomes.count("applied") == 1 and outcomes.count("duplicate") == 19
    await assert_books_clean(settings)


async def test_bad_notifications_change_nothing_and_are_recorded_as_refused(
    client: Any, fake: FakeWeChatPay, services: Services, database: str
) -> None:
    who = await buyer(client)
    placed = await order(client, who)
    no = placed["order_no"]
    trade = fake.pay(no)
    headers, body = fake.notification(no)
    tampered = body.replace(b'"summary"', b'"Summary"')
    other_order = {**trade, "out_trade_no": "20990101000000" + "0" * 18}
    cases = {
        "tampered": (headers, tampered),
        "amount": fake.notification(no, amount=1),
        "appid": fake.notification(no, appid="wx-someone-else"),
        "stale": fake.notification(no, timestamp=int(time.time()) - 301),
        "unknown": fake.notification(no, resource=other_order),
        "serial": ({**headers, "Wechatpay-Serial": "PUB_KEY_ID_OTHER"}, body),
        "unsigned": ({"Content-Type": "application/json"}, body),
    }
    for note in cases.values():
        assert await deliver(client, note) == 400
    assert await balance(client, who) == 0
    assert await status_of(client, who, no) == "pending"
    rows = notifications(services, database)
    assert [r["outcome"] for r in rows] == ["refused"] * len(cases)
    reasons = [r["reason"] for r in rows]
    assert "bad signature" in reasons[0]
    assert reasons[1].startswith("amount 1 differs")
    assert reasons[2].startswith("appid 'wx-someone-else'")
    assert "more than 300 s off" in reasons[3]
    assert reasons[4] == "unknown order"
    assert reasons[5].startswith("unknown serial")
    assert reasons[6].startswith("missing headers")


async def test_a_notification_routed_by_attach_to_another_buyer_pays_nothing_and_is_refused(
    client: Any, fake: FakeWeChatPay, services: Services, database: str
) -> None:
    who, other = await buyer(client), await buyer(client)
    other_id = int((await me(client, other))["id"])
    no = (await order(client, who))["order_no"]
    trade = fake.pay(no)
    assert trade["attach"] == attach_of(int((await me(client, who))["id"]))  # as the order was made
    # A signed notification whose attach names someone else (WeChat Pay would never send
    # it): the order read inside the other buyer's credit transaction refuses it.
    forged = fake.notification(no, resource={**trade, "attach": attach_of(other_id)})
    assert await deliver(client, forged) == 400
    assert await balance(client, who) == 0 and await balance(client, other) == 0
    assert await status_of(client, who, no) == "pending"
    [row] = notifications(services, database)
    assert row["outcome"] == "refused" and row["reason"] == f"the order is not user {other_id}'s"
    assert await deliver(client, fake.notification(no)) == 204  # the real one still pays it
    assert await balance(client, who) == 100


async def test_an_order_whose_notification_has_no_attach_is_read_first_and_paid(
    client: Any, fake: FakeWeChatPay, services: Services, database: str, settings: Settings
) -> None:
    who = await buyer(client)
    no = (await order(client, who))["order_no"]
    trade = {k: v for k, v in fake.pay(no).items() if k != "attach"}  # an order made before attach
    assert await deliver(client, fake.notification(no, resource=trade)) == 204
    assert await deliver(client, fake.notification(no, resource=trade)) == 204
    assert await balance(client, who) == 100
    assert [n["outcome"] for n in notifications(services, database)] == ["applied", "duplicate"]
    await assert_books_clean(settings)


async def test_a_paid_credit_pack_announces_quota_then_order_with_consecutive_seqs(
    client: Any, fake: FakeWeChatPay
) -> None:
    who = await buyer(client)
    uid = int((await me(client, who))["id"])
    no = (await order(client, who))["order_no"]
    fake.pay(no)
    assert await deliver(client, fake.notification(no)) == 204
    hub: RedisEventHub = client.app[hub_key]
    frames: list[tuple[int, dict[str, Any]]] = []
    for _ in range(200):  # the actor publishes right after it answers: wait for both
        frames = [(seq, json.loads(f)) for seq, f in await hub.streams.read_after(uid, 0, 10)]
        if len(frames) >= 2:
            break
        await asyncio.sleep(0.01)
    (seq1, first), (seq2, second) = frames[-2:]
    assert (first["event"], second["event"]) == ("quota.changed", "order.paid") and seq2 == seq1 + 1
    assert first["data"]["balance"] == 100
    assert second["data"]["order_no"] == no and second["data"]["status"] == "paid"


# ---------------------------------------------------------------- lost notifications, closing


async def test_a_paid_order_without_notification_is_found_by_reading_it(
    client: Any, client2: Any, fake: FakeWeChatPay, services: Services, database: str, settings: Settings
) -> None:
    who = await buyer(client)
    no = (await order(client, who))["order_no"]
    fake.pay(no)
    assert await status_of(client, who, no) == "pending"  # younger than 10 s: no query
    assert not any(c.startswith("query") for c in fake.calls)
    backdate(services, database, no, 11)
    statuses = await asyncio.gather(*(status_of((client, client2)[i % 2], who, no) for i in range(6)))
    assert fake.calls.count(f"query {no}") == 1  # at most once per 10 s per order, cluster-wide
    assert "paid" in statuses and await status_of(client, who, no) == "paid"
    assert await balance(client, who) == 100
    await assert_books_clean(settings)


async def test_the_cron_job_settles_lost_payments_and_closes_expired_orders(
    client: Any, app: web.Application, fake: FakeWeChatPay, services: Services, database: str
) -> None:
    who = await buyer(client)
    paid, expired, young = [(await order(client, who))["order_no"] for _ in range(3)]
    fake.pay(paid)
    backdate(services, database, paid, 120)
    backdate(services, database, expired, 3600, expire=True)
    assert await app[payments_key].check_pending() == 2
    assert await status_of(client, who, paid) == "paid"
    assert await status_of(client, who, expired) == "closed"
    assert fake.trades[expired]["trade_state"] == "CLOSED"  # closed at the provider first
    assert await status_of(client, who, young) == "pending"
    assert f"query {young}" not in fake.calls
    assert await balance(client, who) == 100


async def test_closing_an_order_the_buyer_already_paid_makes_it_paid(
    client: Any, fake: FakeWeChatPay, settings: Settings
) -> None:
    who = await buyer(client)
    no = (await order(client, who))["order_no"]
    fake.pay(no)
    resp = await client.post(f"/api/v1/orders/{no}/close", headers=who)
    assert resp.status == 200 and (await resp.json())["status"] == "paid"
    assert await balance(client, who) == 100
    resp = await client.post(f"/api/v1/orders/{no}/close", headers=who)
    assert resp.status == 409 and await error_code(resp) == "CONFLICT"
    await assert_books_clean(settings)


async def test_close_racing_a_notification_ends_paid_and_credited_once(
    client: Any, client2: Any, fake: FakeWeChatPay, settings: Settings
) -> None:
    who = await buyer(client)
    no = (await order(client, who))["order_no"]
    fake.pay(no)
    note = fake.notification(no)
    close, notified = await asyncio.gather(
        client2.post(f"/api/v1/orders/{no}/close", headers=who), deliver(client, note)
    )
    assert close.status == 200 and notified == 204
    assert await status_of(client, who, no) == "paid"
    assert await balance(client, who) == 100
    await assert_books_clean(settings)


async def test_a_notification_after_close_still_makes_the_order_paid(
    client: Any, fake: FakeWeChatPay, settings: Settings
) -> None:
    who = await buyer(client)
    no = (await order(client, who))["order_no"]
    resp = await client.post(f"/api/v1/orders/{no}/close", headers=who)
    assert (await resp.json())["status"] == "closed"
    trade = fake.trades[no]
    paid_anyway = {**trade, "trade_state": "SUCCESS", "transaction_id": "4200000001"}
    assert await deliver(client, fake.notification(no, resource=paid_anyway)) == 204
    assert await status_of(client, who, no) == "paid"
    assert await balance(client, who) == 100
    await assert_books_clean(settings)


# ---------------------------------------------------------------- memberships, dev, input


async def test_a_membership_extends_from_the_current_expiry_and_shows_on_the_user(client: Any) -> None:
    who = await buyer(client)
    assert (await (await client.get("/api/v1/me", headers=who)).json())["membership"] is None
    first = (await order(client, who, product_id="member-month"))["order_no"]
    second = (await order(client, who, product_id="member-month"))["order_no"]
    resp = await client.post(f"/api/v1/dev/orders/{first}/paid")
    assert resp.status == 200 and (await resp.json())["status"] == "paid"
    one = (await (await client.get("/api/v1/me", headers=who)).json())["membership"]
    await client.post(f"/api/v1/dev/orders/{second}/paid")
    two = (await (await client.get("/api/v1/me", headers=who)).json())["membership"]
    assert one["tier"] == "member" == two["tier"]
    days = (datetime.fromisoformat(two["expires_at"]) - datetime.fromisoformat(one["expires_at"])).days
    assert days == 30
    assert await balance(client, who) == 600


async def test_an_order_key_repeated_answers_the_same_order_and_another_body_conflicts(
    client: Any, services: Services, database: str
) -> None:
    who = await buyer(client)
    first = await order(client, who, key="same")
    resp = await client.post(
        "/api/v1/orders",
        json={"product_id": "credits-100", "channel": "wechat_native"},
        headers={**who, "Idempotency-Key": "same"},
    )
    assert resp.status == 200 and (await resp.json())["order_no"] == first["order_no"]
    resp = await client.post(
        "/api/v1/orders",
        json={"product_id": "credits-500", "channel": "wechat_native"},
        headers={**who, "Idempotency-Key": "same"},
    )
    assert resp.status == 409 and await error_code(resp) == "IDEMPOTENCY_CONFLICT"
    assert services.query(database, "SELECT COUNT(*) AS n FROM orders")[0]["n"] == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"product_id": "no-such", "channel": "wechat_native"}, "product_id"),
        ({"product_id": "credits-100", "channel": "paypal"}, "channel"),
        ({"product_id": "credits-100", "channel": "alipay_qr"}, "channel"),  # no merchant settings
        ({"product_id": "credits-100", "channel": "wechat_jsapi"}, "channel"),  # no WeChat openid
    ],
)
async def test_bad_orders_are_422_on_their_field_and_write_nothing(
    client: Any, fake: FakeWeChatPay, services: Services, database: str, body: dict[str, str], field: str
) -> None:
    who = await buyer(client)
    resp = await client.post("/api/v1/orders", json=body, headers={**who, "Idempotency-Key": "k"})
    assert resp.status == 422, await resp.text()
    assert [f["field"] for f in (await resp.json())["error"]["details"]["fields"]] == [field]
    assert services.query(database, "SELECT COUNT(*) AS n FROM orders")[0]["n"] == 0
    assert fake.trades == {}


async def test_a_disabled_product_cannot_be_ordered_and_others_orders_are_not_found(
    client: Any, services: Services, database: str
) -> None:
    services.query(database, "UPDATE products SET enabled = 0 WHERE id = 'credits-500'")
    who, other = await buyer(client), await buyer(client)
    resp = await client.post(
        "/api/v1/orders",
        json={"product_id": "credits-500", "channel": "wechat_native"},
        headers={**who, "Idempotency-Key": "k"},
    )
    assert (
        resp.status == 422
        and "not on sale" in (await resp.json())["error"]["details"]["fields"][0]["message"]
    )
    no = (await order(client, who))["order_no"]
    assert (await client.get(f"/api/v1/orders/{no}", headers=other)).status == 404
    assert (await client.post(f"/api/v1/orders/{no}/close", headers=other)).status == 404
    assert (await client.get("/api/v1/orders/x" + "0" * 40, headers=who)).status == 404
    missing_key = await client.post(
        "/api/v1/orders", json={"product_id": "credits-100", "channel": "wechat_native"}, headers=who
    )
    assert missing_key.status == 422
    page = await (await client.get("/api/v1/orders?limit=1", headers=who)).json()
    assert [o["order_no"] for o in page["items"]] == [no] and page["next_cursor"] is None


async def test_check_orders_reports_a_paid_order_without_its_grant(
    client: Any, settings: Settings, services: Services, database: str
) -> None:
    who = await buyer(client)
    no = (await order(client, who))["order_no"]
    await client.post(f"/api/v1/dev/orders/{no}/paid")
    await assert_books_clean(settings)
    services.query(database, "UPDATE quota_ledger SET order_no = NULL, ref = 'x' WHERE order_no = %s", no)
    code, out = await run_command(settings, "check-orders")
    assert code == 1 and no in out


def test_order_numbers_are_32_alphanumerics_and_unguessable() -> None:
    from server.payments.orders import new_order_no

    numbers = {new_order_no() for _ in range(5000)}  # the random bytes are drawn ~455 numbers at a time
    assert len(numbers) == 5000
    assert all(len(n) == 32 and n.isascii() and n.isalnum() for n in numbers)


def test_a_forked_process_draws_order_numbers_of_its_own() -> None:
    # The parent has random bytes drawn in advance; a child must not hand out the same ones.
    code = (
        "import os; from server.payments.orders import new_order_no; new_order_no()\n"
        "r, w = os.pipe(); pid = os.fork()\n"
        "if pid == 0: os.write(w, ' '.join(new_order_no()[14:] for _ in range(3)).encode()); os._exit(0)\n"
        "os.waitpid(pid, 0); child = set(os.read(r, 1000).decode().split())\n"
        "mine = {new_order_no()[14:] for _ in range(3)}; print(len(child), len(mine), child & mine)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["3", "3", "set()"], done.stdout + done.stderr


async def test_a_provider_call_past_its_timeout_is_upstream_failed_and_holds_its_slot_until_it_ends() -> None:
    release = threading.Event()
    metrics = Metrics()
    pool = SdkPool("wechat", "WeChat Pay", threads=1, max_pending=2, timeout=0.2, metrics=metrics)
    try:
        with pytest.raises(AppError, match=r"WeChat Pay create took longer than 0\.2 s") as slow:
            await pool.call("create", lambda: release.wait(10))
        assert slow.value.code == ErrorCode.UPSTREAM_FAILED
        queued = asyncio.create_task(pool.call("query", lambda: "answer"))
        await asyncio.sleep(0)  # let it take the second slot
        with pytest.raises(Busy):  # the abandoned call still runs in its thread, holding a slot
            await pool.call("query", lambda: "answer")
        release.set()
        async with asyncio.timeout(5):
            assert await queued == "answer"

        def sample(name: str, **labels: str) -> float | None:
            return metrics.registry.get_sample_value(f"wardrobe_payment_provider_{name}", labels)

        assert sample("calls_total", provider="wechat", op="create", outcome="timeout") == 1
        assert sample("calls_total", provider="wechat", op="query", outcome="ok") == 1
        waited = sample("call_seconds_sum", provider="wechat", op="create")
        assert waited is not None and 0.2 <= waited < 1  # the caller's wait, not the thread's
    finally:
        release.set()
        pool.shutdown()
