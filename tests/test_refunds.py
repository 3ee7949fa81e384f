"""Refunds (admin) through Alipay (synchronous) and WeChat Pay (processing until its refund
notification or our query), against fake gateways that check our signatures; clawback
of credits through the buyer's actor; two app instances sharing MariaDB and Redis."""

from __future__ import annotations

import asyncio
import itertools
import urllib.parse
from typing import Any

from aiohttp.test_utils import TestClient

from actors.user import UserActor
from server.credits.ledger import Grant, Reserve
from server.keys import actor_system_key, payments_key, settings_key
from server.paging import encode_cursor
from server.payments.refunding import clawback_due
from server.payments.wechat import attach_of
from tests import payments_support as support
from tests.auth_support import error_code, register
from tests.conftest import Services, run_command
from tests.fakes.alipay import FakeAlipay
from tests.fakes.wechatpay import FakeWeChatPay
from tests.payments_support import admin_order, assert_books_clean, bearer, me, notifications, order, quota

# The shared fixtures (pytest finds them by these module-level names).
wx_keys, ali_keys, wxpay_gateway, alipay_gateway = (
    support.wx_keys,
    support.ali_keys,
    support.wxpay_gateway,
    support.alipay_gateway,
)
settings, client2, alipay, wxpay, admin = (
    support.settings,
    support.client2,
    support.alipay,
    support.wxpay,
    support.admin,
)
wechat_server = support.wechat_server  # the fake WeChat login API the settings name

_keys = itertools.count()


async def new_buyer(client: TestClient[Any, Any]) -> tuple[dict[str, str], int]:
    body = await register(client)
    return bearer(body["access_token"]), int(body["user"]["id"])


