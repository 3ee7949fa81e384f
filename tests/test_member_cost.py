"""`member_cost` on features: a member's task reserves it instead of `cost`."""

from __future__ import annotations

from typing import Any

from aiohttp import FormData

from actors.user import UserActor
from server.credits.ledger import Grant
from server.keys import actor_system_key
from tests import payments_support as support
from tests.auth_support import register
from tests.conftest import Services
from tests.payments_support import bearer, order
from tests.test_tasks import image_bytes

# The shared fixtures (pytest finds them by these module-level names).
wx_keys, ali_keys, wxpay_gateway, alipay_gateway = (
    support.wx_keys,
    support.ali_keys,
    support.wxpay_gateway,
    support.alipay_gateway,
)
settings, admin = support.settings, support.admin
wechat_server = support.wechat_server  # the fake WeChat login API the settings name


async def reserved_for_task(client: Any, who: dict[str, str], services: Services, database: str) -> int:
    form = FormData()
    form.add_field("file", image_bytes("teal"), filename="p.png", content_type="image/png")
    photo = await (await client.post("/api/v1/assets", data=form, headers=who)).json()
    resp = await client.post(
        "/api/v1/tasks",
        json={"feature": "bg-remove", "inputs": {"image": photo["id"]}},
        headers={**who, "Idempotency-Key": f"t-{photo['id']}"},
    )
    assert resp.status == 202, await resp.text()
    task = await resp.json()
    rows = services.query(database, "SELECT amount FROM quota_transactions WHERE task_id = %s", task["id"])
    assert int(task["cost"]) == int(rows[0]["amount"])
    return int(rows[0]["amount"])


async def test_a_members_task_reserves_the_member_cost_and_others_the_cost(
    client: Any, admin: dict[str, str], services: Services, database: str
) -> None:
    patched = await client.patch(
        "/api/v1/admin/features/bg-remove", json={"cost": 5, "member_cost": 2}, headers=admin
    )
    assert (await patched.json())["member_cost"] == 2
    listed = {f["slug"]: f for f in await (await client.get("/api/v1/features")).json()}
    assert (listed["bg-remove"]["cost"], listed["bg-remove"]["member_cost"]) == (5, 2)
    member_body, plain_body = await register(client), await register(client)
    member, plain = bearer(member_body["access_token"]), bearer(plain_body["access_token"])
    made = await order(client, member, "member-month", "alipay_qr")
    assert (await client.post(f"/api/v1/dev/orders/{made['order_no']}/paid")).status == 200
    await client.app[actor_system_key].ref(UserActor, int(plain_body["user"]["id"])).ask(Grant(10, "grant"))

    assert await reserved_for_task(client, member, services, database) == 2
    assert await reserved_for_task(client, plain, services, database) == 5

    cleared = await client.patch(
        "/api/v1/admin/features/bg-remove", json={"member_cost": None}, headers=admin
    )
    assert (await cleared.json())["member_cost"] is None
    assert await reserved_for_task(client, member, services, database) == 5
