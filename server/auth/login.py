"""Sign-up and sign-in: register, password / SMS / WeChat login, refresh, logout.

Every state change is one transaction (the user row and its session's audit row
commit together); Redis is written after the commit. Messages never say whether
a phone is registered, except PHONE_TAKEN on register, and that only after the
SMS code proved the caller holds the phone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.auth.accounts import insert_user
from server.auth.limits import Limits
from server.auth.passwords import Passwords
from server.auth.schemas import AuthResult, TokenPair, User
from server.auth.sessions import NewSession, Sessions
from server.auth.sms import SmsCodes
from server.auth.tokens import Principal, TokenIssuer
from server.auth.users import Profiles
from server.auth.wechat import WeChatClient
from server.config import Settings
from server.db import Database, is_duplicate
from server.errors import AppError, ErrorCode


@dataclass(frozen=True, slots=True)
class Client:
    """Where a request comes from, for limits and the session's audit row."""

    ip: str
    user_agent: str = ""


def phone_taken() -> AppError:
    return AppError(ErrorCode.PHONE_TAKEN, "This phone number already has an account; log in instead")


def is_phone_duplicate(exc: BaseException) -> bool:
    return is_duplicate(exc) and "phone" in str(exc.args[1:])


def banned() -> AppError:
    return AppError(ErrorCode.FORBIDDEN, "This account is banned")


