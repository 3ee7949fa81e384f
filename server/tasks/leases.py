"""Task leases in Redis: `lease:task:{task_id}` = the holding instance, with a TTL.

A running task renews its lease; when the process dies the lease expires, and the
sweeper (credits) or recovery (tasks) may act on the task. Renew and release only
touch a lease the caller still holds (compare-and-set in Lua).
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis

PREFIX = "lease:task:"

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


def key(task_id: str) -> str:
    return PREFIX + task_id


def renew_interval(ttl: float) -> float:
    """How often a held lease is renewed: a third of its TTL, at most 2 s, so it always
    keeps two thirds of its TTL in hand."""
    return min(ttl / 3, 2.0)


async def acquire(redis: Redis, task_id: str, owner: str, ttl_ms: int) -> bool:
    return bool(await redis.set(key(task_id), owner, nx=True, px=ttl_ms))


async def renew(redis: Redis, task_id: str, owner: str, ttl_ms: int) -> bool:
    return bool(await redis.eval(_RENEW, 1, key(task_id), owner, ttl_ms))


async def release(redis: Redis, task_id: str, owner: str) -> bool:
    return bool(await redis.eval(_RELEASE, 1, key(task_id), owner))


async def held(redis: Redis, task_ids: Sequence[str]) -> set[str]:
    """Which of `task_ids` some live process holds a lease on (one round trip)."""
    if not task_ids:
        return set()
    values = await redis.mget([key(t) for t in task_ids])
    return {t for t, v in zip(task_ids, values, strict=True) if v is not None}


def cancel_key(task_id: str) -> str:
    """Set when a task is cancelled; the process running it checks at each lease renewal."""
    return f"task:cancelled:{task_id}"
