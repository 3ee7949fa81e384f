"""Operator actions on accounts: list and search, ban and unban, role changes.

A ban ends every session of the user at once (refresh tokens die; access tokens
within their 15 minutes). Demoting an admin ends their sessions too, so the admin
role does not outlive the change by more than an access token's life. Every
change drops the user's cached profile.
"""

from __future__ import annotations

import re
from typing import Any

from server.auth.schemas import USER_COLUMNS, record_of
from server.auth.sessions import Sessions
from server.auth.tokens import Principal
from server.auth.users import Profiles
from server.db import Conn, Database
from server.errors import AppError, ErrorCode, NotFound
from server.paging import decode_cursor, page_of
from server.timing import rfc3339

ADMIN_COLUMNS = f"{USER_COLUMNS}, banned_at, ban_reason"


def admin_record(row: dict[str, Any]) -> dict[str, Any]:
    record = record_of(row)
    record["banned_at"] = None if row["banned_at"] is None else rfc3339(row["banned_at"])
    record["ban_reason"] = row["ban_reason"]
    return record


def _like_escape(text: str) -> str:
    return re.sub(r"([\\%_])", r"\\\1", text)


class UserAdmin:
    def __init__(self, db: Database, sessions: Sessions, profiles: Profiles) -> None:
        self.db = db
        self.sessions = sessions
        self.profiles = profiles

    async def search(
        self,
        q: str | None,
        role: str | None,
        status: str | None,
        cursor: str | None,
        limit: int,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Users newest first; `q` matches an id, a phone prefix or part of a nickname."""
        after = decode_cursor(cursor, int)
        where = ["id < %s"]
        args: list[Any] = [after[0] if after else 2**63]
        q = (q or "").strip()
        if q:
            digits = re.sub(r"[\s-]", "", q).removeprefix("+86")
            if digits.isascii() and digits.isdigit():
                where.append("(id = %s OR phone LIKE %s)")
                args += [int(digits) if len(digits) <= 18 else 0, _like_escape(digits) + "%"]
            else:
                where.append("nickname LIKE %s")
                args.append("%" + _like_escape(q) + "%")
        if role:
            where.append("role = %s")
            args.append(role)
        if status:
            where.append("status = %s")
            args.append(status)
        rows = await self.db.fetchall(
            f"SELECT {ADMIN_COLUMNS} FROM users WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT %s",
            *args,
            limit + 1,
        )
        page, next_cursor = page_of(rows, limit, lambda r: (int(r["id"]),))
        return [admin_record(r) for r in page], next_cursor

    async def get(self, user_id: int) -> dict[str, Any]:
        row = await self.db.fetchone(f"SELECT {ADMIN_COLUMNS} FROM users WHERE id = %s", user_id)
        if row is None:
            raise NotFound("No such user")
        return admin_record(row)

    async def ban(self, admin: Principal, user_id: int, reason: str | None) -> dict[str, Any]:
        if user_id == admin.user_id:
            raise AppError(ErrorCode.CONFLICT, "An admin cannot ban their own account")
        async with self.db.transaction() as tx:
            await self._lock(tx, user_id)
            await tx.execute(
                "UPDATE users SET status = 'banned', banned_at = UTC_TIMESTAMP(6), ban_reason = %s "
                "WHERE id = %s",
                reason,
                user_id,
            )
            sids = await self.sessions.revoke_user(tx, user_id, "ban")
        await self.sessions.forget(sids)
        await self.profiles.invalidate(user_id)
        return await self.get(user_id)

    async def unban(self, user_id: int) -> dict[str, Any]:
        async with self.db.transaction() as tx:
            await self._lock(tx, user_id)
            await tx.execute(
                "UPDATE users SET status = 'active', banned_at = NULL, ban_reason = NULL WHERE id = %s",
                user_id,
            )
        await self.profiles.invalidate(user_id)
        return await self.get(user_id)

    async def set_role(self, admin: Principal, user_id: int, role: str) -> dict[str, Any]:
        if user_id == admin.user_id and role != "admin":
            raise AppError(ErrorCode.CONFLICT, "An admin cannot remove their own admin role")
        sids: list[str] = []
        async with self.db.transaction() as tx:
            row = await self._lock(tx, user_id)
            await tx.execute("UPDATE users SET role = %s WHERE id = %s", role, user_id)
            if row["role"] == "admin" and role != "admin":
                sids = await self.sessions.revoke_user(tx, user_id, "role")
        await self.sessions.forget(sids)
        await self.profiles.invalidate(user_id)
        return await self.get(user_id)

    async def _lock(self, tx: Conn, user_id: int) -> dict[str, Any]:
        row = await tx.fetchone("SELECT id, role, status FROM users WHERE id = %s FOR UPDATE", user_id)
        if row is None:
            raise NotFound("No such user")
        return row
