"""Products, orders and payment notifications (API.md "Products, orders and payments")."""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, Field, field_validator

from server.auth import principal_of
from server.errors import ErrorCode, validation_failed
from server.keys import payments_key
from server.paging import Page, PageQuery
from server.payments.facade import Order
from server.routing import RouteTable, idempotency_key, omittable
from server.timing import rfc3339

public = RouteTable(tags=["payments"], auth="public")
routes = RouteTable(tags=["payments"], auth="user")
admin_routes = RouteTable(tags=["admin"], auth="admin")

Channel = Literal["wechat_jsapi", "wechat_native", "alipay_qr"]
OrderStatus = Literal["pending", "paid", "partially_refunded", "refunded", "closed"]
NOTIFY_MAX_BYTES = 64 * 1024


class ProductOut(BaseModel):
    id: str
    kind: Literal["credits", "membership"]
    name: str
    price_fen: int
    credits: int
    membership_days: int
    enabled: bool


class Catalogue(BaseModel):
    items: list[ProductOut]
    channels: list[Channel] = Field(description="the channels this server has merchant settings for")


class ProductIn(BaseModel):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$", description="a slug, e.g. credits-100")
    kind: Literal["credits", "membership"]
    name: str = Field(min_length=1, max_length=100)
    price_fen: int = Field(gt=0, le=100_000_000)
    credits: int = Field(0, ge=0, le=10_000_000)
    membership_days: int = Field(0, ge=0, le=3660)
    enabled: bool = True


class ProductPatch(BaseModel):
    name: str | None = omittable(min_length=1, max_length=100)
    price_fen: int | None = omittable(gt=0, le=100_000_000)
    credits: int | None = omittable(ge=0, le=10_000_000)
    membership_days: int | None = omittable(ge=0, le=3660)
    enabled: bool | None = omittable()

    @field_validator("*")
    @classmethod
    def _not_null(cls, v: Any) -> Any:
        if v is None:
            raise ValueError("may be left out but not null")
        return v


class OrderIn(BaseModel):
    product_id: str = Field(min_length=1, max_length=32)
    channel: Channel


class OrderOut(BaseModel):
    order_no: str
    product_id: str
    channel: Channel
    amount_fen: int
    status: OrderStatus
    pay_params: dict[str, Any] | None = Field(
        description="while pending: wechat_native {code_url}; wechat_jsapi the wx.requestPayment object; "
        "alipay_qr {qr_code}"
    )
    paid_at: str | None
    expires_at: str
    refunded_fen: int
    created_at: str


class OrderPage(Page[OrderOut]):
    pass


class RefundIn(BaseModel):
    amount_fen: int | None = Field(
        None, gt=0, le=100_000_000, description="fen to refund; left out: all that is left refundable"
    )
    reason: str = Field(min_length=1, max_length=200)


class RefundOut(BaseModel):
    refund_no: str
    order_no: str
    amount_fen: int
    status: Literal["processing", "succeeded", "failed"]
    reason: str
    clawback_credits: int = Field(description="credits taken back from the buyer")
    clawback_shortfall: int = Field(description="credits that could not be taken back (already spent)")
    created_at: str
    finished_at: str | None


class NotificationOut(BaseModel):
    id: int
    provider: str
    kind: Literal["payment", "refund"]
    event_id: str | None
    order_no: str | None
    verified: bool
    outcome: Literal["applied", "duplicate", "refused", "error"]
    reason: str | None = Field(description="why it was refused or failed")
    created_at: str


class AdminOrderOut(OrderOut):
    user_id: str


class AdminOrderDetail(AdminOrderOut):
    refunds: list[RefundOut]
    notifications: list[NotificationOut] = Field(
        description="every notification received for it, newest first"
    )


class AdminOrderPage(Page[AdminOrderOut]):
    pass


class AdminOrderQuery(PageQuery):
    status: OrderStatus | None = None
    user_id: int | None = Field(None, ge=1)


def notification_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": int(row["id"]),
        "provider": row["provider"],
        "kind": row["kind"],
        "event_id": row["event_id"],
        "order_no": row["order_no"],
        "verified": bool(row["verified"]),
        "outcome": row["outcome"],
        "reason": row["reason"],
        "created_at": rfc3339(row["created_at"]),
    }


@public.get("/api/v1/products", response=Catalogue)
async def list_products(request: web.Request) -> dict[str, Any]:
    """The products on sale, and the payment channels offered."""
    payments = request.app[payments_key]
    items = [p.public() for p in await payments.products.list(enabled_only=True)]
    return {"items": items, "channels": payments.channels()}


