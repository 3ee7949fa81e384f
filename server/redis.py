"""The Redis client (redis.asyncio) built from REDIS_URL, every call bounded by a timeout.

At most REDIS_MAX_CONNECTIONS connections per process; a call that finds them all busy
waits up to REDIS_TIMEOUT for one, then fails with `Busy` (503 BUSY, Retry-After).

With hiredis installed (a dependency), redis-py parses replies in C on its own; its
asyncio connections still pack commands in Python (~1.4 µs an argument, growing with
the command). `connect_redis` has them pack with hiredis too (~0.25 µs an argument;
redis-py's own `HiredisRespSerializer` takes the odd argument hiredis refuses): event
publishing sends hundreds of arguments per call (server/hub/stream.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any, cast

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.connection import HiredisRespSerializer
from redis.exceptions import MaxConnectionsError

from server.config import Settings
from server.errors import Busy

_PACKER = HiredisRespSerializer()  # hiredis >= 3.2 is a dependency (setup.cfg)
_PACKING: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def _pack_command(self: AbstractConnection, *args: Any) -> list[bytes]:
    if isinstance(args[0], str):  # "SCRIPT EXISTS" and the like go as separate words
        args = (*args[0].encode().split(), *args[1:])
    elif b" " in args[0]:
        args = (*args[0].split(), *args[1:])
    try:
        return [cast(bytes, hiredis.pack_command(args))]
    except TypeError:  # a bytearray (converted there), or a bool or None (DataError there)
        packed: list[bytes] = _PACKER.pack(*args)
        return packed


def _hiredis_packing(base: type[AbstractConnection]) -> type[AbstractConnection]:
    """`base` (TCP, unix or TLS connection) with `pack_command` done by hiredis."""
    if base not in _PACKING:
        _PACKING[base] = type(f"Hiredis{base.__name__}", (base,), {"pack_command": _pack_command})
    return _PACKING[base]


class _Pool(ConnectionPool):
    """redis-py's pool, but a call that finds every connection busy waits up to `timeout`
    for one to be released, then raises `Busy` (503 BUSY) instead of redis-py's
    MaxConnectionsError (a 500). redis-py's BlockingConnectionPool does the wait too, but
    takes an asyncio.Condition on every call (~25 % more CPU a command here); this pool
    costs nothing until it is full."""

    def __init__(self, *, timeout: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.timeout = timeout
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
                        raise Busy("Redis pool exhausted, retry shortly") from None
                    raise

    async def release(self, connection: AbstractConnection) -> None:
        await super().release(connection)
        if self._waiters:
            self._wake_one()

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
    pool.connection_class = _hiredis_packing(pool.connection_class)
    return Redis.from_pool(pool)


async def ping(client: Redis) -> None:
    await client.ping()
