"""Development helpers, registered only when APP_ENV is dev or test (404 otherwise)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel

from handlers.payments import OrderOut
from server.auth.schemas import normalized_phone
from server.config import Settings
from server.errors import ErrorCode, NotFound
from server.keys import auth_key, payments_key
from server.routing import RouteTable

routes = RouteTable(tags=["dev"], auth="public")


class SentCode(BaseModel):
    code: str
    purpose: str


@routes.get("/api/v1/dev/sms/{phone}", response=SentCode, errors=[ErrorCode.NOT_FOUND])
async def last_sms_code(request: web.Request) -> SentCode:
    """The last code the console SMS provider sent to a phone, so a front end can log in
    without an SMS gateway."""
    try:
        phone = normalized_phone(request.match_info["phone"])
    except ValueError:
        raise NotFound("No code was sent to this phone") from None
    sent = await request.app[auth_key].last_console_sms(phone)
    if sent is None:
        raise NotFound("No code was sent to this phone")
    return SentCode(code=sent["code"], purpose=sent["purpose"])


@routes.post("/api/v1/dev/orders/{order_no}/paid", response=OrderOut, errors=[ErrorCode.NOT_FOUND])
async def dev_order_paid(request: web.Request) -> dict[str, Any]:
    """Pay an order as a verified notification would (same settle function): credits,
    membership and events follow. A closed order becomes paid, as when money arrives late."""
    order = await request.app[payments_key].dev_paid(request.match_info["order_no"])
    return order.public()


def route_tables(settings: Settings) -> list[RouteTable]:
    return [routes] if settings.app_env in ("dev", "test") else []
