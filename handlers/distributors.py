"""Distributors and personal data (API.md): apply, the distributor's own view and
commissions; admin list, decisions, rate, the audited identity read and delete; the
audit log."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, Field

from server.auth import client_of, principal_of
from server.distributors.facade import Access, Caller, as_json
from server.errors import ErrorCode
from server.keys import distributors_key, request_id_key
from server.paging import Page, PageQuery
from server.routing import RouteTable, path_id
from server.timing import rfc3339

routes = RouteTable(tags=["distributors"], auth="user")
admin_routes = RouteTable(tags=["admin"], auth="admin")
# The identity routes take any signed-in caller, so that a refused call is audited too.
pii_routes = RouteTable(tags=["admin"], auth="user")

E = ErrorCode
Status = Literal["pending", "approved", "rejected"]


class ApplyIn(BaseModel):
    real_name: str = Field(min_length=1, max_length=64)
    id_card_no: str = Field(min_length=1, max_length=32, description="18-character mainland ID number")


class Earnings(BaseModel):
    pending_fen: int
    settled_fen: int
    reversed_fen: int


class Distributor(BaseModel):
    user_id: str
    status: Status
    real_name_masked: str
    id_card_masked: str
    commission_rate: str = Field(description="decimal fraction, e.g. 0.10")
    decided_at: str | None
    decision_reason: str | None
    identity_deleted: bool
    created_at: str

    @staticmethod
    def fields_of(row: dict[str, Any]) -> dict[str, Any]:
        return {
            "user_id": str(row["user_id"]),
            "status": row["status"],
            "real_name_masked": row["real_name_masked"],
            "id_card_masked": row["id_card_masked"],
            "commission_rate": row["commission_rate"],
            "decided_at": None if row["decided_at"] is None else rfc3339(row["decided_at"]),
            "decision_reason": row["decision_reason"],
            "identity_deleted": row["identity_deleted_at"] is not None,
            "created_at": rfc3339(row["created_at"]),
        }

    @classmethod
    def of(cls, row: dict[str, Any]) -> Distributor:
        return cls(**cls.fields_of(row))


class DistributorMe(Distributor):
    earnings: Earnings
    referrals: int

    @classmethod
    def of(cls, row: dict[str, Any]) -> DistributorMe:
        return cls(**cls.fields_of(row), earnings=Earnings(**row["earnings"]), referrals=row["referrals"])


class Commission(BaseModel):
    id: str
    order_no: str
    kind: Literal["commission", "adjustment"]
    buyer: str | None = Field(description="the buyer's masked phone")
    amount_fen: int
    status: Literal["pending", "settled", "reversed"]
    settles_at: str


class CommissionPage(Page[Commission]):
    pass


class DistributorPage(Page[Distributor]):
    pass


class DistributorSearch(PageQuery):
    status: Status | None = None


class DecisionIn(BaseModel):
    reason: str | None = Field(None, max_length=255)


class RateIn(BaseModel):
    commission_rate: Decimal | None = Field(
        description="0 to 1 with at most 4 decimals; null: back to DISTRIBUTOR_COMMISSION_RATE",
        ge=0,
        le=1,
        max_digits=5,
        decimal_places=4,
    )


class Identity(BaseModel):
    real_name: str
    id_card_no: str


class AuditEntry(BaseModel):
    id: str
    actor_id: str | None
    action: str
    subject_user_id: str | None
    reason: str | None
    request_id: str | None
    ip: str | None
    allowed: bool
    created_at: str


class AuditPage(Page[AuditEntry]):
    pass


class AuditSearch(PageQuery):
    subject_user_id: int | None = Field(None, ge=1, lt=2**63)
    actor_id: int | None = Field(None, ge=1, lt=2**63)


def _user_id(request: web.Request) -> int:
    return path_id(request, "user_id", "distributor")


def _caller(request: web.Request) -> Caller:
    p = principal_of(request)
    return Caller(user_id=p.user_id, is_admin=p.is_admin, perms=p.perms)


def _access(request: web.Request) -> Access:
    return Access(
        actor_id=principal_of(request).user_id,
        reason=request.headers.get("X-Access-Reason"),
        request_id=request.get(request_id_key),
        ip=client_of(request).ip,
    )


@routes.post(
    "/api/v1/distributors/apply",
    body=ApplyIn,
    response=Distributor,
    status=201,
    errors=[E.VALIDATION_FAILED, E.CONFLICT],
)
async def apply(request: web.Request, body: ApplyIn) -> Distributor:
    """Apply to be a distributor with a real name and ID number (stored encrypted only).

    The number is checked (GB 11643 checksum, a real date, age ≥ 18); a number another
    distributor uses answers 409, found by its blind index without decrypting anything."""
    distributors = request.app[distributors_key]
    row = await distributors.apply(principal_of(request).user_id, body.real_name, body.id_card_no)
    return Distributor.of(row)


@routes.get("/api/v1/distributors/me", response=DistributorMe, errors=[E.NOT_FOUND])
async def me(request: web.Request) -> DistributorMe:
    """The caller's application or distributorship: masked identity, rate, earnings."""
    return DistributorMe.of(await request.app[distributors_key].me(principal_of(request).user_id))


