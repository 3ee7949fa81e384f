"""The wire shapes of accounts (API.md "Auth" and "Users"), shared by the handlers."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from server.auth.accounts import PHONE_RE, mask_phone
from server.auth.passwords import password_problem
from server.auth.sms import Purpose
from server.timing import rfc3339

# mask_phone, password_problem and Purpose live beside the code that uses them; they are
# part of the contract, so the handlers take them from here.
__all__ = [
    "USER_COLUMNS",
    "AuthResult",
    "Gender",
    "Membership",
    "PhoneIn",
    "Purpose",
    "RoleName",
    "TokenPair",
    "User",
    "mask_phone",
    "membership_json",
    "normalized_phone",
    "password_problem",
    "permissions_of",
    "record_of",
    "sms_code_field",
    "user_json",
]

Gender = Literal["male", "female", "unknown"]
RoleName = Literal["user", "admin"]

# The columns a user record (and the profile cache) holds; never the password hash.
USER_COLUMNS = (
    "id, phone, nickname, avatar_url, gender, role, status, invite_code, referrer_id, created_at, "
    "password_hash IS NOT NULL AS has_password, wechat_openid IS NOT NULL AS has_wechat, "
    "membership_tier, membership_expires_at, permissions"
)


def record_of(row: dict[str, Any]) -> dict[str, Any]:
    """A user row (USER_COLUMNS) as a JSON-able record: the profile cache's value."""
    return {
        "id": int(row["id"]),
        "phone": row["phone"],
        "nickname": row["nickname"],
        "avatar_url": row["avatar_url"],
        "gender": row["gender"],
        "role": row["role"],
        "status": row["status"],
        "invite_code": row["invite_code"],
        "referrer_id": None if row["referrer_id"] is None else int(row["referrer_id"]),
        "created_at": rfc3339(row["created_at"]),
        "has_password": bool(row["has_password"]),
        "has_wechat": bool(row["has_wechat"]),
        "membership_tier": row["membership_tier"],
        "permissions": permissions_of(row.get("permissions")),
        "membership_expires_at": (
            None if row["membership_expires_at"] is None else rfc3339(row["membership_expires_at"])
        ),
    }


def permissions_of(value: str | None) -> list[str]:
    """The users.permissions column ("pii:read,…") as a sorted list (issue 13)."""
    return sorted({p.strip() for p in (value or "").split(",") if p.strip()})


def membership_json(record: dict[str, Any], now: datetime | None = None) -> dict[str, str] | None:
    """`{tier, expires_at}` while a membership lasts (payments, issue 12), else None."""
    tier, expires = record.get("membership_tier"), record.get("membership_expires_at")
    if not tier or not expires:
        return None
    now_s = rfc3339(now or datetime.now(UTC))
    return {"tier": tier, "expires_at": expires} if expires > now_s else None


def normalized_phone(raw: str) -> str:
    m = PHONE_RE.match(re.sub(r"[\s-]", "", raw))
    if not m:
        raise ValueError("must be a mainland China mobile number")
    return m.group(1)


class Membership(BaseModel):
    tier: str
    expires_at: str


class User(BaseModel):
    id: str
    phone: str | None = Field(description="Masked: 138****8000")
    nickname: str | None
    avatar_url: str | None
    gender: Gender
    role: RoleName
    invite_code: str | None
    referrer_id: str | None
    profile_completed: bool = Field(description="False until nickname and gender are set")
    membership: Membership | None = None
    created_at: str

    @classmethod
    def of(cls, record: dict[str, Any]) -> User:
        return cls(**user_json(record))


def user_json(record: dict[str, Any]) -> dict[str, Any]:
    """A record as the User JSON (plain dict: GET /me renders it without a model)."""
    return {
        "id": str(record["id"]),
        "phone": mask_phone(record["phone"]),
        "nickname": record["nickname"],
        "avatar_url": record["avatar_url"],
        "gender": record["gender"],
        "role": record["role"],
        "invite_code": record["invite_code"],
        "referrer_id": None if record["referrer_id"] is None else str(record["referrer_id"]),
        "profile_completed": bool(record["nickname"]) and record["gender"] != "unknown",
        "membership": membership_json(record),
        "created_at": record["created_at"],
    }


class TokenPair(BaseModel):
    access_token: str
    refresh_token: str
    token_type: Literal["Bearer"] = "Bearer"
    expires_in: int = Field(description="Seconds the access token lives (900)")
    refresh_expires_in: int = Field(description="Seconds the refresh token lives (604800)")


class AuthResult(TokenPair):
    user: User
    is_new_user: bool = Field(description="True when this call created the account")


class PhoneIn(BaseModel):
    phone: str = Field(description="Mainland mobile, 11 digits, optional +86", examples=["13800138000"])

    @field_validator("phone")
    @classmethod
    def _phone(cls, v: str) -> str:
        return normalized_phone(v)


def sms_code_field(default: Any = ...) -> Any:
    return Field(default, pattern=r"^\d{6}$", description="The 6-digit SMS code")
