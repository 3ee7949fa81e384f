"""Sign-up, sign-in and sessions: /api/v1/auth/* (API.md "Auth")."""

from __future__ import annotations

from typing import Self

from aiohttp import web
from pydantic import BaseModel, Field, field_validator, model_validator

from server.auth import client_of, principal_of
from server.auth.schemas import AuthResult, PhoneIn, Purpose, TokenPair, password_problem, sms_code_field
from server.errors import ErrorCode
from server.keys import auth_key
from server.routing import RouteTable

routes = RouteTable(tags=["auth"], auth="public")

E = ErrorCode


def _new_password(v: str) -> str:
    problem = password_problem(v)
    if problem:
        raise ValueError(problem)
    return v


class SmsCodeIn(PhoneIn):
    purpose: Purpose


class SmsCodeOut(BaseModel):
    retry_after: int = Field(description="Seconds before another code may be asked for this phone")


class RegisterIn(PhoneIn):
    password: str = Field(description="8–72 characters with a letter and a digit")
    sms_code: str = sms_code_field()
    invite_code: str | None = Field(None, max_length=32, description="Case-insensitive")

    _password = field_validator("password")(_new_password)


class LoginIn(PhoneIn):
    password: str | None = Field(None, max_length=128)
    sms_code: str | None = sms_code_field(None)

    @model_validator(mode="after")
    def _one_way(self) -> Self:
        if (self.password is None) == (self.sms_code is None):
            raise ValueError("send either password or sms_code")
        return self


class WeChatIn(BaseModel):
    code: str = Field(pattern=r"^[\x21-\x7e]{1,128}$", description="The code of wx.login()")


class RefreshIn(BaseModel):
    refresh_token: str = Field(min_length=1, max_length=512)


class ResetIn(PhoneIn):
    sms_code: str = sms_code_field()
    new_password: str = Field(description="8–72 characters with a letter and a digit")

    _password = field_validator("new_password")(_new_password)


@routes.post(
    "/api/v1/auth/sms-codes",
    body=SmsCodeIn,
    response=SmsCodeOut,
    status=202,
    errors=[E.RATE_LIMITED, E.UPSTREAM_FAILED, E.NOT_FOUND],
)
async def send_sms_code(request: web.Request, body: SmsCodeIn) -> SmsCodeOut:
    """Send a 6-digit code (one per phone per 60 s, a daily cap per phone, a cap per IP).

    404 NOT_FOUND when the server sends no SMS (SMS_PROVIDER=disabled)."""
    codes = request.app[auth_key].codes
    wait = await codes.request(body.phone, body.purpose, client_of(request).ip)
    return SmsCodeOut(retry_after=wait)


@routes.post(
    "/api/v1/auth/register",
    body=RegisterIn,
    response=AuthResult,
    status=201,
    errors=[E.INVALID_CREDENTIALS, E.PHONE_TAKEN, E.INVITE_CODE_INVALID],
)
async def register(request: web.Request, body: RegisterIn) -> AuthResult:
    """Register with phone, password and a `register` SMS code (invite code optional)."""
    service = request.app[auth_key].service
    return await service.register(
        body.phone, body.password, body.sms_code, body.invite_code, client_of(request)
    )


@routes.post(
    "/api/v1/auth/login",
    body=LoginIn,
    response=AuthResult,
    errors=[E.INVALID_CREDENTIALS, E.ACCOUNT_LOCKED, E.RATE_LIMITED, E.FORBIDDEN],
)
async def login(request: web.Request, body: LoginIn) -> AuthResult:
    """Log in with a password or a `login` SMS code; an SMS login of an unknown phone registers it.

    Five failures for a phone within 15 minutes lock it (423 with Retry-After)."""
    service = request.app[auth_key].service
    if body.sms_code is not None:
        return await service.login_sms(body.phone, body.sms_code, client_of(request))
    assert body.password is not None
    return await service.login_password(body.phone, body.password, client_of(request))


@routes.post(
    "/api/v1/auth/wechat",
    body=WeChatIn,
    response=AuthResult,
    errors=[E.INVALID_CREDENTIALS, E.RATE_LIMITED, E.UPSTREAM_FAILED, E.FORBIDDEN],
)
async def wechat_login(request: web.Request, body: WeChatIn) -> AuthResult:
    """Log in with a wx.login() code; the account of that openid is created on first use."""
    return await request.app[auth_key].service.login_wechat(body.code, client_of(request))


@routes.post(
    "/api/v1/auth/refresh",
    body=RefreshIn,
    response=TokenPair,
    errors=[E.UNAUTHENTICATED, E.TOKEN_EXPIRED, E.TOKEN_REVOKED, E.FORBIDDEN],
)
async def refresh(request: web.Request, body: RefreshIn) -> TokenPair:
    """Swap a refresh token for a new pair; the old one dies, and reusing it ends the session."""
    return await request.app[auth_key].service.refresh(body.refresh_token)


@routes.post("/api/v1/auth/logout", body=RefreshIn, status=204, errors=[E.UNAUTHENTICATED])
async def logout(request: web.Request, body: RefreshIn) -> None:
    """End the session of this refresh token."""
    await request.app[auth_key].service.logout(body.refresh_token)


@routes.post("/api/v1/auth/logout-all", auth="user", status=204)
async def logout_all(request: web.Request) -> None:
    """End every session of the caller (access tokens die within their 15 minutes)."""
    await request.app[auth_key].service.logout_all(principal_of(request))


@routes.post(
    "/api/v1/auth/password/reset",
    body=ResetIn,
    status=204,
    errors=[E.INVALID_CREDENTIALS],
)
async def reset_password(request: web.Request, body: ResetIn) -> None:
    """Set a new password with a `reset_password` SMS code; every session ends."""
    await request.app[auth_key].account.reset_password(body.phone, body.sms_code, body.new_password)
