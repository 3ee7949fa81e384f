"""The process's one Redis pub/sub connection, read through hiredis.

Every socket's live events arrive here, so it is the hot path of the hub: an
`asyncio.Protocol` feeds whatever bytes arrived to a `hiredis.Reader` and hands each
message to the hub synchronously; no task switch and no dict per message (redis-py's
PubSub costs ~50 µs a message, this ~1 µs). The hub subscribes a user's channel while that
user has a socket on this process and unsubscribes it after the last one closes.

The connection is re-opened with backoff when it breaks; the channels wanted are
subscribed again and `on_reconnect` runs, so each socket reads what it missed from
the stream. A PING goes out every PING_INTERVAL; a connection silent for three of
them is dropped and re-opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

import hiredis
from loguru import logger
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection

PING_INTERVAL = 10.0
RECONNECT_DELAYS = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)

OnMessage = Callable[[bytes, bytes], None]


def command(*args: bytes | str) -> bytes:
    return cast(bytes, hiredis.pack_command(args))  # type: ignore[arg-type]  # (its stub says 1-tuple)


class RedisReplyError(Exception):
    pass


class _Protocol(asyncio.Protocol):
    def __init__(self, on_message: OnMessage, on_lost: Callable[[_Protocol], None]) -> None:
        self._on_message = on_message
        self._on_lost = on_lost
        # hiredis parses in C whatever arrived (~0.5 µs a message); error replies come
        # back as RedisReplyError values, broken data raises hiredis.ProtocolError.
        self._reader = hiredis.Reader(replyError=RedisReplyError)
        self._replies: deque[asyncio.Future[Any]] = deque()
        self._confirms: dict[bytes, deque[asyncio.Future[None]]] = {}
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.last_rx = loop.time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        error = ConnectionError(f"Redis pub/sub connection lost: {exc or 'closed'}")
        for fut in self._replies:
            if not fut.done():
                fut.set_exception(error)
        for waiting in self._confirms.values():
            for fut in waiting:
                if not fut.done():
                    fut.set_exception(error)
        self._replies.clear()
        self._confirms.clear()
        if not self.lost.done():
            self.lost.set_result(None)
        self._on_lost(self)

    def data_received(self, data: bytes) -> None:
        self.last_rx = asyncio.get_running_loop().time()
        reader = self._reader
        reader.feed(data)
        try:
            while (value := reader.gets()) is not False:
                if type(value) is list and len(value) == 3 and value[0] == b"message":
                    self._on_message(value[1], value[2])  # the hot path: one published event
                else:
                    self._on_reply(value)
        except Exception:
            logger.opt(exception=True).error("bad data on the Redis pub/sub connection; reconnecting")
            self.abort()

    def _on_reply(self, value: Any) -> None:
        if isinstance(value, list) and value and isinstance(value[0], bytes):
            kind = value[0]
            if kind == b"subscribe" and len(value) > 1:
                waiting = self._confirms.get(value[1])
                if waiting:
                    fut = waiting.popleft()
                    if not waiting:
                        del self._confirms[value[1]]
                    if not fut.done():
                        fut.set_result(None)
            return  # unsubscribe confirmations and pongs: last_rx is all they tell
        if self._replies:
            fut = self._replies.popleft()
            if fut.done():
                return
            if isinstance(value, RedisReplyError):
                fut.set_exception(value)
            else:
                fut.set_result(value)
        elif isinstance(value, RedisReplyError):
            logger.warning("Redis pub/sub connection: {}", value)

    def send(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("Redis pub/sub connection is closed")
        self.transport.write(data)

    def call(self, *args: bytes | str) -> asyncio.Future[Any]:
        """Send a plain command (before any SUBSCRIBE: AUTH); the future gets its reply."""
        self.send(command(*args))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._replies.append(fut)
        return fut

    def subscribe(self, channels: list[bytes]) -> list[asyncio.Future[None]]:
        self.send(command(b"SUBSCRIBE", *channels))
        loop = asyncio.get_running_loop()
        futures = []
        for channel in channels:
            fut: asyncio.Future[None] = loop.create_future()
            self._confirms.setdefault(channel, deque()).append(fut)
            futures.append(fut)
        return futures

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class LiveChannels:
    """Owns the connection: subscribe (waits for Redis to confirm), unsubscribe, reconnect."""

    def __init__(
        self,
        redis: Redis,
        on_message: OnMessage,
        on_reconnect: Callable[[], Awaitable[None]],
        timeout: float,
    ) -> None:
        self._redis = redis
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        self.timeout = timeout
        self.wanted: set[bytes] = set()
        self.reconnects = 0
        self._proto: _Protocol | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._proto is not None:
            self._proto.abort()
            self._proto = None

    async def subscribe(self, channel: bytes) -> None:
        """Subscribe `channel`; returns once Redis confirmed it (bounded by the Redis timeout)."""
        self.wanted.add(channel)
        async with asyncio.timeout(self.timeout):
            while True:
                if channel not in self.wanted:
                    return  # unsubscribed meanwhile (its last socket left)
                proto = self._proto
                if proto is None or not self._connected.is_set():
                    await self._connected.wait()
                    continue
                try:
                    await proto.subscribe([channel])[0]
                    return
                except ConnectionError:
                    # `connection_lost` is coming (or came) and clears `_connected`.
                    await asyncio.wait([proto.lost])

    def unsubscribe(self, channel: bytes) -> None:
        self.wanted.discard(channel)
        proto = self._proto
        if proto is not None and self._connected.is_set():
            with contextlib.suppress(ConnectionError):  # gone with the connection anyway
                proto.send(command(b"UNSUBSCRIBE", channel))

    def check(self, now: float) -> None:
        """Housekeeping tick: ping, and drop a connection that went silent."""
        proto = self._proto
        if proto is None or not self._connected.is_set():
            return
        if now - proto.last_rx > 3 * PING_INTERVAL:
            logger.warning("events pub/sub silent for {:.0f}s; reconnecting", now - proto.last_rx)
            proto.abort()
        elif now - self._last_ping >= PING_INTERVAL:
            self._last_ping = now
            with contextlib.suppress(ConnectionError):
                proto.send(command(b"PING"))

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        pool = self._redis.connection_pool
        kw = pool.connection_kwargs

        def factory() -> _Protocol:
            return _Protocol(self._on_message, self._lost)

        async with asyncio.timeout(self.timeout):
            if issubclass(pool.connection_class, UnixDomainSocketConnection):
                _, proto = await loop.create_unix_connection(factory, kw["path"])
            else:
                tls = _tls_context(kw) if issubclass(pool.connection_class, SSLConnection) else None
                _, proto = await loop.create_connection(
                    factory, kw.get("host", "localhost"), kw.get("port", 6379), ssl=tls
                )
            try:
                if kw.get("password"):
                    user = kw.get("username")
                    auth = ("AUTH", user, kw["password"]) if user else ("AUTH", kw["password"])
                    await proto.call(*auth)
                await proto.call("CLIENT", "SETNAME", "wardrobe-events")
                wanted = sorted(self.wanted)
                for i in range(0, len(wanted), 500):
                    await asyncio.gather(*proto.subscribe(wanted[i : i + 500]))
            except BaseException:
                proto.abort()
                raise
        return proto

    def _lost(self, proto: _Protocol) -> None:
        if self._proto is proto:
            self._connected.clear()
            self._proto = None

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                proto = await self._connect()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)]
                attempt += 1
                logger.warning("events pub/sub cannot connect ({}); retrying in {}s", exc, delay)
                await asyncio.sleep(delay)
                continue
            self._proto = proto
            self._connected.set()
            if attempt or self.reconnects:
                logger.info("events pub/sub connected again; {} channel(s)", len(self.wanted))
            resumed = attempt > 0 or self.reconnects > 0
            attempt = 0
            if resumed:
                try:
                    await self._on_reconnect()
                except Exception:
                    logger.opt(exception=True).error("catching sockets up after a reconnect failed")
            await proto.lost
            self.reconnects += 1
            logger.warning("events pub/sub connection lost; reconnecting")


def _tls_context(kw: dict[str, Any]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=kw.get("ssl_ca_certs"))
    if kw.get("ssl_cert_reqs") in ("none", ssl.CERT_NONE):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
