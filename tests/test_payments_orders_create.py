"""Making an order (POST /api/v1/orders): the product cache that only ever accepts, the
write that re-checks the product's terms, the Idempotency-Key decided by the unique key,
and the MySQL statements an order costs (counted by the server's general log).

"Another instance" changing a product is an UPDATE made directly in MySQL, behind this
instance's back, after this instance cached the product."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests import payments_support as support
from tests.auth_support import bearer, error_code
from tests.conftest import Services
from tests.fakes.wechat import FakeWeChat
from tests.fakes.wechatpay import FakeWeChatPay, Keys
from tests.payments_support import buyer

# The shared fixtures (pytest finds them by these module-level names).
wx_keys, ali_keys, alipay_gateway, alipay, client2, admin = (
    support.wx_keys,
    support.ali_keys,
    support.alipay_gateway,
    support.alipay,
    support.client2,
    support.admin,
)
wechat_server, settings = support.wechat_server, support.settings

NATIVE = {"product_id": "credits-100", "channel": "wechat_native"}


class Outage:
    """Makes the fake WeChat Pay gateway refuse every order (as a 500 SYSTEM_ERROR would)."""

    def __init__(self) -> None:
        self.on = False


@pytest.fixture
def outage() -> Outage:
    return Outage()


@pytest.fixture
async def wxpay_gateway(aiohttp_server: Any, wx_keys: Keys, outage: Outage) -> tuple[FakeWeChatPay, str]:
    fake = FakeWeChatPay(wx_keys)
    app = fake.app()

    @web.middleware
    async def failing(request: web.Request, handler: Callable[..., Awaitable[web.StreamResponse]]) -> Any:
        if outage.on and request.method == "POST":
            return fake._answer(500, {"code": "SYSTEM_ERROR", "message": "system busy"})
        return await handler(request)

    app.middlewares.append(failing)
    server: TestServer = await aiohttp_server(app)
    return fake, str(server.make_url("")).rstrip("/")


@pytest.fixture
def wxpay(wxpay_gateway: tuple[FakeWeChatPay, str]) -> FakeWeChatPay:
    return wxpay_gateway[0]


async def post_order(
    client: TestClient[Any, Any], who: dict[str, str], key: str, body: dict[str, str] = NATIVE
) -> tuple[int, dict[str, Any]]:
    resp = await client.post("/api/v1/orders", json=body, headers={**who, "Idempotency-Key": key})
    answer: dict[str, Any] = await resp.json()
    return resp.status, answer


async def cache_products(client: TestClient[Any, Any]) -> None:
    """This instance reads (and so caches) every enabled product, as GET /products does."""
    assert (await client.get("/api/v1/products")).status == 200


def stored(services: Services, database: str) -> list[tuple[str, int, int]]:
    rows = services.query(database, "SELECT order_no, amount_fen, credits FROM orders ORDER BY created_at")
    return [(r["order_no"], r["amount_fen"], r["credits"]) for r in rows]


def sent_amounts(fake: FakeWeChatPay) -> dict[str, int]:
    return {no: int(t["amount"]["total"]) for no, t in fake.trades.items()}


# ---------------------------------------------------------------- the product cache


async def test_an_order_after_another_instance_changed_the_price_is_made_and_sent_at_the_new_terms(
    client: Any, wxpay: FakeWeChatPay, services: Services, database: str
) -> None:
    who = await buyer(client)
    await cache_products(client)
    services.query(database, "UPDATE products SET price_fen = 1290, credits = 120 WHERE id = 'credits-100'")

    status, made = await post_order(client, who, "k1")

    assert status == 201 and made["amount_fen"] == 1290
    assert stored(services, database) == [(made["order_no"], 1290, 120)]  # none at the old terms
    assert sent_amounts(wxpay)[made["order_no"]] == 1290
    # The order priced from the stale cache was refused at the write: its prepay (990) was
    # never handed out and expires at the provider.
    assert sorted(sent_amounts(wxpay).values()) == [990, 1290]
    status, again = await post_order(client, who, "k2")  # the cache now holds the new terms
    assert status == 201 and again["amount_fen"] == 1290 and len(wxpay.trades) == 3


async def test_a_product_disabled_by_another_instance_after_caching_is_refused_and_nothing_is_written(
    client: Any, services: Services, database: str
) -> None:
    who = await buyer(client)
    await cache_products(client)
    services.query(database, "UPDATE products SET enabled = 0 WHERE id = 'credits-100'")

    status, answer = await post_order(client, who, "k1")

    assert status == 422 and answer["error"]["code"] == "VALIDATION_FAILED"
    assert answer["error"]["details"]["fields"] == [
        {"field": "product_id", "message": "this product is not on sale"}
    ]
    assert stored(services, database) == []


async def test_a_product_enabled_by_another_instance_after_this_one_saw_it_disabled_can_be_ordered_at_once(
    client: Any, services: Services, database: str
) -> None:
    who = await buyer(client)
    services.query(database, "UPDATE products SET enabled = 0 WHERE id = 'credits-100'")
    status, _ = await post_order(client, who, "k1")
    assert status == 422

    services.query(database, "UPDATE products SET enabled = 1 WHERE id = 'credits-100'")
    status, made = await post_order(client, who, "k2")

    assert status == 201 and made["amount_fen"] == 990
    assert stored(services, database) == [(made["order_no"], 990, 100)]


async def test_an_admin_price_change_on_this_instance_replaces_the_cached_product(
    client: Any, admin: dict[str, str], wxpay: FakeWeChatPay, services: Services, database: str
) -> None:
    who = await buyer(client)
    await cache_products(client)
    resp = await client.patch("/api/v1/admin/products/credits-100", json={"price_fen": 1590}, headers=admin)
    assert resp.status == 200, await resp.text()

    status, made = await post_order(client, who, "k1")

    assert status == 201 and made["amount_fen"] == 1590
    assert sent_amounts(wxpay) == {made["order_no"]: 1590}  # priced right the first time: one call
    assert stored(services, database) == [(made["order_no"], 1590, 100)]


# ---------------------------------------------------------------- Idempotency-Key


async def test_a_repeated_key_answers_the_first_order_and_another_body_conflicts_with_one_row(
    client: Any, services: Services, database: str
) -> None:
    who = await buyer(client)
    first = await support.order(client, who, channel="wechat_native", key="same")

    status, repeat = await post_order(client, who, "same")
    assert status == 200 and repeat == first

    status, other = await post_order(
        client, who, "same", {"product_id": "credits-500", "channel": "alipay_qr"}
    )
    assert status == 409 and other["error"]["code"] == "IDEMPOTENCY_CONFLICT"
    assert [no for no, _, _ in stored(services, database)] == [first["order_no"]]


async def test_concurrent_repeats_of_a_key_on_two_instances_make_one_order(
    client: Any, client2: Any, services: Services, database: str
) -> None:
    who = await buyer(client)
    answers = await asyncio.gather(*(post_order((client, client2)[i % 2], who, "same") for i in range(8)))

    statuses = sorted(status for status, _ in answers)
    assert statuses == [200] * 7 + [201]
    assert len({made["order_no"] for _, made in answers}) == 1
    assert len(stored(services, database)) == 1


async def test_a_repeat_after_the_product_was_disabled_still_answers_the_first_order(
    client: Any, client2: Any, services: Services, database: str
) -> None:
    who = await buyer(client)
    first = await support.order(client, who, channel="wechat_native", key="same")
    services.query(database, "UPDATE products SET enabled = 0 WHERE id = 'credits-100'")

    for instance in (client, client2):  # client cached it enabled; client2 reads it disabled
        status, repeat = await post_order(instance, who, "same")
        assert status == 200 and repeat["order_no"] == first["order_no"]
    assert len(stored(services, database)) == 1


async def test_a_provider_failure_writes_nothing_and_a_repeat_of_an_earlier_key_still_answers(
    client: Any, outage: Outage, services: Services, database: str
) -> None:
    who = await buyer(client)
    first = await support.order(client, who, channel="wechat_native", key="before")
    outage.on = True

    status, failed = await post_order(client, who, "during")
    status_repeat, repeat = await post_order(client, who, "before")

    assert status == 502 and failed["error"]["code"] == "UPSTREAM_FAILED"
    assert status_repeat == 200 and repeat["order_no"] == first["order_no"]
    assert [no for no, _, _ in stored(services, database)] == [first["order_no"]]


async def test_jsapi_without_an_openid_is_422_without_a_provider_call(
    client: Any, wxpay: FakeWeChatPay, services: Services, database: str
) -> None:
    who = await buyer(client)
    resp = await client.post(
        "/api/v1/orders",
        json={"product_id": "credits-100", "channel": "wechat_jsapi"},
        headers={**who, "Idempotency-Key": "k"},
    )
    assert resp.status == 422 and await error_code(resp) == "VALIDATION_FAILED"
    assert stored(services, database) == [] and wxpay.trades == {}


# ---------------------------------------------------------------- MySQL statements per order


class GeneralLog:
    """MariaDB's general log (to its table), read from a connection of the test's own,
    whose statements are left out: what every other connection sent meanwhile."""

    def __init__(self, services: Services) -> None:
        self.conn = services.admin_conn()
        with self.conn.cursor() as cur:
            cur.execute("SELECT CONNECTION_ID()")
            row = cur.fetchone()
            assert row is not None
            self.own = int(row[0])
            cur.execute("SET GLOBAL general_log = 0")
            cur.execute("SET GLOBAL log_output = 'TABLE'")
            cur.execute("TRUNCATE mysql.general_log")

    def start(self) -> None:
        with self.conn.cursor() as cur:
            cur.execute("SET GLOBAL general_log = 1")

    def stop(self) -> list[str]:
        """Turn it off; the statements the others sent since `start`, in order."""
        with self.conn.cursor() as cur:
            cur.execute("SET GLOBAL general_log = 0")
            cur.execute(
                "SELECT CONVERT(argument USING utf8mb4) FROM mysql.general_log "
                "WHERE thread_id <> %s AND command_type IN ('Query', 'Execute') ORDER BY event_time",
                (self.own,),
            )
            sent = [str(row[0]) for row in cur.fetchall()]
            cur.execute("TRUNCATE mysql.general_log")
        return sent

    def close(self) -> None:
        self.stop()
        self.conn.close()


@pytest.fixture
def general_log(services: Services) -> Iterator[GeneralLog]:
    log = GeneralLog(services)
    try:
        yield log
    finally:
        log.close()


@pytest.mark.parametrize("channel", ["wechat_native", "alipay_qr"])
async def test_a_native_or_alipay_order_is_one_mysql_statement(
    client: Any, general_log: GeneralLog, channel: str
) -> None:
    who = await buyer(client)
    status, _ = await post_order(client, who, "warm", {"product_id": "credits-100", "channel": channel})
    assert status == 201  # this instance has the product cached now

    general_log.start()
    status, _ = await post_order(client, who, "measured", {"product_id": "credits-100", "channel": channel})
    sent = general_log.stop()

    assert status == 201
    assert len(sent) == 1 and sent[0].startswith("INSERT INTO orders"), sent


async def test_a_jsapi_order_is_two_mysql_statements_the_openid_then_the_order(
    client: Any,
    general_log: GeneralLog,
    wechat_server: tuple[FakeWeChat, str],
) -> None:
    resp = await client.post("/api/v1/auth/wechat", json={"code": wechat_server[0].issue()})
    who = bearer((await resp.json())["access_token"])
    body = {"product_id": "credits-100", "channel": "wechat_jsapi"}
    assert (await post_order(client, who, "warm", body))[0] == 201

    general_log.start()
    status, _ = await post_order(client, who, "measured", body)
    sent = general_log.stop()

    assert status == 201
    assert len(sent) == 2, sent
    assert sent[0].startswith("SELECT wechat_openid FROM users") and sent[1].startswith("INSERT INTO orders")
