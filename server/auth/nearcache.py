"""A small in-process copy of hot user profiles, kept exact across processes.

Redis is the shared profile cache; reading it costs a round trip (~100 µs of CPU
in redis-py), as much as the rest of a GET /me. So each process also keeps the
records it served lately (PROFILE_LOCAL_CACHE_SIZE, 0 turns it off), and every
change is announced on a Redis channel that every process subscribes to:

1. the writer commits to MySQL, deletes the Redis key, then `invalidate()`s:
   it drops its own copy and PUBLISHes `user_id:nonce`;
2. each subscribed process drops its copy and acknowledges (RPUSH to the
   nonce's list);
3. the writer waits for as many acknowledgements as PUBLISH reported receivers
   (at most ACK_TIMEOUT), so when its request answers, no process still serves
   the old record.

A copy read while an invalidation arrived is not kept (a generation counter), a
process whose subscription is down keeps no copies (it reads Redis), and every
copy expires after PROFILE_LOCAL_CACHE_TTL seconds whatever happens.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

from loguru import logger
from redis.asyncio import Redis

from server.timing import backoff_delay

ACK_TIMEOUT = 0.5
RECONNECT_BASE, RECONNECT_MAX = 0.1, 5.0  # seconds: full-jitter backoff between attempts


class NearCache:
    def __init__(self, redis: Redis, size: int, ttl: float) -> None:
        self.redis = redis
        self.size = size
        self.ttl = ttl
        db = redis.connection_pool.connection_kwargs.get("db", 0)
        self.channel = f"auth:profile:invalidate:{db}"
        self.generation = 0
        self._entries: dict[int, tuple[float, dict[str, Any]]] = {}
        self._listening = False
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.size > 0 and self._listening

    def get(self, user_id: int) -> dict[str, Any] | None:
        if not self._listening:
            return None
        entry = self._entries.get(user_id)
        if entry is None:
            return None
        if time.monotonic() - entry[0] > self.ttl:
            self._entries.pop(user_id, None)
            return None
        return entry[1]

    def put(self, user_id: int, record: dict[str, Any], generation: int) -> None:
        """Keep a copy read when `generation` was current, unless an invalidation came since."""
        if not self.enabled or generation != self.generation:
            return
        if len(self._entries) >= self.size and user_id not in self._entries:
            del self._entries[next(iter(self._entries))]
        self._entries[user_id] = (time.monotonic(), record)

    def drop(self, user_id: int) -> None:
        self.generation += 1
        self._entries.pop(user_id, None)

    async def invalidate(self, user_id: int) -> None:
        """Drop the copies of every process; returns once they have (or ACK_TIMEOUT passed)."""
        self.drop(user_id)
        if self.size <= 0:
            return
        nonce = secrets.token_hex(8)
        ack_key = f"auth:profile:ack:{nonce}"
        receivers = int(await self.redis.publish(self.channel, f"{user_id}:{nonce}"))
        deadline = time.monotonic() + ACK_TIMEOUT
        acked = 0
        try:
            while acked < receivers:
                left = deadline - time.monotonic()
                if left <= 0 or await self.redis.blpop([ack_key], timeout=left) is None:
                    logger.warning("{} of {} processes acknowledged a profile change", acked, receivers)
                    return
                acked += 1
        finally:
            await self.redis.delete(ack_key)

    # --- the subscription ---------------------------------------------------

    async def start(self) -> None:
        if self.size <= 0:
            return
        self._task = asyncio.create_task(self._listen(), name="profile-invalidations")
        try:
            async with asyncio.timeout(5):
                await self._ready.wait()
        except TimeoutError:
            logger.warning("profile invalidation channel not subscribed yet; reading Redis meanwhile")

    async def stop(self) -> None:
        self._listening = False
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _listen(self) -> None:
        attempt = 0
        while True:
            try:
                async with self._subscribed() as pubsub:
                    attempt = 0
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            await self._on_message(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the connection broke: no copies until we listen again
                self._listening = False
                self._entries.clear()
                delay = backoff_delay(attempt + 1, RECONNECT_BASE, RECONNECT_MAX)
                attempt += 1
                logger.warning("profile invalidation channel lost ({}); retrying in {}s", exc, delay)
                await asyncio.sleep(delay)

    @asynccontextmanager
    async def _subscribed(self) -> AsyncIterator[Any]:
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            self._entries.clear()  # whatever was missed while not listening
            self._listening = True
            self._ready.set()
            yield pubsub
        finally:
            self._listening = False
            self._entries.clear()
            await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]

    async def _on_message(self, data: bytes) -> None:
        user, _, nonce = data.decode().partition(":")
        if user.isdigit():
            self.drop(int(user))
        if nonce:
            ack_key = f"auth:profile:ack:{nonce}"
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.rpush(ack_key, 1)
                pipe.expire(ack_key, 10)
                await pipe.execute()
