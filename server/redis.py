"""The Redis client (redis.asyncio) built from REDIS_URL, every call bounded by a timeout.

At most REDIS_MAX_CONNECTIONS connections per process; a call that finds them all busy
waits up to REDIS_TIMEOUT for one, then fails with `Busy` (503 BUSY, Retry-After).

REDIS_URL=redis+sentinel://[:password@]host:port,host:port/service[/db] goes through
redis-py's Sentinel support: each new connection asks the sentinels for the service's
current primary, so after a failover the pool reconnects to the new one by itself
(docs/deploy.md). The password (or REDIS_PASSWORD) is the data nodes'; the sentinels
are asked with the same one only when `?sentinel_password=1` says they require it.

With hiredis installed (a dependency), redis-py parses replies with it on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, NoScriptError

from server.config import SENTINEL_SCHEME, SentinelURL, Settings
from server.errors import Busy


class _Pool(ConnectionPool):
    """redis-py's pool, but a call that finds every connection busy waits up to `timeout`
    for one to be released, then raises `Busy` (503 BUSY) instead of redis-py's
    MaxConnectionsError (a 500). redis-py's BlockingConnectionPool does the wait too, but
    takes an asyncio.Condition on every call (~25 % more CPU a command here); this pool
    costs nothing until it is full.

    Once closed it stays closed: a call made after `aclose` (a task still running at
    shutdown) fails with redis-py's ConnectionError (503 UNAVAILABLE) instead of opening
    a new connection that nothing would ever close."""

    def __init__(self, *, timeout: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.timeout = timeout
        self.exhausted = 0  # calls that gave up with Busy (wardrobe_redis_pool_exhausted_total)
        self.closed = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def aclose(self) -> None:
        self.closed = True
        while self._waiters:  # each one wakes, finds the pool closed and fails
            self._wake_one()
        await super().aclose()

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            if self.closed:
                raise RedisConnectionError("the Redis client is closed")
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


class _SentinelPool(_Pool, SentinelConnectionPool):
    """The waiting pool over redis-py's SentinelConnectionPool; closing it also closes
    the connections to the sentinels (this pool owns its `_OwnedSentinel`)."""

    async def aclose(self) -> None:
        await super().aclose()
        await self.sentinel_manager.aclose()


class _OwnedSentinel(Sentinel):
    """The sentinels of one `_SentinelPool`, shared with the pools `derived_pool` makes
    from it. Once closed it asks no sentinel again: a connection of a derived pool still
    opening after the close would otherwise open a new connection to a sentinel, which
    nothing closes (seen in tests/test_sentinel.py as an unclosed-connection warning)."""

    closed = False

    async def aclose(self) -> None:
        self.closed = True
        await super().aclose()

    async def discover_master(self, service_name: str) -> Any:
        if self.closed:
            raise MasterNotFoundError(f"{service_name}: the Redis client is closed")
        return await super().discover_master(service_name)


def connect_redis(url: str, settings: Settings) -> Redis:
    common: dict[str, Any] = {
        "max_connections": settings.redis.max_connections,
        "timeout": settings.redis.timeout,  # the wait for a free connection
        "socket_timeout": settings.redis.timeout,
        "socket_connect_timeout": settings.redis.timeout,
        "health_check_interval": 30,
        "decode_responses": False,
    }
    password = settings.redis.password.get_secret_value() if settings.redis.password else None
    if urlsplit(url).scheme == SENTINEL_SCHEME:
        target = SentinelURL.parse(url)
        password = target.password or password
        auth: dict[str, Any] = {"username": target.username, "password": password}
        asked = {"socket_timeout": settings.redis.timeout, "socket_connect_timeout": settings.redis.timeout}
        sentinel = _OwnedSentinel(  # type: ignore[no-untyped-call]  # (redis-py leaves it unannotated)
            list(target.sentinels), sentinel_kwargs={**asked, **(auth if target.sentinel_auth else {})}
        )
        pool: ConnectionPool = _SentinelPool(
            service_name=target.service, sentinel_manager=sentinel, db=target.db, **auth, **common
        )
        return Redis.from_pool(pool)
    if password and not urlsplit(url).password:
        common["password"] = password
    return Redis.from_pool(_Pool.from_url(url, **common))


def derived_pool(redis: Redis, max_connections: int, **overrides: Any) -> ConnectionPool:
    """A pool of its own to the same server as `redis` (the same primary through the
    sentinels), its connection settings changed by `overrides`; the caller closes it."""
    base = redis.connection_pool
    kwargs: dict[str, Any] = {**base.connection_kwargs, **overrides}
    if isinstance(base, SentinelConnectionPool):
        kwargs.pop("connection_pool", None)  # the base pool's; the new pool sets its own
        return SentinelConnectionPool(  # type: ignore[no-untyped-call]
            base.service_name, base.sentinel_manager, max_connections=max_connections, **kwargs
        )
    return ConnectionPool(connection_class=base.connection_class, max_connections=max_connections, **kwargs)


class ScriptBatch:
    """One Lua script's calls, group-committed: calls made while a round trip is in flight
    wait for it and then go together, one EVALSHA each in one redis-py pipeline (no MULTI:
    each run is atomic on its own), in the order they were made. A lone call goes through
    the script itself. If Redis lost its scripts (a restart), the script is loaded again
    and those calls run again, in order. (A Script passed to a pipeline would cost a
    SCRIPT EXISTS round trip each time.) Used by the event hub and the vendor permits."""

    def __init__(self, redis: Redis, script: AsyncScript, name: str) -> None:
        self.redis = redis
        self.script = script
        self._name = name
        self._queue: list[tuple[Sequence[Any], Sequence[Any], asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def run(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """The script's answer for these keys and args; raises its error. A caller that
        stops waiting (a timeout) does not stop its call from being sent."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        self._queue.append((keys, args, answer))
        if self._sender is None:
            self._sender = loop.create_task(self._send(), name=f"{self._name}:send")
        return await answer

    async def _send(self) -> None:
        """Send what is queued, one round trip at a time, until nothing is left."""
        batch: list[tuple[Sequence[Any], Sequence[Any], asyncio.Future[Any]]] = []
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                results = await self._run_all([(keys, args) for keys, args, _ in batch])
                for (_, _, answer), result in zip(batch, results, strict=True):
                    if answer.done():  # its caller stopped waiting
                        continue
                    if isinstance(result, Exception):
                        answer.set_exception(result)
                    else:
                        answer.set_result(result)
        finally:
            self._sender = None
            for _, _, answer in batch + self._queue:  # cancelled (shutdown): no answer will come
                if not answer.done():
                    answer.cancel()
            self._queue = []

    async def _run_all(self, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]) -> list[Any]:
        """Each call's result, an error as its exception; never raises but cancellation."""
        script, redis = self.script, self.redis
        if len(calls) == 1:
            keys, args = calls[0]
            try:
                return [await script(keys=keys, args=args)]
            except Exception as exc:
                return [exc]
        try:
            async with redis.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                results: list[Any] = list(await pipe.execute(raise_on_error=False))
        except Exception as exc:  # the connection failed: every call has that answer
            return [exc] * len(calls)
        if any(isinstance(r, NoScriptError) for r in results):
            try:
                await redis.script_load(script.script)
            except Exception as exc:
                return [exc if isinstance(r, NoScriptError) else r for r in results]
            for i, (keys, args) in enumerate(calls):
                if isinstance(results[i], NoScriptError):
                    try:
                        results[i] = await redis.evalsha(script.sha, len(keys), *keys, *args)
                    except Exception as exc:
                        results[i] = exc
        return results

    async def close(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - a bounded wait
        """Wait (at most `timeout`) for the calls still being sent."""
        sender = self._sender
        if sender is not None:
            await asyncio.wait({sender}, timeout=timeout)


def pool_stats(client: Redis) -> dict[str, int]:
    """In use, idle, waiting, max and exhausted of a client made by connect_redis."""
    pool = client.connection_pool
    return pool.stats() if isinstance(pool, _Pool) else {}


async def ping(client: Redis) -> None:
    await client.ping()