async def paid_alipay_order(
    client: TestClient[Any, Any], who: dict[str, str], fake: FakeAlipay, product_id: str = "credits-100"
) -> str:
    made = await order(client, who, product_id, "alipay_qr")
    fake.pay(made["order_no"])
    resp = await client.post(
        "/api/v1/payments/alipay/notify",
        data=fake.notification(made["order_no"]),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert await resp.text() == "success"
    return str(made["order_no"])


async def paid_wechat_order(client: TestClient[Any, Any], who: dict[str, str], fake: FakeWeChatPay) -> str:
    made = await order(client, who, "credits-100", "wechat_native")
    fake.pay(made["order_no"])
    headers, body = fake.notification(made["order_no"])
    resp = await client.post("/api/v1/payments/wechat/notify", data=body, headers=headers)
    assert resp.status == 204, await resp.text()
    return str(made["order_no"])


async def refund(
    client: TestClient[Any, Any],
    who: dict[str, str],
    order_no: str,
    amount_fen: int | None = None,
    *,
    key: str | None = None,
    reason: str = "customer asked",
    expect: int = 202,
) -> dict[str, Any]:
    body: dict[str, Any] = {"reason": reason}
    if amount_fen is not None:
        body["amount_fen"] = amount_fen
    resp = await client.post(
        f"/api/v1/admin/orders/{order_no}/refund",
        json=body,
        headers={**who, "Idempotency-Key": key or f"r{next(_keys)}"},
    )
    assert resp.status == expect, await resp.text()
    answer: dict[str, Any] = await resp.json()
    return answer


async def deliver_refund(client: TestClient[Any, Any], note: tuple[dict[str, str], bytes]) -> int:
    headers, body = note
    resp = await client.post("/api/v1/payments/wechat/refund-notify", data=body, headers=headers)
    return resp.status


def refund_rows(services: Services, database: str) -> list[dict[str, Any]]:
    return services.query(database, "SELECT * FROM refunds ORDER BY created_at, refund_no")


# ---------------------------------------------------------------- Alipay (synchronous)


async def test_a_partial_then_full_alipay_refund_claws_credits_back_in_proportion(
    client: Any, admin: dict[str, str], alipay: FakeAlipay
) -> None:
    who, _ = await new_buyer(client)
    no = await paid_alipay_order(client, who, alipay)

    first = await refund(client, admin, no, 495)
    second = await refund(client, admin, no)  # what is left

    assert (first["status"], first["amount_fen"], first["clawback_credits"], first["clawback_shortfall"]) == (
        "succeeded", 495, 50, 0,
    )  # fmt: skip
    assert (second["status"], second["amount_fen"], second["clawback_credits"]) == ("succeeded", 495, 50)
    assert (await quota(client, who))["balance"] == 0
    detail = await admin_order(client, admin, no)
    assert (detail["status"], detail["refunded_fen"]) == ("refunded", 990)
    assert [r["refund_no"] for r in detail["refunds"]] == [first["refund_no"], second["refund_no"]]
    assert alipay.trades[no]["refunded_fen"] == 990 and alipay.refused == 0
    await assert_books_clean(client.app[settings_key])


async def test_a_full_refund_of_spent_credits_records_the_shortfall_and_ends_the_membership(
    client: Any, admin: dict[str, str], alipay: FakeAlipay, services: Services, database: str
) -> None:
    who, user_id = await new_buyer(client)
    no = await paid_alipay_order(client, who, alipay, "member-month")  # 300 credits, 30 days
    assert (await me(client, who))["membership"] is not None
    actor = client.app[actor_system_key].ref(UserActor, user_id)
    await actor.ask(Grant(-250, "adjust", ref=f"spent-{user_id}", reason="spent on tasks"))
    await actor.ask(Reserve(f"task-{user_id}", 20, ttl=600))  # a task holds 20 of the 50 left

    done = await refund(client, admin, no)

    assert (done["status"], done["clawback_credits"], done["clawback_shortfall"]) == ("succeeded", 30, 270)
    assert await quota(client, who) == {"balance": 20, "reserved": 20, "available": 0}
    assert (await me(client, who))["membership"] is None  # the order's 30 days are taken back
    expiry = services.query(database, "SELECT membership_expires_at FROM users WHERE id = %s", user_id)
    assert expiry[0]["membership_expires_at"] is not None
    await assert_books_clean(client.app[settings_key])


async def test_a_refund_refused_by_the_provider_fails_and_changes_nothing_else(
    client: Any, admin: dict[str, str], alipay: FakeAlipay, wxpay: FakeWeChatPay
) -> None:
    who, _ = await new_buyer(client)
    ali_no, wx_no = await paid_alipay_order(client, who, alipay), await paid_wechat_order(client, who, wxpay)
    alipay.refuse_refunds, wxpay.refuse_refunds = "ACQ.SELLER_BALANCE_NOT_ENOUGH", "NOT_ENOUGH"

    failed = [await refund(client, admin, ali_no), await refund(client, admin, wx_no, 100)]

    assert [f["status"] for f in failed] == ["failed", "failed"]
    assert [(f["clawback_credits"], f["clawback_shortfall"]) for f in failed] == [(0, 0), (0, 0)]
    assert (await quota(client, who))["balance"] == 200
    for no in (ali_no, wx_no):
        detail = await admin_order(client, admin, no)
        assert (detail["status"], detail["refunded_fen"]) == ("paid", 0)
    alipay.refuse_refunds = None
    again = await refund(client, admin, ali_no)  # a failed refund does not count against what is left
    assert (again["status"], again["amount_fen"]) == ("succeeded", 990)
    await assert_books_clean(client.app[settings_key])


# ---------------------------------------------------------------- WeChat Pay (asynchronous)


async def test_a_wechat_refund_is_processing_until_its_notification_which_applies_once(
    client: Any, client2: Any, admin: dict[str, str], wxpay: FakeWeChatPay, services: Services, database: str
) -> None:
    who, _ = await new_buyer(client)
    no = await paid_wechat_order(client, who, wxpay)

    asked = await refund(client, admin, no, 990, reason="duplicate purchase")
    assert (asked["status"], asked["clawback_credits"]) == ("processing", 0)
    assert (await quota(client, who))["balance"] == 100
    wxpay.finish_refund(asked["refund_no"])
    note = wxpay.refund_notification(asked["refund_no"])

    statuses = await asyncio.gather(*(deliver_refund((client, client2)[i % 2], note) for i in range(12)))

    assert statuses == [204] * 12
    assert (await quota(client, who))["balance"] == 0
    detail = await admin_order(client, admin, no)
    assert (detail["status"], detail["refunded_fen"]) == ("refunded", 990)
    assert [(r["status"], r["clawback_credits"]) for r in detail["refunds"]] == [("succeeded", 100)]
    outcomes = [n["outcome"] for n in notifications(services, database) if n["kind"] == "refund"]
    assert outcomes.count("applied") == 1 and outcomes.count("duplicate") == 11
    assert {n["kind"] for n in detail["notifications"]} == {"payment", "refund"}
    await assert_books_clean(client.app[settings_key])


async def test_bad_refund_notifications_change_nothing_and_are_recorded_as_refused(
    client: Any, admin: dict[str, str], wxpay: FakeWeChatPay, services: Services, database: str
) -> None:
    who, _ = await new_buyer(client)
    no = await paid_wechat_order(client, who, wxpay)
    asked = await refund(client, admin, no, 500)
    wxpay.finish_refund(asked["refund_no"])
    headers, body = wxpay.refund_notification(asked["refund_no"])

    answers = [
        await deliver_refund(client, wxpay.refund_notification(asked["refund_no"], amount=990)),
        await deliver_refund(client, wxpay.refund_notification(asked["refund_no"], mchid="1900000999")),
        await deliver_refund(client, (headers, body.replace(b'"id"', b'"Id"'))),
    ]

    assert answers == [400, 400, 400]
    refused = [n for n in notifications(services, database) if n["kind"] == "refund"]
    assert [n["reason"] for n in refused] == [
        "amount 990 differs from the refund's 500",
        "mchid '1900000999' is not ours",
        "bad signature, or the resource did not decrypt",
    ]
    assert [r["status"] for r in refund_rows(services, database)] == ["processing"]
    assert (await quota(client, who))["balance"] == 100


async def test_a_processing_wechat_refund_is_settled_by_the_cron_query(
    client: Any, admin: dict[str, str], wxpay: FakeWeChatPay, services: Services, database: str
) -> None:
    who, _ = await new_buyer(client)
    no = await paid_wechat_order(client, who, wxpay)
    asked = await refund(client, admin, no, 330)
    wxpay.finish_refund(asked["refund_no"])
    services.query(database, "UPDATE refunds SET created_at = created_at - INTERVAL 60 SECOND")

    assert await client.app[payments_key].check_refunds() == 1
    assert await client.app[payments_key].check_refunds() == 0

    detail = await admin_order(client, admin, no)
    assert (detail["status"], detail["refunded_fen"]) == ("partially_refunded", 330)
    assert detail["refunds"][0]["clawback_credits"] == clawback_due(100, 990, 330) == 33
    assert (await quota(client, who))["balance"] == 67
    assert f"query_refund {asked['refund_no']}" in wxpay.calls
    await assert_books_clean(client.app[settings_key])


# ---------------------------------------------------------------- bad input


async def test_bad_refunds_answer_their_code_and_write_nothing(
    client: Any, admin: dict[str, str], alipay: FakeAlipay, services: Services, database: str
) -> None:
    who, _ = await new_buyer(client)
    paid = await paid_alipay_order(client, who, alipay)
    unpaid = (await order(client, who))["order_no"]

    too_much = await refund(client, admin, paid, 991, expect=422)
    not_paid = await refund(client, admin, unpaid, expect=409)
    unknown = await refund(client, admin, "2026" + "0" * 28, expect=404)
    by_buyer = await refund(client, who, paid, expect=403)
    no_reason = await client.post(
        f"/api/v1/admin/orders/{paid}/refund",
        json={"amount_fen": 1},
        headers={**admin, "Idempotency-Key": "x1"},
    )
    no_key = await client.post(f"/api/v1/admin/orders/{paid}/refund", json={"reason": "r"}, headers=admin)

    assert too_much["error"]["details"]["fields"] == [
        {"field": "amount_fen", "message": "at most 990 fen is left to refund"}
    ]
    assert not_paid["error"]["code"] == "CONFLICT" and not_paid["error"]["details"]["status"] == "pending"
    assert unknown["error"]["code"] == "NOT_FOUND"
    assert by_buyer["error"]["code"] == "FORBIDDEN"
    assert no_reason.status == 422 and await error_code(no_reason) == "VALIDATION_FAILED"
    assert no_key.status in (400, 422)
    assert refund_rows(services, database) == []
    assert (await client.get("/api/v1/admin/orders", headers=who)).status == 403
    await refund(client, admin, paid)
    fully = await refund(client, admin, paid, expect=409)  # refunded: nothing to refund any more
    assert fully["error"]["details"]["status"] == "refunded"


async def test_a_refund_key_repeated_answers_the_same_refund_and_another_body_conflicts(
    client: Any, admin: dict[str, str], alipay: FakeAlipay, services: Services, database: str
) -> None:
    who, _ = await new_buyer(client)
    no = await paid_alipay_order(client, who, alipay)

    first = await refund(client, admin, no, 100, key="same")
    again = await refund(client, admin, no, 100, key="same", expect=200)
    other = await refund(client, admin, no, 200, key="same", expect=409)

    assert again == first
    assert other["error"]["code"] == "IDEMPOTENCY_CONFLICT"
    assert len(refund_rows(services, database)) == 1
    assert (await quota(client, who))["balance"] == 90


async def test_admin_order_lists_filter_by_status_and_user(
    client: Any, admin: dict[str, str], alipay: FakeAlipay
) -> None:
    who, user_id = await new_buyer(client)
    other, _ = await new_buyer(client)
    paid = await paid_alipay_order(client, who, alipay)
    pending = (await order(client, who))["order_no"]
    await order(client, other)

    mine = await (await client.get(f"/api/v1/admin/orders?user_id={user_id}", headers=admin)).json()
    paid_only = await (await client.get("/api/v1/admin/orders?status=paid", headers=admin)).json()
    page = await (await client.get("/api/v1/admin/orders?limit=2", headers=admin)).json()

    assert [o["order_no"] for o in mine["items"]] == sorted([paid, pending], reverse=True)
    assert {o["user_id"] for o in mine["items"]} == {str(user_id)}
    assert [o["order_no"] for o in paid_only["items"]] == [paid]
    assert len(page["items"]) == 2 and page["next_cursor"]
    rest = await (
        await client.get(f"/api/v1/admin/orders?limit=2&cursor={page['next_cursor']}", headers=admin)
    ).json()
    assert len(rest["items"]) == 1 and rest["next_cursor"] is None
    bad = await client.get("/api/v1/admin/orders?status=lost", headers=admin)
    assert bad.status == 422


async def test_check_orders_reports_a_refund_whose_clawback_is_missing(
    client: Any, admin: dict[str, str], alipay: FakeAlipay, services: Services, database: str
) -> None:
    who, _ = await new_buyer(client)
    no = await paid_alipay_order(client, who, alipay)
    done = await refund(client, admin, no, 495)
    services.query(database, "DELETE FROM quota_ledger WHERE kind = 'refund' AND ref = %s", done["refund_no"])

    code, out = await run_command(client.app[settings_key], "check-orders")

    assert code == 1
    assert f"refund {done['refund_no']} (succeeded): 0 clawback row(s) taking 0, expected 1 taking 50" in out


async def test_the_ops_payments_page_shows_orders_refunds_and_why_a_notification_was_refused(
    client: Any, admin: dict[str, str], alipay: FakeAlipay
) -> None:
    who, _ = await new_buyer(client)
    no = await paid_alipay_order(client, who, alipay)
    done = await refund(client, admin, no, 300)
    forged = alipay.notification(no, tamper={"total_amount": "0.01"})
    await client.post(
        "/api/v1/payments/alipay/notify",
        data=forged,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )

    def cookie(headers: dict[str, str]) -> dict[str, str]:
        return {"Cookie": f"ops_token={headers['Authorization'].removeprefix('Bearer ')}"}

    page = await client.get("/ops/payments", headers=cookie(admin))
    by_user = await client.get("/ops/payments", headers=cookie(who))
    anonymous = await client.get("/ops/payments", allow_redirects=False)

    html = await page.text()
    assert page.status == 200
    assert no in html and done["refund_no"] in html and "partially_refunded" in html
    assert "bad signature" in html and "refused" in html
    assert by_user.status == 403 and anonymous.status == 303


async def test_a_refund_answer_about_another_order_is_left_processing_and_the_cron_query_settles_it(
    client: Any, admin: dict[str, str], alipay: FakeAlipay, services: Services, database: str
) -> None:
    who, _ = await new_buyer(client)
    no = await paid_alipay_order(client, who, alipay)
    alipay.refund_answer = {"out_trade_no": "2026" + "1" * 28}

    asked = await refund(client, admin, no)

    assert (asked["status"], asked["clawback_credits"]) == ("processing", 0)
    assert (await quota(client, who))["balance"] == 100
    services.query(database, "UPDATE refunds SET created_at = created_at - INTERVAL 60 SECOND")
    assert await client.app[payments_key].check_refunds() == 1
    detail = await admin_order(client, admin, no)
    assert (detail["status"], detail["refunds"][0]["status"]) == ("refunded", "succeeded")
    assert (await quota(client, who))["balance"] == 0
    await assert_books_clean(client.app[settings_key])


# ---------------------------------------------------------------- numbers no order can have


async def test_a_number_no_order_can_have_is_not_found_on_every_path_and_a_forged_cursor_is_422(
    client: Any, admin: dict[str, str], wxpay: FakeWeChatPay, services: Services, database: str
) -> None:
    """The order columns are ASCII: such a number reached MySQL, which refused the comparison
    (error 1267), and each of these answered 500."""
    who, buyer_id = await new_buyer(client)
    before = await quota(client, who)
    for number in ("ü😀", "a'b", "1" * 33):
        quoted = urllib.parse.quote(number)
        for method, path, headers in (
            ("GET", f"/api/v1/orders/{quoted}", who),
            ("POST", f"/api/v1/orders/{quoted}/close", who),
            ("POST", f"/api/v1/dev/orders/{quoted}/paid", {}),
            ("GET", f"/api/v1/admin/orders/{quoted}", admin),
        ):
            resp = await client.request(method, path, headers=headers)
            assert resp.status == 404 and await error_code(resp) == "NOT_FOUND", (method, number)
        await refund(client, admin, quoted, 100, expect=404)
    forged = encode_cursor("ü")  # a cursor of the right shape holding a number that cannot be one
    for path, headers in (("/api/v1/orders", who), ("/api/v1/admin/orders", admin)):
        resp = await client.get(path, params={"cursor": forged}, headers=headers)
        assert resp.status == 422 and await error_code(resp) == "VALIDATION_FAILED", path
    # Only WeChat Pay can sign a notification naming such a number; it is refused and recorded.
    made = await order(client, who, "credits-100", "wechat_native")
    trade = {**wxpay.pay(made["order_no"]), "out_trade_no": "ü😀", "attach": attach_of(buyer_id)}
    headers, body = wxpay.notification(made["order_no"], resource=trade)
    resp = await client.post("/api/v1/payments/wechat/notify", data=body, headers=headers)
    assert resp.status == 400
    last = notifications(services, database)[-1]
    assert (last["outcome"], last["reason"], last["verified"]) == ("refused", "unknown order", 1)
    assert services.query(database, "SELECT COUNT(*) AS n FROM refunds")[0]["n"] == 0
    assert await quota(client, who) == before
