"""The Redis client (redis.asyncio) built from REDIS_URL, every call bounded by a timeout.

With hiredis installed (a dependency), redis-py parses replies in C on its own; its
asyncio connections still pack commands in Python (~1.4 µs an argument, growing with
the command). `connect_redis` has them pack with hiredis too (~0.25 µs an argument;
redis-py's own `HiredisRespSerializer` takes the odd argument hiredis refuses): event
publishing sends hundreds of arguments per call (server/hub/stream.py).
"""

from __future__ import annotations

from typing import Any, cast

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.connection import HiredisRespSerializer
from redis.utils import HIREDIS_AVAILABLE

from server.config import Settings

_PACKER = HiredisRespSerializer() if HIREDIS_AVAILABLE else None
_PACKING: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def _pack_command(self: AbstractConnection, *args: Any) -> list[bytes]:
    if isinstance(args[0], str):  # "SCRIPT EXISTS" and the like go as separate words
        args = (*args[0].encode().split(), *args[1:])
    elif b" " in args[0]:
        args = (*args[0].split(), *args[1:])
    try:
        return [cast(bytes, hiredis.pack_command(args))]
    except TypeError:  # a bytearray (converted there), or a bool or None (DataError there)
        assert _PACKER is not None
        packed: list[bytes] = _PACKER.pack(*args)
        return packed


def _hiredis_packing(base: type[AbstractConnection]) -> type[AbstractConnection]:
    """`base` (TCP, unix or TLS connection) with `pack_command` done by hiredis."""
    if _PACKER is None:
        return base
    if base not in _PACKING:
        _PACKING[base] = type(f"Hiredis{base.__name__}", (base,), {"pack_command": _pack_command})
    return _PACKING[base]


def connect_redis(url: str, settings: Settings) -> Redis:
    client = Redis.from_url(
        url,
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        max_connections=settings.redis_max_connections,
        health_check_interval=30,
        decode_responses=False,
    )
    pool = client.connection_pool
    pool.connection_class = _hiredis_packing(pool.connection_class)
    return client


async def ping(client: Redis) -> None:
    await client.ping()
