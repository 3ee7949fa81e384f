"""Commissions (issue 13): a referred buyer's paid order earns its approved distributor one
pending commission however often the payment is notified; a refund inside the window
reverses it, the settle job settles it after, a refund after that records a negative
adjustment; no referrer or a rejected distributor earns nothing. Alipay's fake gateway
checks our signatures; two instances share MariaDB and Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from server.app import CRON_JOBS, cron_runner
from server.config import Settings
from tests import payments_support as support
from tests.auth_support import PASSWORD, auth_settings, bearer, login
from tests.conftest import Services
from tests.fakes.alipay import AlipayKeys, FakeAlipay
from tests.payments_support import order
from tests.pii_support import apply, new_id, user

ali_keys, alipay_gateway, alipay, client2 = (
    support.ali_keys,
    support.alipay_gateway,
    support.alipay,
    support.client2,
)
ADMIN_PHONE = support.ADMIN_PHONE


def make(make_settings: Callable[..., Settings], ali: AlipayKeys, gateway: str, **kw: Any) -> Settings:
    return auth_settings(
        make_settings,
        cron_enabled=False,
        admin_phone=ADMIN_PHONE,
        admin_password=PASSWORD,
        **ali.settings(gateway),
        **kw,
    )


@pytest.fixture
def settings(
    make_settings: Callable[..., Settings], ali_keys: AlipayKeys, alipay_gateway: tuple[FakeAlipay, str]
) -> Settings:
    return make(make_settings, ali_keys, alipay_gateway[1])


async def admin(client: TestClient[Any, Any]) -> dict[str, str]:
    return bearer((await login(client, ADMIN_PHONE))["access_token"])


async def distributor(
    client: TestClient[Any, Any], decision: str = "approve"
) -> tuple[dict[str, str], int, str]:
    """A user who applied and was approved (or rejected); its headers, id, invite code."""
    who, user_id, body = await user(client)
    await apply(client, who, "赵六", new_id())
    resp = await client.post(
        f"/api/v1/admin/distributors/{user_id}/{decision}", json={}, headers=await admin(client)
    )
    assert resp.status == 200, await resp.text()
    return who, user_id, body["user"]["invite_code"]


async def paid_many_times(
    clients: list[TestClient[Any, Any]], buyer: dict[str, str], fake: FakeAlipay, product: str = "credits-100"
) -> str:
    """An Alipay order, its notification delivered 10 times across the instances at once,
    and the dev paid endpoint 6 times more."""
    made = await order(clients[0], buyer, product, "alipay_qr")
    order_no = str(made["order_no"])
    fake.pay(order_no)

    async def notify(i: int) -> None:
        resp = await clients[i % len(clients)].post(
            "/api/v1/payments/alipay/notify",
            data=fake.notification(order_no),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert await resp.text() == "success"

    async def dev(i: int) -> None:
        resp = await clients[i % len(clients)].post(f"/api/v1/dev/orders/{order_no}/paid")
        assert resp.status == 200, await resp.text()

    await asyncio.gather(*(notify(i) for i in range(10)), *(dev(i) for i in range(6)))
    return order_no


async def refund(
    client: TestClient[Any, Any], who: dict[str, str], order_no: str, amount_fen: int | None = None
) -> None:
    """An admin refund through the Alipay fake (synchronous: succeeded when this returns)."""
    body: dict[str, Any] = {"reason": "customer asked"}
    if amount_fen is not None:
        body["amount_fen"] = amount_fen
    resp = await client.post(
        f"/api/v1/admin/orders/{order_no}/refund",
        json=body,
        headers={**who, "Idempotency-Key": f"r-{order_no}-{amount_fen}"},
    )
    assert resp.status == 202, await resp.text()
    assert (await resp.json())["status"] == "succeeded"


def commissions(services: Services, database: str, order_no: str) -> list[dict[str, Any]]:
    return services.query(
        database,
        "SELECT kind, amount_fen, status, distributor_id FROM commissions WHERE order_no = %s ORDER BY id",
        order_no,
    )


async def test_a_referred_buyers_payment_earns_one_pending_commission_and_a_refund_in_the_window_reverses_it(
    client: TestClient[Any, Any],
    client2: TestClient[Any, Any],
    alipay: FakeAlipay,
    services: Services,
    database: str,
) -> None:
    who, dist_id, invite = await distributor(client)
    buyer, _, _ = await user(client, invite_code=invite)
    order_no = await paid_many_times([client, client2], buyer, alipay)
    assert commissions(services, database, order_no) == [
        {"kind": "commission", "amount_fen": 99, "status": "pending", "distributor_id": dist_id}
    ]
    me = await (await client.get("/api/v1/distributors/me", headers=who)).json()
    assert me["earnings"]["pending_fen"] == 99 and me["referrals"] == 1
    page = await (await client.get("/api/v1/distributors/me/commissions", headers=who)).json()
    assert [(c["order_no"], c["status"], c["amount_fen"]) for c in page["items"]] == [
        (order_no, "pending", 99)
    ]
    assert "****" in page["items"][0]["buyer"]

    await refund(client, await admin(client), order_no)
    assert commissions(services, database, order_no)[0]["status"] == "reversed"
    me = await (await client.get("/api/v1/distributors/me", headers=who)).json()
    assert me["earnings"] == {"pending_fen": 0, "settled_fen": 0, "reversed_fen": 99}


async def test_a_partial_refund_in_the_window_lowers_the_commission_to_what_is_still_paid(
    client: TestClient[Any, Any], alipay: FakeAlipay, services: Services, database: str
) -> None:
    _, _, invite = await distributor(client)
    buyer, _, _ = await user(client, invite_code=invite)
    order_no = await paid_many_times([client], buyer, alipay)
    await refund(client, await admin(client), order_no, 495)
    assert commissions(services, database, order_no)[0] | {"distributor_id": 0} == {
        "kind": "commission", "amount_fen": 50, "status": "pending", "distributor_id": 0,  # 49.5 → 50
    }  # fmt: skip


async def test_the_settle_job_settles_after_the_window_and_a_later_refund_is_a_negative_adjustment(
    make_settings: Callable[..., Settings],
    ali_keys: AlipayKeys,
    alipay_gateway: tuple[FakeAlipay, str],
    aiohttp_client: Any,
    services: Services,
    database: str,
) -> None:
    from server.app import create_app

    settings = make(make_settings, ali_keys, alipay_gateway[1], commission_settle_days=0)
    app = create_app(settings)
    client: TestClient[Any, Any] = await aiohttp_client(app)
    who, dist_id, invite = await distributor(client)
    resp = await client.put(
        f"/api/v1/admin/distributors/{dist_id}/commission-rate",
        json={"commission_rate": "0.15"},
        headers=await admin(client),
    )
    assert resp.status == 200 and (await resp.json())["commission_rate"] == "0.1500"
    buyer, _, _ = await user(client, invite_code=invite)
    order_no = await paid_many_times([client], buyer, alipay_gateway[0], "credits-500")
    assert commissions(services, database, order_no)[0]["amount_fen"] == 598  # 3990 × 0.15 = 598.5, half-even

    job = next(j for j in CRON_JOBS if j.name == "commissions-settle")
    assert await cron_runner(app).run(job) == 1
    assert commissions(services, database, order_no)[0]["status"] == "settled"
    assert await cron_runner(app).run(job, slot=1) == 0  # nothing more to settle

    await refund(client, await admin(client), order_no, 1000)  # 150 back
    await refund(client, await admin(client), order_no)  # the rest: 2990 → 448.5 → 448 back
    rows = commissions(services, database, order_no)
    assert [(r["kind"], r["amount_fen"], r["status"]) for r in rows] == [
        ("commission", 598, "settled"),
        ("adjustment", -150, "settled"),
        ("adjustment", -448, "settled"),
    ]
    me = await (await client.get("/api/v1/distributors/me", headers=who)).json()
    assert me["earnings"]["settled_fen"] == 0


async def test_no_referrer_or_a_rejected_distributor_earns_nothing(
    client: TestClient[Any, Any], alipay: FakeAlipay, services: Services, database: str
) -> None:
    plain, _, _ = await user(client)
    _, _, invite = await distributor(client, "reject")
    referred, _, _ = await user(client, invite_code=invite)
    _, _, pending_invite = await user(client)  # referrer who never applied
    referred2, _, _ = await user(client, invite_code=pending_invite["user"]["invite_code"])
    for who in (plain, referred, referred2):
        order_no = await paid_many_times([client], who, alipay)
        assert commissions(services, database, order_no) == []
