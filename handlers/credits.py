"""Credits: the user's quota and ledger, and the admin adjustment."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, Field, field_validator

from server.auth import principal_of
from server.credits.facade import QuotaState
from server.errors import ErrorCode
from server.keys import auth_key, credits_key
from server.paging import Page, PageQuery, decode_cursor, page_of
from server.routing import RouteTable, optional_idempotency_key, path_id

routes = RouteTable(tags=["quota"], auth="user")
admin_routes = RouteTable(tags=["admin"], auth="admin")


class Quota(BaseModel):
    balance: int
    reserved: int
    available: int

    @classmethod
    def of(cls, state: QuotaState) -> Quota:
        return cls(balance=state.balance, reserved=state.reserved, available=state.available)


class LedgerEntry(BaseModel):
    """`amount` is the signed change to `balance`, except for `reserve` (−N: held) and
    `cancel` (+N: released), which change `reserved` and leave `balance` as it was."""

    id: str
    kind: Literal["grant", "reserve", "confirm", "cancel", "refund", "adjust"]
    amount: int
    task_id: str | None = None
    order_no: str | None = None
    reason: str | None = None
    balance_after: int
    reserved_after: int
    available_after: int
    created_at: dt.datetime


class LedgerPage(Page[LedgerEntry]):
    pass


class QuotaAdjust(BaseModel):
    amount: int = Field(description="credits to add (positive) or remove (negative)")
    reason: str = Field(min_length=1, max_length=200)

    @field_validator("amount")
    @classmethod
    def _not_zero(cls, v: int) -> int:
        if v == 0 or abs(v) > 10_000_000:
            raise ValueError("must be non-zero and at most 10,000,000 in size")
        return v

    @field_validator("reason")
    @classmethod
    def _trimmed(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("must not be blank")
        return v


def _amount(row: dict[str, Any]) -> int:
    if row["kind"] in ("reserve", "cancel"):
        return -int(row["reserved_delta"])  # a hold is −N on available, its release +N
    return int(row["balance_delta"])


@routes.get("/api/v1/me/quota", response=Quota)
async def my_quota(request: web.Request) -> Quota:
    """The caller's credits: available = balance − reserved."""
    user_id = principal_of(request).user_id
    state = await request.app[credits_key].balance(user_id)
    return Quota.of(state)


@routes.get("/api/v1/me/quota/ledger", query=PageQuery, response=LedgerPage)
async def my_ledger(request: web.Request, query: PageQuery) -> LedgerPage:
    """Every change to the caller's credits, newest first."""
    user_id = principal_of(request).user_id
    after = decode_cursor(query.cursor, int)
    rows = await request.app[credits_key].ledger(user_id, after[0] if after else None, query.limit + 1)
    rows, next_cursor = page_of(rows, query.limit, lambda r: (int(r["id"]),))
    items = [
        LedgerEntry(
            id=str(r["id"]),
            kind=r["kind"],
            amount=_amount(r),
            task_id=r["task_id"],
            order_no=r["order_no"],
            reason=r["reason"],
            balance_after=int(r["balance_after"]),
            reserved_after=int(r["reserved_after"]),
            available_after=int(r["balance_after"]) - int(r["reserved_after"]),
            created_at=r["created_at"].replace(tzinfo=dt.UTC),
        )
        for r in rows
    ]
    return LedgerPage(items=items, next_cursor=next_cursor)


@admin_routes.post(
    "/api/v1/admin/users/{user_id}/quota",
    body=QuotaAdjust,
    response=Quota,
    errors=[ErrorCode.NOT_FOUND, ErrorCode.QUOTA_INSUFFICIENT, ErrorCode.IDEMPOTENCY_CONFLICT],
)
async def adjust_quota(request: web.Request, body: QuotaAdjust) -> Quota:
    """Add or remove credits with a reason (ledger kind `adjust`); never below zero available.

    With an optional `Idempotency-Key` header (per admin) it is applied once: a repeat
    answers the balance as it is now, and the same key with another user, amount or
    reason is 409 IDEMPOTENCY_CONFLICT, nothing written. Send one, so that a retry after
    a timeout cannot adjust twice."""
    user_id = path_id(request, "user_id", "user")
    key = optional_idempotency_key(request)
    await request.app[auth_key].admin.get(user_id)  # NotFound for an unknown user
    admin = principal_of(request).user_id
    reason = f"{body.reason} (by admin {admin})"[:200]
    scoped = None if key is None else f"admin {admin}:{key}"
    state = await request.app[credits_key].adjust(user_id, body.amount, reason, key=scoped)
    return Quota.of(state)
