"""Changes a user makes to their own credentials: reset, change, phone binding.

Phone binding (decision, see docs/auth.md): an account made by WeChat login has
no phone; POST /me/phone {phone, sms_code} (a code of purpose `register`) binds
one. When the phone already belongs to another account the answer is
PHONE_TAKEN and nothing changes: accounts are never merged automatically
(credits, orders and referrals would have to move, irreversibly, on the word of
one SMS code). The user can log in with that phone instead.
"""

from __future__ import annotations

from typing import Any

from server.auth.limits import Limits
from server.auth.login import is_phone_duplicate, phone_taken
from server.auth.passwords import Passwords
from server.auth.sessions import Sessions
from server.auth.sms import SmsCodes
from server.auth.tokens import Principal
from server.auth.users import Profiles
from server.db import Database
from server.errors import AppError, ErrorCode, validation_failed


class AccountService:
    def __init__(
        self,
        *,
        db: Database,
        sessions: Sessions,
        passwords: Passwords,
        codes: SmsCodes,
        limits: Limits,
        profiles: Profiles,
    ) -> None:
        self.db = db
        self.sessions = sessions
        self.passwords = passwords
        self.codes = codes
        self.limits = limits
        self.profiles = profiles

    async def reset_password(self, phone: str, sms_code: str, new_password: str) -> None:
        """Forgot password: a reset_password code sets a new one and ends every session."""
        await self.codes.verify(phone, "reset_password", sms_code)
        user_id = await self.db.fetchval("SELECT id FROM users WHERE phone = %s", phone)
        if user_id is None:
            raise AppError(ErrorCode.INVALID_CREDENTIALS, "The SMS code is wrong or has expired")
        await self._set_password(int(user_id), new_password, "password_reset")
        await self.limits.clear_account(phone)

    async def change_password(
        self,
        principal: Principal,
        new_password: str,
        old_password: str | None,
        sms_code: str | None,
        ip: str,
    ) -> None:
        """Set or change the password; other sessions end, this one goes on.

        With a password already set, the old one or a reset_password SMS code proves it."""
        row = await self.db.fetchone(
            "SELECT id, phone, password_hash FROM users WHERE id = %s", principal.user_id
        )
        if row is None:
            raise AppError(ErrorCode.UNAUTHENTICATED, "This account no longer exists")
        if row["password_hash"] is not None:
            if old_password is not None:
                account = row["phone"] or f"id{row['id']}"
                await self.limits.take_login_attempt(account, ip)
                ok, _ = await self.passwords.verify(row["password_hash"], old_password)
                if not ok:
                    raise AppError(ErrorCode.INVALID_CREDENTIALS, "The old password is wrong")
                await self.limits.give_back_login_attempt(account, ip)
            elif sms_code is not None and row["phone"]:
                await self.codes.verify(row["phone"], "reset_password", sms_code)
            else:
                raise validation_failed(
                    [{"field": "old_password", "message": "old_password or sms_code is required"}]
                )
        await self._set_password(principal.user_id, new_password, "password_change", keep_sid=principal.sid)

    async def _set_password(
        self, user_id: int, new_password: str, reason: str, *, keep_sid: str | None = None
    ) -> None:
        hashed = await self.passwords.hash(new_password)
        async with self.db.transaction() as tx:
            await tx.execute(
                "UPDATE users SET password_hash = %s, password_changed_at = UTC_TIMESTAMP(6) WHERE id = %s",
                hashed,
                user_id,
            )
            sids = await self.sessions.revoke_user(tx, user_id, reason, keep_sid=keep_sid)
        await self.sessions.forget(sids)
        await self.profiles.invalidate(user_id)

    async def bind_phone(self, principal: Principal, phone: str, sms_code: str) -> dict[str, Any]:
        record = await self.profiles.require(principal.user_id)
        if record["phone"]:
            raise AppError(ErrorCode.CONFLICT, "This account already has a phone number")
        await self.codes.verify(phone, "register", sms_code)
        try:
            changed = await self.db.execute(
                "UPDATE users SET phone = %s WHERE id = %s AND phone IS NULL", phone, principal.user_id
            )
        except Exception as exc:
            if is_phone_duplicate(exc):
                raise phone_taken() from None
            raise
        await self.profiles.invalidate(principal.user_id)
        if not changed:
            raise AppError(ErrorCode.CONFLICT, "This account already has a phone number")
        return await self.profiles.require(principal.user_id)
