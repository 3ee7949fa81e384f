"""Operators on accounts: /api/v1/admin/users (list/search, ban/unban, role)."""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, Field

from server.auth import principal_of
from server.auth.schemas import RoleName, User
from server.errors import ErrorCode
from server.keys import auth_key
from server.paging import Page, PageQuery
from server.routing import RouteTable, path_id

routes = RouteTable(tags=["admin"], auth="admin")

E = ErrorCode


class AdminUser(User):
    status: Literal["active", "banned"]
    banned_at: str | None
    ban_reason: str | None
    has_password: bool
    has_wechat: bool

    @classmethod
    def of_admin(cls, record: dict[str, Any]) -> AdminUser:
        base = User.of(record).model_dump()
        return cls(
            **base,
            status=record["status"],
            banned_at=record["banned_at"],
            ban_reason=record["ban_reason"],
            has_password=record["has_password"],
            has_wechat=record["has_wechat"],
        )


class AdminUserPage(Page[AdminUser]):
    pass


class UserSearch(PageQuery):
    q: str | None = Field(
        None, max_length=64, description="An id, a phone (or its prefix) or part of a nickname"
    )
    role: RoleName | None = None
    status: Literal["active", "banned"] | None = None


class BanIn(BaseModel):
    reason: str | None = Field(None, max_length=255)


class RoleIn(BaseModel):
    role: RoleName


def _user_id(request: web.Request) -> int:
    return path_id(request, "user_id", "user")


@routes.get("/api/v1/admin/users", query=UserSearch, response=AdminUserPage)
async def list_users(request: web.Request, query: UserSearch) -> AdminUserPage:
    """Users, newest first, optionally searched by id, phone or nickname."""
    rows, cursor = await request.app[auth_key].admin.search(
        query.q, query.role, query.status, query.cursor, query.limit
    )
    return AdminUserPage(items=[AdminUser.of_admin(r) for r in rows], next_cursor=cursor)


@routes.get("/api/v1/admin/users/{user_id}", response=AdminUser, errors=[E.NOT_FOUND])
async def get_user(request: web.Request) -> AdminUser:
    """One user, with status and ban details."""
    return AdminUser.of_admin(await request.app[auth_key].admin.get(_user_id(request)))


@routes.post(
    "/api/v1/admin/users/{user_id}/ban",
    body=BanIn,
    response=AdminUser,
    errors=[E.NOT_FOUND, E.CONFLICT],
)
async def ban_user(request: web.Request, body: BanIn) -> AdminUser:
    """Ban a user: every session ends now; login and refresh answer FORBIDDEN."""
    admin = request.app[auth_key].admin
    return AdminUser.of_admin(await admin.ban(principal_of(request), _user_id(request), body.reason))


@routes.post("/api/v1/admin/users/{user_id}/unban", response=AdminUser, errors=[E.NOT_FOUND])
async def unban_user(request: web.Request) -> AdminUser:
    """Lift a ban (ended sessions stay ended: the user logs in again)."""
    return AdminUser.of_admin(await request.app[auth_key].admin.unban(_user_id(request)))


@routes.post(
    "/api/v1/admin/users/{user_id}/role",
    body=RoleIn,
    response=AdminUser,
    errors=[E.NOT_FOUND, E.CONFLICT],
)
async def set_user_role(request: web.Request, body: RoleIn) -> AdminUser:
    """Make a user an admin or a plain user; a demoted admin's sessions end."""
    admin = request.app[auth_key].admin
    return AdminUser.of_admin(await admin.set_role(principal_of(request), _user_id(request), body.role))