class AuthService:
    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        tokens: TokenIssuer,
        sessions: Sessions,
        passwords: Passwords,
        codes: SmsCodes,
        limits: Limits,
        profiles: Profiles,
        wechat: WeChatClient,
    ) -> None:
        self.settings = settings
        self.db = db
        self.tokens = tokens
        self.sessions = sessions
        self.passwords = passwords
        self.codes = codes
        self.limits = limits
        self.profiles = profiles
        self.wechat = wechat

    # --- issuing -----------------------------------------------------------

    def pair(
        self, user_id: int, role: str, sid: str, refresh_token: str, perms: list[str] | None = None
    ) -> TokenPair:
        return TokenPair(
            access_token=self.tokens.issue_access(user_id, role, sid, perms=perms or ()),
            refresh_token=refresh_token,
            expires_in=self.settings.auth.access_token_ttl,
            refresh_expires_in=self.settings.auth.refresh_token_ttl,
        )

    async def _signed_in(self, user_id: int, session: NewSession, *, is_new: bool) -> AuthResult:
        await self.sessions.activate(user_id, session)
        record = await self.profiles.require(user_id)
        tokens = self.pair(
            user_id, record["role"], session.sid, session.refresh_token, record.get("permissions")
        )
        return AuthResult(**tokens.model_dump(), user=User.of(record), is_new_user=is_new)

    async def _start(self, row: dict[str, Any], method: str, client: Client) -> AuthResult:
        if row["status"] != "active":
            raise banned()
        user_id = int(row["id"])
        async with self.db.transaction() as tx:
            session = await self.sessions.record(
                tx, user_id, method=method, ip=client.ip, user_agent=client.user_agent
            )
        return await self._signed_in(user_id, session, is_new=False)

    async def _create(self, client: Client, method: str, **user: Any) -> AuthResult:
        """Insert a user and its first session in one transaction (duplicates propagate)."""
        async with self.db.transaction() as tx:
            user_id = await insert_user(tx, signup_credits=self.settings.signup_credits, **user)
            session = await self.sessions.record(
                tx, user_id, method=method, ip=client.ip, user_agent=client.user_agent
            )
        return await self._signed_in(user_id, session, is_new=True)

    # --- sign-up and sign-in -------------------------------------------------

    async def register(
        self, phone: str, password: str, sms_code: str, invite_code: str | None, client: Client
    ) -> AuthResult:
        referrer_id = None
        if invite_code:
            owner = await self.profiles.invite_code_owner(invite_code)
            if owner is None or owner["phone"] == phone:
                raise AppError(ErrorCode.INVITE_CODE_INVALID, "This invite code is not valid")
            referrer_id = int(owner["id"])
        await self.codes.verify(phone, "register", sms_code)
        if await self.db.fetchval("SELECT 1 FROM users WHERE phone = %s", phone):
            raise phone_taken()
        hashed = await self.passwords.hash(password)
        try:
            return await self._create(
                client, "register", phone=phone, password_hash=hashed, referrer_id=referrer_id
            )
        except Exception as exc:
            if is_phone_duplicate(exc):
                raise phone_taken() from None
            raise

    async def login_password(self, phone: str, password: str, client: Client) -> AuthResult:
        await self.limits.take_login_attempt(phone, client.ip)
        row = await self.db.fetchone("SELECT id, password_hash, status FROM users WHERE phone = %s", phone)
        stored = row["password_hash"] if row else None
        ok, rehashed = await self.passwords.verify(stored, password)
        if not ok or row is None:
            raise AppError(ErrorCode.INVALID_CREDENTIALS, "Wrong phone number or password")
        await self.limits.give_back_login_attempt(phone, client.ip)
        if rehashed is not None and row["status"] == "active":
            await self.db.execute(
                "UPDATE users SET password_hash = %s WHERE id = %s AND password_hash = %s",
                rehashed,
                row["id"],
                stored,
            )
        return await self._start(row, "password", client)

    async def login_sms(self, phone: str, sms_code: str, client: Client) -> AuthResult:
        """SMS login; an unknown phone is registered on the spot (no password, no referrer)."""
        await self.limits.take_login_attempt(phone, client.ip)
        await self.codes.verify(phone, "login", sms_code)
        await self.limits.give_back_login_attempt(phone, client.ip)
        row = await self.db.fetchone("SELECT id, status FROM users WHERE phone = %s", phone)
        if row is None:
            try:
                return await self._create(client, "sms", phone=phone, password_hash=None)
            except Exception as exc:
                if not is_phone_duplicate(exc):
                    raise
            row = await self.db.fetchone("SELECT id, status FROM users WHERE phone = %s", phone)
            if row is None:
                raise AppError(ErrorCode.CONFLICT, "The account changed during login; try again")
        return await self._start(row, "sms", client)

    async def login_wechat(self, code: str, client: Client) -> AuthResult:
        """Find or create the account of a WeChat openid (unionid kept when WeChat sends it)."""
        who = await self.wechat.code_to_session(code)
        sql = "SELECT id, status, wechat_unionid FROM users WHERE wechat_openid = %s"
        row = await self.db.fetchone(sql, who.openid)
        if row is None:
            try:
                return await self._create(
                    client,
                    "wechat",
                    phone=None,
                    password_hash=None,
                    wechat_openid=who.openid,
                    wechat_unionid=who.unionid,
                )
            except Exception as exc:
                if not is_duplicate(exc):
                    raise
            row = await self.db.fetchone(sql, who.openid)
            if row is None:
                raise AppError(ErrorCode.CONFLICT, "The account changed during login; try again")
        if who.unionid and row["wechat_unionid"] != who.unionid:
            await self.db.execute(
                "UPDATE users SET wechat_unionid = %s WHERE id = %s", who.unionid, row["id"]
            )
            await self.profiles.invalidate(int(row["id"]))
        return await self._start(row, "wechat", client)

    # --- sessions ----------------------------------------------------------

    async def refresh(self, refresh_token: str) -> TokenPair:
        rotated = await self.sessions.rotate(refresh_token)
        record = await self.profiles.get(rotated.user_id)
        if record is None or record["status"] != "active":
            await self.sessions.end_all(rotated.user_id, "ban")
            raise banned() if record else AppError(ErrorCode.UNAUTHENTICATED, "This account no longer exists")
        return self.pair(
            rotated.user_id, record["role"], rotated.sid, rotated.refresh_token, record.get("permissions")
        )

    async def logout(self, refresh_token: str) -> None:
        await self.sessions.end(refresh_token)

    async def logout_all(self, principal: Principal) -> None:
        await self.sessions.end_all(principal.user_id, "logout_all")