@routes.post(
    "/api/v1/orders",
    body=OrderIn,
    response=OrderOut,
    status=201,
    errors=[ErrorCode.IDEMPOTENCY_CONFLICT, ErrorCode.UPSTREAM_FAILED, ErrorCode.BUSY],
    extra_responses={200: "A repeat of an earlier request (same Idempotency-Key and body): the same order"},
)
async def create_order(request: web.Request, body: OrderIn) -> web.Response:
    """Order a product. Requires an `Idempotency-Key` header.

    422 (field `product_id`) for an unknown or disabled product; 422 (field `channel`) for
    a channel without merchant settings, or `wechat_jsapi` for an account that never
    signed in with WeChat. Nothing is written in either case."""
    key = idempotency_key(request)
    user_id = principal_of(request).user_id
    order, created = await request.app[payments_key].create_order(user_id, key, body.product_id, body.channel)
    return web.json_response(order.public(), status=201 if created else 200)


@routes.get("/api/v1/orders", query=PageQuery, response=OrderPage)
async def list_orders(request: web.Request, query: PageQuery) -> dict[str, Any]:
    """The caller's orders, newest first."""
    items, cursor = await request.app[payments_key].list_orders(
        principal_of(request).user_id, query.cursor, query.limit
    )
    return {"items": [o.public() for o in items], "next_cursor": cursor}


@routes.get("/api/v1/orders/{order_no}", response=OrderOut, errors=[ErrorCode.NOT_FOUND])
async def get_order(request: web.Request) -> dict[str, Any]:
    """One of the caller's orders. A pending order older than ORDER_QUERY_INTERVAL (10 s)
    asks the provider (at most once per interval per order) and is settled if paid."""
    order = await request.app[payments_key].get_order(
        principal_of(request).user_id, request.match_info["order_no"]
    )
    return order.public()


@routes.post(
    "/api/v1/orders/{order_no}/close",
    response=OrderOut,
    errors=[ErrorCode.NOT_FOUND, ErrorCode.CONFLICT, ErrorCode.UPSTREAM_FAILED],
)
async def close_order(request: web.Request) -> dict[str, Any]:
    """Close a pending order, at the provider first. One the provider reports paid becomes
    `paid` (answered 200 with that status); a paid or refunded order answers 409."""
    order = await request.app[payments_key].close_order(
        principal_of(request).user_id, request.match_info["order_no"]
    )
    return order.public()


async def _notify_body(request: web.Request) -> bytes | web.Response:
    """The raw body (≤ 64 KiB), or the FAIL answer to give."""
    if request.content_length is not None and request.content_length > NOTIFY_MAX_BYTES:
        return web.json_response({"code": "FAIL", "message": "body too large"}, status=413)
    try:
        body = await request.content.read(NOTIFY_MAX_BYTES + 1)
    except web.RequestPayloadError:
        return web.json_response({"code": "FAIL", "message": "unreadable body"}, status=400)
    if len(body) > NOTIFY_MAX_BYTES:
        return web.json_response({"code": "FAIL", "message": "body too large"}, status=413)
    return body


async def _wechat_answer(request: web.Request, refund: bool) -> web.Response:
    """A WeChat Pay notification (payment or refund) in WeChat's answer format: 204 when
    applied or applied before, else `{"code": "FAIL", "message"}` (WeChat retries)."""
    body = await _notify_body(request)
    if isinstance(body, web.Response):
        return body
    payments = request.app[payments_key]
    handle = payments.wechat_refund_notification if refund else payments.wechat_notification
    status, message = await handle(request.headers, body, request.remote)
    if status == 204:
        return web.Response(status=204)
    return web.json_response({"code": "FAIL", "message": message or "failed"}, status=status)


async def _wechat_notify(request: web.Request) -> web.Response:
    return await _wechat_answer(request, refund=False)


@public.post(
    "/api/v1/payments/wechat/notify",
    status=204,
    extra_responses={400: "Refused (FAIL); recorded", 500: "Not applied (FAIL); WeChat retries"},
    content_type="application/json",
)
async def wechat_notify(request: web.Request) -> web.Response:
    """WeChat Pay APIv3 payment notification (signed, AES-256-GCM encrypted).

    204 when applied or applied before; otherwise `{"code": "FAIL", "message"}` with a
    4xx (refused: bad signature, stale timestamp, wrong amount, app id or merchant, unknown
    order) or 5xx (not applied now; WeChat retries). Every notification is recorded."""
    return await _wechat_notify(request)


@public.post("/api/v1/payments/wechat/notify/", status=204, include_in_schema=False)
async def wechat_notify_slash(request: web.Request) -> web.Response:
    return await _wechat_notify(request)


async def _wechat_refund_notify(request: web.Request) -> web.Response:
    return await _wechat_answer(request, refund=True)


@public.post(
    "/api/v1/payments/wechat/refund-notify",
    status=204,
    extra_responses={400: "Refused (FAIL); recorded", 500: "Not applied (FAIL); WeChat retries"},
    content_type="application/json",
)
async def wechat_refund_notify(request: web.Request) -> web.Response:
    """WeChat Pay APIv3 refund notification (REFUND.SUCCESS / ABNORMAL / CLOSED), with the
    payment notification's rules: signature, serial, timestamp, decryption, then the refund
    number, order number, amount and merchant id must match our refund. Applied once."""
    return await _wechat_refund_notify(request)


