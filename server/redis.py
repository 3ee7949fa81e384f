"""The Redis client (redis.asyncio) built from REDIS_URL, every call bounded by a timeout."""

from __future__ import annotations

from redis.asyncio import Redis

from server.config import Settings


def connect_redis(url: str, settings: Settings) -> Redis:
    return Redis.from_url(
        url,
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        max_connections=settings.redis_max_connections,
        health_check_interval=30,
        decode_responses=False,
    )


async def ping(client: Redis) -> None:
    await client.ping()
