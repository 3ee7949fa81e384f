"""The caller's own account: /api/v1/me, password, phone, referrals; invite code checks."""

from __future__ import annotations

import unicodedata
from urllib.parse import urlsplit

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.auth import banned, client_of, principal_of
from server.auth.schemas import Gender, PhoneIn, User, mask_phone, password_problem, sms_code_field, user_json
from server.errors import ErrorCode, NotFound
from server.keys import auth_key
from server.paging import Page, PageQuery
from server.routing import RouteTable, json_response, omittable
from server.timing import rfc3339

routes = RouteTable(tags=["users"], auth="user")

E = ErrorCode
NICKNAME_MAX = 20
AVATAR_MAX = 1024
OWN_ASSET_PREFIXES = ("/api/v1/assets/", "/files/")


class ProfileIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    nickname: str | None = omittable(description="1–20 characters, trimmed, no control characters")
    avatar_url: str | None = Field(None, description="https URL or one of our asset URLs; null clears it")
    gender: Gender | None = omittable()

    @field_validator("nickname")
    @classmethod
    def _nickname(cls, v: str | None) -> str | None:
        if v is None:
            raise ValueError("cannot be null")
        v = v.strip()
        if not 1 <= len(v) <= NICKNAME_MAX:
            raise ValueError(f"must be 1 to {NICKNAME_MAX} characters")
        if any(unicodedata.category(c).startswith("C") for c in v):
            raise ValueError("must not contain control characters")
        return v

    @field_validator("avatar_url")
    @classmethod
    def _avatar(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if len(v) > AVATAR_MAX or any(c.isspace() or unicodedata.category(c).startswith("C") for c in v):
            raise ValueError("is not a valid URL")
        if v.startswith(OWN_ASSET_PREFIXES) and ".." not in v:
            return v
        parts = urlsplit(v)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError("must be an https URL or one of our asset URLs")
        return v

    @field_validator("gender")
    @classmethod
    def _gender(cls, v: Gender | None) -> Gender | None:
        if v is None:
            raise ValueError("cannot be null")
        return v


class PasswordIn(BaseModel):
    new_password: str = Field(description="8–72 characters with a letter and a digit")
    old_password: str | None = Field(None, max_length=128)
    sms_code: str | None = sms_code_field(None)

    @field_validator("new_password")
    @classmethod
    def _rules(cls, v: str) -> str:
        problem = password_problem(v)
        if problem:
            raise ValueError(problem)
        return v


class BindPhoneIn(PhoneIn):
    sms_code: str = sms_code_field()


class Referral(BaseModel):
    phone: str | None = Field(description="Masked: 138****8000")
    nickname: str | None
    joined_at: str


class ReferralPage(Page[Referral]):
    pass


class InviteCodeCheck(BaseModel):
    valid: bool


@routes.get("/api/v1/me", response=User, errors=[E.FORBIDDEN])
async def get_me(request: web.Request) -> web.Response:
    """The caller's profile."""
    record = await request.app[auth_key].profiles.require(principal_of(request).user_id)
    if record["status"] != "active":
        raise banned()
    return json_response(user_json(record))  # the hottest read: no model round trip


@routes.patch("/api/v1/me", body=ProfileIn, response=User, errors=[E.FORBIDDEN])
async def update_me(request: web.Request, body: ProfileIn) -> User:
    """Change nickname, avatar_url or gender; fields left out stay as they are."""
    changes = {name: getattr(body, name) for name in body.model_fields_set}
    profiles = request.app[auth_key].profiles
    user_id = principal_of(request).user_id
    current = await profiles.require(user_id)
    if current["status"] != "active":
        raise banned()
    return User.of(await profiles.update(user_id, changes))


@routes.post(
    "/api/v1/me/password",
    body=PasswordIn,
    status=204,
    errors=[E.INVALID_CREDENTIALS, E.ACCOUNT_LOCKED, E.RATE_LIMITED],
)
async def change_password(request: web.Request, body: PasswordIn) -> None:
    """Set or change the password: the old one or a `reset_password` SMS code is needed when
    one is set. Every other session ends."""
    await request.app[auth_key].account.change_password(
        principal_of(request), body.new_password, body.old_password, body.sms_code, client_of(request).ip
    )


@routes.post(
    "/api/v1/me/phone",
    body=BindPhoneIn,
    response=User,
    errors=[E.INVALID_CREDENTIALS, E.PHONE_TAKEN, E.CONFLICT],
)
async def bind_phone(request: web.Request, body: BindPhoneIn) -> User:
    """Bind a phone to an account that has none (WeChat sign-up), with a `register` SMS code.

    A phone that already has an account answers PHONE_TAKEN: accounts are never merged."""
    record = await request.app[auth_key].account.bind_phone(principal_of(request), body.phone, body.sms_code)
    return User.of(record)


@routes.get("/api/v1/me/referrals", query=PageQuery, response=ReferralPage)
async def my_referrals(request: web.Request, query: PageQuery) -> ReferralPage:
    """The users who registered with the caller's invite code, newest first."""
    profiles = request.app[auth_key].profiles
    rows, cursor = await profiles.referrals(principal_of(request).user_id, query.cursor, query.limit)
    items = [
        Referral(phone=mask_phone(r["phone"]), nickname=r["nickname"], joined_at=rfc3339(r["created_at"]))
        for r in rows
    ]
    return ReferralPage(items=items, next_cursor=cursor)


@routes.get("/api/v1/invite-codes/{code}", auth="public", response=InviteCodeCheck, errors=[E.NOT_FOUND])
async def check_invite_code(request: web.Request) -> InviteCodeCheck:
    """Whether an invite code can be used to register (case-insensitive); 404 when not."""
    owner = await request.app[auth_key].profiles.invite_code_owner(request.match_info["code"][:32])
    if owner is None:
        raise NotFound("No such invite code")
    return InviteCodeCheck(valid=True)