@public.post("/api/v1/payments/wechat/refund-notify/", status=204, include_in_schema=False)
async def wechat_refund_notify_slash(request: web.Request) -> web.Response:
    return await _wechat_refund_notify(request)


async def _alipay_notify(request: web.Request) -> web.Response:
    body = await _notify_body(request)
    if isinstance(body, web.Response):
        return web.Response(text="failure", content_type="text/plain", status=body.status)
    applied = await request.app[payments_key].alipay_notification(body, request.remote)
    return web.Response(text="success" if applied else "failure", content_type="text/plain")


@public.post(
    "/api/v1/payments/alipay/notify",
    status=200,
    content_type="text/plain",
    extra_responses={413: "Body too large (failure)"},
)
async def alipay_notify(request: web.Request) -> web.Response:
    """Alipay asynchronous notification (form-encoded, RSA2 signed).

    Answers the text `success` when applied or applied before; `failure` otherwise (bad
    signature, another app id, wrong amount or order, not TRADE_SUCCESS/TRADE_FINISHED, or
    not applied now), so Alipay retries. Every notification is recorded."""
    return await _alipay_notify(request)


@public.post("/api/v1/payments/alipay/notify/", status=200, include_in_schema=False)
async def alipay_notify_slash(request: web.Request) -> web.Response:
    return await _alipay_notify(request)


@admin_routes.post(
    "/api/v1/admin/orders/{order_no}/refund",
    body=RefundIn,
    response=RefundOut,
    status=202,
    errors=[
        ErrorCode.NOT_FOUND,
        ErrorCode.CONFLICT,
        ErrorCode.IDEMPOTENCY_CONFLICT,
        ErrorCode.UPSTREAM_FAILED,
        ErrorCode.BUSY,
    ],
    extra_responses={200: "A repeat of an earlier request (same Idempotency-Key and body): the same refund"},
)
async def refund_order(request: web.Request, body: RefundIn) -> web.Response:
    """Refund a paid order, in part or in full. Requires an `Idempotency-Key` header.

    409 CONFLICT for an order that is not paid (or already fully refunded); 422 (field
    `amount_fen`) for more than is left (refunds still processing count as taken). Nothing
    is written in either case. Alipay refunds answer `succeeded` or `failed` at once; WeChat
    Pay ones usually `processing` until its refund notification or our query."""
    key = idempotency_key(request)
    refund, created = await request.app[payments_key].refunds.refund(
        principal_of(request).user_id, request.match_info["order_no"], key, body.amount_fen, body.reason
    )
    return web.json_response(refund.public(), status=202 if created else 200)


@admin_routes.get("/api/v1/admin/orders", query=AdminOrderQuery, response=AdminOrderPage)
async def admin_list_orders(request: web.Request, query: AdminOrderQuery) -> dict[str, Any]:
    """Every order, newest first; filter by `status` and `user_id`."""
    items, cursor = await request.app[payments_key].admin_orders(
        query.status, query.user_id, query.cursor, query.limit
    )
    return {"items": [_admin_order(o) for o in items], "next_cursor": cursor}


@admin_routes.get("/api/v1/admin/orders/{order_no}", response=AdminOrderDetail, errors=[ErrorCode.NOT_FOUND])
async def admin_get_order(request: web.Request) -> dict[str, Any]:
    """One order with its refunds and every notification received about it."""
    order, refunds, notes = await request.app[payments_key].admin_order(request.match_info["order_no"])
    return {
        **_admin_order(order),
        "refunds": [r.public() for r in refunds],
        "notifications": [notification_view(n) for n in notes],
    }


def _admin_order(order: Order) -> dict[str, Any]:
    return {**order.public(), "user_id": str(order.user_id)}


@admin_routes.post(
    "/api/v1/admin/products", body=ProductIn, response=ProductOut, status=201, errors=[ErrorCode.CONFLICT]
)
async def create_product(request: web.Request, body: ProductIn) -> web.Response:
    """Create a product (a credit pack grants credits; a membership lasts membership_days)."""
    product = await request.app[payments_key].products.create(body.model_dump())
    return web.json_response(product.public(), status=201)


@admin_routes.patch(
    "/api/v1/admin/products/{product_id}",
    body=ProductPatch,
    response=ProductOut,
    errors=[ErrorCode.NOT_FOUND],
)
async def update_product(request: web.Request, body: ProductPatch) -> dict[str, Any]:
    """Change a product's name, price or terms, or disable it. Orders already made keep theirs."""
    changes = body.model_dump(exclude_unset=True)
    if not changes:
        raise validation_failed([{"field": "body", "message": "change at least one field"}])
    product = await request.app[payments_key].products.update(request.match_info["product_id"], changes)
    return product.public()