@routes.get("/api/v1/distributors/me/commissions", query=PageQuery, response=CommissionPage)
async def my_commissions(request: web.Request, query: PageQuery) -> CommissionPage:
    """The caller's commissions, newest first (negative adjustments are kind `adjustment`)."""
    rows, cursor = await request.app[distributors_key].commissions(
        principal_of(request).user_id, query.cursor, query.limit
    )
    items = [
        Commission(
            id=str(r["id"]),
            order_no=r["order_no"],
            kind=r["kind"],
            buyer=r["buyer"],
            amount_fen=int(r["amount_fen"]),
            status=r["status"],
            settles_at=rfc3339(r["settles_at"]),
        )
        for r in rows
    ]
    return CommissionPage(items=items, next_cursor=cursor)


@admin_routes.get("/api/v1/admin/distributors", query=DistributorSearch, response=DistributorPage)
async def list_distributors(request: web.Request, query: DistributorSearch) -> DistributorPage:
    """Distributors and applications, newest first, identity masked."""
    rows, cursor = await request.app[distributors_key].search(query.status, query.cursor, query.limit)
    return DistributorPage(items=[Distributor.of(r) for r in rows], next_cursor=cursor)


async def _decide(
    request: web.Request, status: Literal["approved", "rejected"], reason: str | None
) -> Distributor:
    row = await request.app[distributors_key].decide(
        principal_of(request).user_id, _user_id(request), status, reason
    )
    return Distributor.of(row)


@admin_routes.post(
    "/api/v1/admin/distributors/{user_id}/approve",
    body=DecisionIn,
    response=Distributor,
    errors=[E.NOT_FOUND, E.CONFLICT],
)
async def approve(request: web.Request, body: DecisionIn) -> Distributor:
    """Approve a pending application. 409 when it was rejected; the same decision again
    answers the application as the first one left it."""
    return await _decide(request, "approved", body.reason)


@admin_routes.post(
    "/api/v1/admin/distributors/{user_id}/reject",
    body=DecisionIn,
    response=Distributor,
    errors=[E.NOT_FOUND, E.CONFLICT],
)
async def reject(request: web.Request, body: DecisionIn) -> Distributor:
    """Reject a pending application. 409 when it was approved; the same decision again
    answers the application as the first one left it."""
    return await _decide(request, "rejected", body.reason)


@admin_routes.put(
    "/api/v1/admin/distributors/{user_id}/commission-rate",
    body=RateIn,
    response=Distributor,
    errors=[E.NOT_FOUND, E.VALIDATION_FAILED],
)
async def set_rate(request: web.Request, body: RateIn) -> Distributor:
    """Set this distributor's own commission rate (null: the default again); orders paid
    from now on earn it."""
    return Distributor.of(
        await request.app[distributors_key].set_rate(_user_id(request), body.commission_rate)
    )


@pii_routes.get(
    "/api/v1/admin/distributors/{user_id}/identity",
    response=Identity,
    errors=[E.FORBIDDEN, E.VALIDATION_FAILED, E.NOT_FOUND],
)
async def identity(request: web.Request) -> Identity:
    """The real name and ID number in clear: admins with the `pii:read` permission, with
    an `X-Access-Reason` header. Every call, allowed or refused, writes an audit row."""
    distributors = request.app[distributors_key]
    return Identity(**await distributors.identity(_caller(request), _access(request), _user_id(request)))


@pii_routes.delete(
    "/api/v1/admin/distributors/{user_id}/identity",
    response=Distributor,
    errors=[E.FORBIDDEN, E.VALIDATION_FAILED, E.NOT_FOUND],
)
async def delete_identity(request: web.Request) -> Distributor:
    """Delete the identity by destroying its data key (crypto-shredding): the row and its
    masked forms stay, nothing can decrypt it. Needs `pii:read` and `X-Access-Reason`; audited."""
    distributors = request.app[distributors_key]
    row = await distributors.delete_identity(_caller(request), _access(request), _user_id(request))
    return Distributor.of(row)


@admin_routes.get("/api/v1/admin/audit-log", query=AuditSearch, response=AuditPage)
async def audit_log(request: web.Request, query: AuditSearch) -> AuditPage:
    """Personal-data access, newest first; filter by whose data or by whom. Append-only."""
    rows, cursor = await request.app[distributors_key].audit_log(
        query.subject_user_id, query.actor_id, query.cursor, query.limit
    )
    items = [AuditEntry(**{**as_json(r), "created_at": rfc3339(r["created_at"])}) for r in rows]
    return AuditPage(items=items, next_cursor=cursor)
