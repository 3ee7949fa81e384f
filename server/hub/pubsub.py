"""The process's one Redis pub/sub connection, through redis-py's asyncio `PubSub`.

Every socket's live events arrive here. A reader task takes each message from
`PubSub.get_message` (redis-py parses it with hiredis, a dependency) and hands it to
the hub synchronously. The hub subscribes a user's channel while that user has a socket
on this process and unsubscribes it after the last one closes; `subscribe` returns once
Redis has confirmed the channel (its `subscribe` message came back).

The connection comes from a pool of its own, built from the app's connection settings
with three changes: the client name `wardrobe-events`, no retry inside redis-py (its
retry would reconnect and re-subscribe unseen, and the events published meanwhile would
be missed without anyone catching up), and no health check on commands (redis-py's
check reads the PING's reply itself, which would race the reader task). Instead, when
the connection breaks the reader ends, a new `PubSub` is opened with backoff, the
wanted channels are subscribed again (confirmed) and `on_reconnect` runs, so each socket
reads what it missed from the stream. A PING goes out every PING_INTERVAL of silence; a
connection silent for three of them is dropped and re-opened.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from loguru import logger
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from server.redis import derived_pool
from server.timing import backoff_delay

PING_INTERVAL = 10.0
RECONNECT_BASE, RECONNECT_MAX = 0.05, 5.0  # seconds: full-jitter backoff between attempts
SUBSCRIBE_BATCH = 500  # channels per SUBSCRIBE when a connection is (re)opened
CLIENT_NAME = "wardrobe-events"

OnMessage = Callable[[bytes, bytes], None]
# A broken connection, as asyncio or redis-py reports it (redis-py's are not OSErrors).
LOST = (ConnectionError, TimeoutError, RedisConnectionError, RedisTimeoutError)


class LiveChannels:
    """Owns the connection: subscribe (waits for Redis to confirm), unsubscribe, reconnect."""

    def __init__(
        self,
        redis: Redis,
        on_message: OnMessage,
        on_reconnect: Callable[[], Awaitable[None]],
        timeout: float,
    ) -> None:
        # Through the sentinels, when REDIS_URL names them: each (re)connect asks for the
        # current primary, so after a failover the next `_open` reaches the new one.
        self._pool = derived_pool(
            redis,
            2,
            client_name=CLIENT_NAME,
            retry=Retry(NoBackoff(), 0, supported_errors=()),
            health_check_interval=0,
        )
        self._client = Redis(connection_pool=self._pool)
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        self.timeout = timeout
        self.wanted: set[bytes] = set()
        self.reconnects = 0
        self.last_rx = 0.0
        self._pubsub: PubSub | None = None
        self._confirms: dict[bytes, deque[asyncio.Future[None]]] = {}
        self._connected = asyncio.Event()
        self._lost: asyncio.Future[None] | None = None  # set when the current connection ends
        self._task: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._commands: set[asyncio.Task[Any]] = set()  # unsubscribes, pings in flight
        self._last_ping = 0.0

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="events-pubsub")
        try:
            async with asyncio.timeout(self.timeout):
                await self._connected.wait()
        except TimeoutError:
            logger.warning("events pub/sub not connected yet; sockets wait for it")

    async def stop(self) -> None:
        """Cancel the connection's task and its commands, close the pool. Each step is
        bounded by the Redis timeout: a shutdown must end even if one of them never would."""
        waiting = [t for t in [self._task, *self._commands] if t is not None]
        for task in waiting:
            task.cancel()
        if waiting:
            _, stuck = await asyncio.wait(waiting, timeout=self.timeout)
            if stuck:
                logger.warning("events pub/sub: {} task(s) did not stop; left behind", len(stuck))
        self._task = None
        for close in (self._client.aclose, self._pool.aclose):
            try:
                async with asyncio.timeout(self.timeout):
                    await close()
            except TimeoutError:
                logger.warning("events pub/sub: closing its Redis connection timed out")

    async def subscribe(self, channel: bytes) -> None:
        """Subscribe `channel`; returns once Redis confirmed it (bounded by the Redis timeout)."""
        self.wanted.add(channel)
        async with asyncio.timeout(self.timeout):
            while True:
                if channel not in self.wanted:
                    return  # unsubscribed meanwhile (its last socket left)
                pubsub, lost = self._pubsub, self._lost
                if pubsub is None or lost is None or not self._connected.is_set():
                    await self._connected.wait()
                    continue
                confirmed = self._expect(channel)
                try:
                    await pubsub.subscribe(channel)
                    await confirmed
                    return
                except LOST:  # the connection broke: the next one subscribes `wanted`
                    await asyncio.wait([lost])

    def unsubscribe(self, channel: bytes) -> None:
        self.wanted.discard(channel)
        if self._pubsub is not None and self._connected.is_set():
            self._command(lambda pubsub: pubsub.unsubscribe(channel))

    def check(self, now: float) -> None:
        """Housekeeping tick: ping a silent connection, and drop one that stays silent."""
        reader = self._reader
        pubsub = self._pubsub
        if reader is None or pubsub is None or not self._connected.is_set():
            return
        if now - self.last_rx > 3 * PING_INTERVAL:
            logger.warning("events pub/sub silent for {:.0f}s; reconnecting", now - self.last_rx)
            reader.cancel()
        elif now - self.last_rx >= PING_INTERVAL and now - self._last_ping >= PING_INTERVAL:
            self._last_ping = now
            self._command(lambda pubsub: pubsub.ping())

    # --- the connection ---------------------------------------------------------------

    def _command(self, command: Callable[[PubSub], Awaitable[Any]]) -> None:
        """Send `command` on the current connection, in a task of its own (owned here)."""
        pubsub = self._pubsub

        async def run() -> None:
            if pubsub is None or self._pubsub is not pubsub:
                return  # that connection is gone, and with it what the command was for
            with contextlib.suppress(*LOST):
                async with asyncio.timeout(self.timeout):
                    await command(pubsub)

        task = asyncio.create_task(run())
        self._commands.add(task)
        task.add_done_callback(self._commands.discard)

    def _expect(self, channel: bytes) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirms.setdefault(channel, deque()).append(fut)
        return fut

    def _confirm(self, channel: bytes) -> None:
        waiting = self._confirms.get(channel)
        if waiting:
            fut = waiting.popleft()
            if not waiting:
                del self._confirms[channel]
            if not fut.done():
                fut.set_result(None)

    def _fail_confirms(self) -> None:
        error = ConnectionError("Redis pub/sub connection lost")
        for waiting in self._confirms.values():
            for fut in waiting:
                if not fut.done():
                    fut.set_exception(error)
                    fut.exception()  # a waiter that already left does not log it as never retrieved
        self._confirms.clear()

    async def _read(self, pubsub: PubSub) -> None:
        """Every message of the connection, until it breaks (then raises)."""
        loop = asyncio.get_running_loop()
        on_message = self._on_message
        while True:
            message = await pubsub.get_message(timeout=None)
            self.last_rx = loop.time()
            if message is None:
                continue
            kind = message["type"]
            if kind == "message":
                on_message(message["channel"], message["data"])  # the hot path: one published event
            elif kind == "subscribe":
                self._confirm(message["channel"])
            # unsubscribe confirmations and pongs: last_rx is all they tell

    async def _open(self) -> tuple[PubSub, asyncio.Task[None]]:
        """A connected PubSub, its reader running, every wanted channel confirmed."""
        pubsub = self._client.pubsub()
        reader: asyncio.Task[None] | None = None
        try:
            async with asyncio.timeout(self.timeout):
                await pubsub.connect()  # type: ignore[no-untyped-call]  # (redis-py leaves it unannotated)
                self.last_rx = asyncio.get_running_loop().time()
                reader = asyncio.create_task(self._read(pubsub), name="events-pubsub-reader")
                wanted = sorted(self.wanted)
                for i in range(0, len(wanted), SUBSCRIBE_BATCH):
                    batch = wanted[i : i + SUBSCRIBE_BATCH]
                    confirmed = [self._expect(channel) for channel in batch]
                    await pubsub.subscribe(*batch)
                    await _first_of(asyncio.gather(*confirmed), reader)
        except BaseException:
            await self._close(pubsub, reader)
            raise
        return pubsub, reader

    async def _close(self, pubsub: PubSub, reader: asyncio.Task[None] | None) -> None:
        self._connected.clear()
        self._pubsub = None
        self._reader = None
        self._fail_confirms()
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        if reader is not None:
            reader.cancel()
            await asyncio.wait([reader], timeout=self.timeout)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.timeout):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _run(self) -> None:
        attempt = 0
        while True:
            self._lost = asyncio.get_running_loop().create_future()
            try:
                pubsub, reader = await self._open()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = backoff_delay(attempt + 1, RECONNECT_BASE, RECONNECT_MAX)
                attempt += 1
                logger.warning("events pub/sub cannot connect ({!r}); retrying in {:.2f}s", exc, delay)
                await asyncio.sleep(delay)
                continue
            self._pubsub, self._reader = pubsub, reader
            self._connected.set()
            resumed = attempt > 0 or self.reconnects > 0
            if resumed:
                logger.info("events pub/sub connected again; {} channel(s)", len(self.wanted))
            attempt = 0
            try:
                if resumed:
                    try:
                        await self._on_reconnect()
                    except Exception:
                        logger.opt(exception=True).error("catching sockets up after a reconnect failed")
                await asyncio.wait([reader])
            finally:
                await self._close(pubsub, reader)
            self.reconnects += 1
            if reader.cancelled():
                logger.warning("events pub/sub connection dropped; reconnecting")
            elif isinstance(reader.exception(), LOST):
                logger.warning("events pub/sub connection lost ({!r}); reconnecting", reader.exception())
            else:
                logger.opt(exception=reader.exception()).error(
                    "bad data on the Redis pub/sub connection; reconnecting"
                )


async def _first_of(work: Awaitable[Any], reader: asyncio.Task[None]) -> None:
    """`work`, unless the reader ends first (the connection broke): then its error."""
    task = asyncio.ensure_future(work)
    await asyncio.wait([task, reader], return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        await asyncio.wait([task])
        raise ConnectionError("Redis pub/sub connection lost while subscribing")
    task.result()
