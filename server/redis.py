"""The Redis client (redis.asyncio) built from REDIS_URL, every call bounded by a timeout.

At most REDIS_MAX_CONNECTIONS connections per process; a call that finds them all busy
waits up to REDIS_TIMEOUT for one, then fails with `Busy` (503 BUSY, Retry-After).

With hiredis installed (a dependency), redis-py parses replies with it on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import MaxConnectionsError

from server.config import Settings
from server.errors import Busy


class _Pool(ConnectionPool):
    """redis-py's pool, but a call that finds every connection busy waits up to `timeout`
    for one to be released, then raises `Busy` (503 BUSY) instead of redis-py's
    MaxConnectionsError (a 500). redis-py's BlockingConnectionPool does the wait too, but
    takes an asyncio.Condition on every call (~25 % more CPU a command here); this pool
    costs nothing until it is full."""

    def __init__(self, *, timeout: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.timeout = timeout
        self.exhausted = 0  # calls that gave up with Busy (wardrobe_redis_pool_exhausted_total)
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            try:
                conn = await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
                return cast(AbstractConnection, conn)
            except MaxConnectionsError:
                released: asyncio.Future[None] = loop.create_future()
                self._waiters.append(released)
                try:
                    async with asyncio.timeout_at(deadline):
                        await released
                except BaseException as exc:
                    if released.done() and not released.cancelled():
                        self._wake_one()  # woken but leaving (timed out, cancelled): pass it on
                    else:
                        with contextlib.suppress(ValueError):
                            self._waiters.remove(released)
                    if isinstance(exc, TimeoutError):
                        self.exhausted += 1
                        raise Busy("Redis pool exhausted, retry shortly") from None
                    raise

    async def release(self, connection: AbstractConnection) -> None:
        await super().release(connection)
        if self._waiters:
            self._wake_one()

    def stats(self) -> dict[str, int]:
        """The figures of wardrobe_redis_pool_* (read at scrape time)."""
        return {
            "in_use": len(self._in_use_connections),
            "idle": len(self._available_connections),
            "waiting": len(self._waiters),
            "max": self.max_connections,
            "exhausted": self.exhausted,
        }

    def _wake_one(self) -> None:
        while self._waiters:  # the longest waiter still waiting
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def connect_redis(url: str, settings: Settings) -> Redis:
    pool = _Pool.from_url(
        url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_timeout,  # the wait for a free connection
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        health_check_interval=30,
        decode_responses=False,
    )
    return Redis.from_pool(pool)


def pool_stats(client: Redis) -> dict[str, int]:
    """In use, idle, waiting, max and exhausted of a client made by connect_redis."""
    pool = client.connection_pool
    return pool.stats() if isinstance(pool, _Pool) else {}


async def ping(client: Redis) -> None:
    await client.ping()
