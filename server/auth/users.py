"""User records: the profile cache, profile changes and referrals.

Cache-aside: `user:{id}:profile` holds the record (JSON, PROFILE_CACHE_TTL, 1 h), and
each process keeps the hottest records too (server/auth/nearcache.py).
Every change goes to MySQL first, then deletes the key. A miss is loaded once:
concurrent misses in one process share one load (single flight), and across
processes the loader holds `user:{id}:profile:lock` (SET NX PX) while the others
wait briefly for the key to appear. The loader writes the key only if it still
holds the lock; an invalidation deletes the lock too, so a load that raced a
change never puts the old record back.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

from loguru import logger
from redis.asyncio import Redis

from server.auth.nearcache import NearCache
from server.auth.schemas import USER_COLUMNS, record_of
from server.db import Database
from server.errors import AppError, ErrorCode, NotFound
from server.paging import decode_cursor, page_of

LOCK_MS = 3000
# A process that finds another one loading polls the cache from this step, doubling to the max.
WAIT_FIRST_STEP = 0.005
WAIT_MAX_STEP = 0.05

# KEYS: profile, lock. ARGV: lock token, lock ms. The record if it is there now, else
# whether we took the lock: a loader that finished between our miss and this call is
# seen here, so we never load MySQL a second time for the same change.
_CLAIM = """
local value = redis.call('GET', KEYS[1])
if value then
  return {1, value}
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {2}
end
return {0}
"""

# KEYS: profile, lock. ARGV: lock token, value, ttl.
_SET_IF_LOCKED = """
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""


def _keys(user_id: int) -> tuple[str, str]:
    return f"user:{user_id}:profile", f"user:{user_id}:profile:lock"


class Profiles:
    def __init__(self, db: Database, redis: Redis, ttl: int, near: NearCache) -> None:
        self.db = db
        self.redis = redis
        self.ttl = ttl
        self.near = near
        self._flights: dict[int, asyncio.Future[dict[str, Any] | None]] = {}
        self._claim = redis.register_script(_CLAIM)
        self._set_if_locked = redis.register_script(_SET_IF_LOCKED)

    async def get(self, user_id: int) -> dict[str, Any] | None:
        """The user's record (shared: do not mutate it), or None when there is no such user."""
        record = self.near.get(user_id)
        if record is not None:
            return record
        generation = self.near.generation
        record = await self._get(user_id)
        if record is not None:
            self.near.put(user_id, record, generation)
        return record

    async def _get(self, user_id: int) -> dict[str, Any] | None:
        raw = await self.redis.get(_keys(user_id)[0])
        if raw is not None:
            return dict(json.loads(raw))
        flight = self._flights.get(user_id)
        if flight is not None:
            try:
                return await asyncio.shield(flight)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                return await self.load(user_id)  # the loader was cancelled, not us
        flight = asyncio.get_running_loop().create_future()
        self._flights[user_id] = flight
        try:
            record = await self._fill(user_id)
        except asyncio.CancelledError:
            flight.cancel()
            raise
        except Exception as exc:
            flight.set_exception(exc)
            flight.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        else:
            flight.set_result(record)
            return record
        finally:
            del self._flights[user_id]

    async def require(self, user_id: int) -> dict[str, Any]:
        record = await self.get(user_id)
        if record is None:
            raise AppError(ErrorCode.UNAUTHENTICATED, "This account no longer exists")
        return record

    async def invalidate(self, user_id: int) -> None:
        """Call after every committed change: drops the Redis copy, then every process's."""
        await self.redis.delete(*_keys(user_id))
        await self.near.invalidate(user_id)

    async def load(self, user_id: int) -> dict[str, Any] | None:
        row = await self.db.fetchone(f"SELECT {USER_COLUMNS} FROM users WHERE id = %s", user_id)
        return None if row is None else record_of(row)

    async def _fill(self, user_id: int) -> dict[str, Any] | None:
        key, lock = _keys(user_id)
        token = secrets.token_hex(8)
        claim = await self._claim(keys=[key, lock], args=[token, LOCK_MS])
        if claim[0] == 1:
            return dict(json.loads(claim[1]))
        if claim[0] == 2:
            record = await self.load(user_id)
            if record is not None:
                await self._set_if_locked(keys=[key, lock], args=[token, json.dumps(record), self.ttl])
            else:
                await self.redis.delete(lock)
            return record
        # Another process is loading it: wait while its lock lives (a slow MySQL is when
        # the stampede protection matters most), polling at most every 50 ms.
        deadline = asyncio.get_running_loop().time() + LOCK_MS / 1000
        step = WAIT_FIRST_STEP
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(step)
            step = min(step * 2, WAIT_MAX_STEP)
            # One atomic read of both keys: the loader sets the record and drops the lock in one
            # script, so reading them apart could see neither and load MySQL a second time.
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.get(key)
                pipe.exists(lock)
                raw, locked = await pipe.execute()
            if raw is not None:
                return dict(json.loads(raw))
            if not locked:
                break
        logger.debug("profile {} not filled by its loader in time; reading MySQL", user_id)
        return await self.load(user_id)

    async def update(self, user_id: int, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply profile changes (already validated), then drop the cached record."""
        if changes:
            sets = ", ".join(f"{col} = %s" for col in changes)
            await self.db.execute(f"UPDATE users SET {sets} WHERE id = %s", *changes.values(), user_id)
            await self.invalidate(user_id)
        record = await self.get(user_id)
        if record is None:
            raise NotFound("No such user")
        return record

    async def referrals(
        self, user_id: int, cursor: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        """The users this user invited, newest first."""
        after = decode_cursor(cursor, int)
        rows = await self.db.fetchall(
            "SELECT id, phone, nickname, created_at FROM users "
            "WHERE referrer_id = %s AND id < %s ORDER BY id DESC LIMIT %s",
            user_id,
            after[0] if after else 2**63,
            limit + 1,
        )
        return page_of(rows, limit, lambda r: (int(r["id"]),))

    async def invite_code_owner(self, code: str) -> dict[str, Any] | None:
        """The active user whose invite code this is (case-insensitive), or None."""
        from server.auth.accounts import user_id_for_invite_code

        user_id = user_id_for_invite_code(code) if code.strip() else None
        if user_id is None:
            return None
        row = await self.db.fetchone("SELECT id, phone, status FROM users WHERE id = %s", user_id)
        if row is None or row["status"] != "active":
            return None
        return row
