"""Sessions: one per login, living in Redis, recorded in MySQL.

A session (id `sid`, carried by every access token) is a *family* of refresh
tokens: login issues the first, each refresh replaces it with the next. Redis
holds `auth:sess:{sid}` = {uid, cur: sha256 of the live refresh token} and
`auth:sess:{sid}:old` = the hashes of the tokens it replaced. Rotation is one Lua
script, so of two requests presenting the same token exactly one wins; a token
found among the old hashes is a replay (a stolen copy, or a client that lost an
answer), and the whole family ends: both keys are deleted and the MySQL row is
marked revoked ('reuse').

MySQL (`auth_sessions`) keeps the audit record and is the truth for revocation:
logout-everywhere, password reset and ban revoke the rows in the same transaction
as their change, then delete the Redis keys; a rotation checks its row is still
live. Redis losing a session only means that user logs in again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from redis.asyncio import Redis

from server.auth.tokens import hash_refresh_token, new_refresh_token, new_session_id, session_id_of
from server.db import Conn, Database
from server.errors import AppError, ErrorCode

# KEYS: sess, old. ARGV: presented hash, new hash, ttl.
# Returns {1, uid} rotated, {2, uid} replay (family ended), {3} unknown token, {0} no session.
_ROTATE = """
local cur = redis.call('HGET', KEYS[1], 'cur')
if not cur then return {0} end
local uid = redis.call('HGET', KEYS[1], 'uid')
if cur == ARGV[1] then
  redis.call('HSET', KEYS[1], 'cur', ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  return {1, uid}
end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then
  redis.call('DEL', KEYS[1], KEYS[2])
  return {2, uid}
end
return {3}
"""

# KEYS: sess, old. ARGV: presented hash. Returns 1 ended, 0 no session, 2 not its token.
_END = """
local cur = redis.call('HGET', KEYS[1], 'cur')
if not cur then return 0 end
if cur == ARGV[1] or redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
return 2
"""


@dataclass(frozen=True, slots=True)
class NewSession:
    sid: str
    refresh_token: str


@dataclass(frozen=True, slots=True)
class Rotated:
    user_id: int
    sid: str
    refresh_token: str


def _keys(sid: str) -> list[str]:
    return [f"auth:sess:{sid}", f"auth:sess:{sid}:old"]


def _not_a_refresh_token() -> AppError:
    return AppError(ErrorCode.UNAUTHENTICATED, "This is not a valid refresh token")


class Sessions:
    def __init__(self, db: Database, redis: Redis, ttl: int) -> None:
        self.db = db
        self.redis = redis
        self.ttl = ttl
        self._rotate = redis.register_script(_ROTATE)
        self._end = redis.register_script(_END)

    async def record(self, conn: Conn, user_id: int, *, method: str, ip: str, user_agent: str) -> NewSession:
        """Write the audit row inside the caller's transaction; `activate` after the commit."""
        sid = new_session_id()
        await conn.execute(
            "INSERT INTO auth_sessions (id, user_id, method, ip, user_agent, expires_at) "
            "VALUES (%s, %s, %s, %s, %s, UTC_TIMESTAMP(6) + INTERVAL %s SECOND)",
            sid,
            user_id,
            method,
            ip,
            user_agent[:255],
            self.ttl,
        )
        return NewSession(sid, new_refresh_token(sid))

    async def activate(self, user_id: int, session: NewSession) -> None:
        key = _keys(session.sid)[0]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"uid": user_id, "cur": hash_refresh_token(session.refresh_token)})
            pipe.expire(key, self.ttl)
            await pipe.execute()

    async def start(self, user_id: int, *, method: str, ip: str, user_agent: str) -> NewSession:
        """A new session outside any other transaction."""
        async with self.db.transaction() as tx:
            session = await self.record(tx, user_id, method=method, ip=ip, user_agent=user_agent)
        await self.activate(user_id, session)
        return session

    async def rotate(self, refresh_token: str) -> Rotated:
        """Swap a live refresh token for the next one of its family."""
        sid = session_id_of(refresh_token)
        if sid is None:
            raise _not_a_refresh_token()
        new_token = new_refresh_token(sid)
        result = await self._rotate(
            keys=_keys(sid),
            args=[hash_refresh_token(refresh_token), hash_refresh_token(new_token), self.ttl],
        )
        verdict = int(result[0])
        if verdict == 1:
            user_id = int(result[1])
            changed = await self.db.execute(
                "UPDATE auth_sessions SET rotations = rotations + 1, last_refreshed_at = UTC_TIMESTAMP(6), "
                "expires_at = UTC_TIMESTAMP(6) + INTERVAL %s SECOND WHERE id = %s AND revoked_at IS NULL",
                self.ttl,
                sid,
            )
            if changed:
                return Rotated(user_id, sid, new_token)
            await self.redis.delete(*_keys(sid))  # revoked in MySQL while Redis still had it
            raise await self._why_ended(sid)
        if verdict == 2:
            await self._mark_revoked([sid], "reuse")
            raise AppError(
                ErrorCode.TOKEN_REVOKED,
                "This refresh token was already used; the session is ended, log in again",
            )
        if verdict == 3:
            raise _not_a_refresh_token()
        raise await self._why_ended(sid)

    async def end(self, refresh_token: str) -> None:
        """Logout: end the session of this refresh token (already ended is fine)."""
        sid = session_id_of(refresh_token)
        if sid is None:
            raise _not_a_refresh_token()
        verdict = int(await self._end(keys=_keys(sid), args=[hash_refresh_token(refresh_token)]))
        if verdict == 2:
            raise _not_a_refresh_token()
        if verdict == 1:
            await self._mark_revoked([sid], "logout")

    async def revoke_user(
        self, conn: Conn, user_id: int, reason: str, *, keep_sid: str | None = None
    ) -> list[str]:
        """Revoke every live session of a user inside the caller's transaction.

        Returns their ids: pass them to `forget` once the transaction commits."""
        rows = await conn.fetchall(
            "SELECT id FROM auth_sessions WHERE user_id = %s AND revoked_at IS NULL FOR UPDATE", user_id
        )
        sids = [str(r["id"]) for r in rows if r["id"] != keep_sid]
        if sids:
            marks = ", ".join(["%s"] * len(sids))
            await conn.execute(
                "UPDATE auth_sessions SET revoked_at = UTC_TIMESTAMP(6), revoke_reason = %s "
                f"WHERE id IN ({marks}) AND revoked_at IS NULL",
                reason,
                *sids,
            )
        return sids

    async def forget(self, sids: Iterable[str]) -> None:
        keys = [k for sid in sids for k in _keys(sid)]
        if keys:
            await self.redis.delete(*keys)

    async def end_all(self, user_id: int, reason: str, *, keep_sid: str | None = None) -> int:
        async with self.db.transaction() as tx:
            sids = await self.revoke_user(tx, user_id, reason, keep_sid=keep_sid)
        await self.forget(sids)
        return len(sids)

    async def _mark_revoked(self, sids: list[str], reason: str) -> None:
        marks = ", ".join(["%s"] * len(sids))
        await self.db.execute(
            "UPDATE auth_sessions SET revoked_at = UTC_TIMESTAMP(6), revoke_reason = %s "
            f"WHERE id IN ({marks}) AND revoked_at IS NULL",
            reason,
            *sids,
        )

    async def _why_ended(self, sid: str) -> AppError:
        """The session is gone from Redis: say why, from its MySQL record."""
        row = await self.db.fetchone(
            "SELECT revoked_at, revoke_reason, expires_at <= UTC_TIMESTAMP(6) AS expired "
            "FROM auth_sessions WHERE id = %s",
            sid,
        )
        if row is None:
            return _not_a_refresh_token()
        if row["revoked_at"] is None and row["expired"]:
            return AppError(ErrorCode.TOKEN_EXPIRED, "The refresh token has expired; log in again")
        if row["revoke_reason"] == "ban":
            return AppError(ErrorCode.FORBIDDEN, "This account is banned")
        return AppError(ErrorCode.TOKEN_REVOKED, "This session has ended; log in again")
