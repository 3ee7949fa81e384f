"""Products, orders and payment notifications (API.md "Products, orders and payments")."""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, Field, field_validator

from server.auth.middleware import principal_of
from server.errors import ErrorCode, validation_failed
from server.keys import payments_key
from server.paging import Page, PageQuery
from server.routing import RouteTable, omittable
from server.tasks.service import check_idempotency_key

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
    key = check_idempotency_key(request.headers.get("Idempotency-Key"))
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


async def _wechat_notify(request: web.Request) -> web.Response:
    if request.content_length is not None and request.content_length > NOTIFY_MAX_BYTES:
        return web.json_response({"code": "FAIL", "message": "body too large"}, status=413)
    try:
        body = await request.content.read(NOTIFY_MAX_BYTES + 1)
    except web.RequestPayloadError:
        return web.json_response({"code": "FAIL", "message": "unreadable body"}, status=400)
    if len(body) > NOTIFY_MAX_BYTES:
        return web.json_response({"code": "FAIL", "message": "body too large"}, status=413)
    status, message = await request.app[payments_key].wechat_notification(
        request.headers, body, request.remote
    )
    if status == 204:
        return web.Response(status=204)
    return web.json_response({"code": "FAIL", "message": message or "failed"}, status=status)


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
