"""RedisEventHub: per-user events numbered in Redis, fanned out to this process's sockets.

`publish(user_id, event, data)` runs one Lua script (server/hub/stream.py) that gives
the event the user's next seq, appends it to the user's stream and PUBLISHes it on
the user's channel. Every process holds one pub/sub connection (server/hub/pubsub.py,
redis-py's PubSub) subscribed to the users that have sockets on it; the dispatcher
hands each message to those sockets' sessions (server/hub/session.py), which never wait.

Live delivery is best-effort: `publish` is bounded by REDIS_TIMEOUT and never raises
into business code (credits and tasks are already committed in MySQL); a failure is
logged and counted (`wardrobe_events_publish_failures_total`) and the event is lost.
What the client can rely on is the seq: it has no gaps, so a client sees any hole and
resumes, and a kept event is replayed by `resume`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from aiohttp import web
from loguru import logger
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.asyncio import Redis

from server.config import Settings
from server.hub.events import Event
from server.hub.pubsub import LiveChannels
from server.hub.session import HubStats, Session
from server.hub.stream import FRAME_PREFIX, EventStreams

TICK = 0.5


class RedisEventHub:
    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.timeout = settings.redis.timeout
        self.clock = clock
        self.streams = EventStreams(
            redis,
            retention_seconds=settings.ws.events_retention_hours * 3600,
            keep_min=settings.ws.events_keep_min,
            max_per_user=settings.ws.events_max_per_user,
            clock=clock,
            readers=max(1, settings.redis.max_connections // 4),
        )
        self.stats = HubStats()
        self.live = LiveChannels(redis, self._dispatch, self._reconnected, settings.redis.timeout)
        self.sessions: set[Session] = set()  # open sockets (closing ones move to _closing)
        self._closing: set[Session] = set()
        self.by_user: dict[int, set[Session]] = {}
        self._subscriptions: dict[int, asyncio.Task[None]] = {}
        self._prefix_len = len(self.streams.channel_prefix)
        self._ticker: asyncio.Task[None] | None = None
        if registry is not None:
            registry.register(_HubCollector(self))

    # --- publishing (any code, any process) -----------------------------------------

    async def publish(self, user_id: int, event: str, data: dict[str, Any]) -> int | None:
        """Give the event the user's next seq, keep it and send it live; returns the seq.

        Never raises (but cancellation): on a Redis failure or timeout it logs, counts
        and returns None; the event is then lost for live delivery and replay."""
        return await self.publish_many(user_id, ((event, data),))

    async def publish_many(self, user_id: int, events: Sequence[Event]) -> int | None:
        """`publish` for several events of one user, in order, in one script run (their
        seqs follow each other); returns the last seq, or None as `publish` does."""
        if not events:
            return None
        try:
            async with asyncio.timeout(self.timeout):
                seq = await self.streams.publish(user_id, events)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.stats.publish_failures += len(events)
            names = ", ".join(event for event, _ in events)
            logger.warning("events {} for user {} not published: {!r}", names, user_id, exc)
            return None
        self.stats.published += len(events)
        return seq

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        await self.live.start()
        self._ticker = asyncio.create_task(self._tick(), name="ws-housekeeping")

    async def stop(self) -> None:
        await self.close_all(1001, "server shutdown")
        for session in list(self._closing):
            session.cancel()
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.wait([self._ticker])
        for task in self._subscriptions.values():
            task.cancel()
        await self.live.stop()
        await self.streams.close()

    async def close_all(self, code: int, reason: str) -> None:
        """Close every socket of this process (on_shutdown: GOING_AWAY), bounded in time."""
        for session in list(self.sessions):
            session.close(code, reason)
        closers = [s.closer for s in self._closing if s.closer is not None]
        if closers:
            await asyncio.wait(closers, timeout=self.settings.ws.close_timeout + 1)

    # --- sockets --------------------------------------------------------------------

    def open_session(self, ws: web.WebSocketResponse, request: web.Request) -> Session:
        """A socket just upgraded (`ws.prepare` has run)."""
        session = Session(ws, request, self.streams, self.stats, self.settings, self._closed)
        self.sessions.add(session)
        return session

    def _closed(self, session: Session) -> None:
        """A session started closing: no more events for it; keep it until it is closed."""
        self.detach(session)
        self.sessions.discard(session)
        closer = session.closer
        if closer is not None and not closer.done():
            self._closing.add(session)
            closer.add_done_callback(lambda _: self._closing.discard(session))

    def user_sockets(self, user_id: int) -> int:
        return len(self.by_user.get(user_id, ()))

    async def attach(self, session: Session, user_id: int) -> int:
        """Route the user's events to `session`; returns the user's last seq.

        The channel is subscribed (and Redis has confirmed it) before the last seq is
        read, so every event after it reaches the session live or by catch-up."""
        session.user_id = user_id
        self.by_user.setdefault(user_id, set()).add(session)
        try:
            task = self._subscriptions.get(user_id)
            if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
                task = asyncio.create_task(self.live.subscribe(self.streams.channel(user_id)))
                task.add_done_callback(_consume)
                self._subscriptions[user_id] = task
            await asyncio.shield(task)
            async with asyncio.timeout(self.timeout):
                return await self.streams.last_seq(user_id)
        except BaseException:
            self.detach(session)
            raise

    def detach(self, session: Session) -> None:
        uid = session.user_id
        peers = self.by_user.get(uid) if uid is not None else None
        if uid is None or peers is None:
            return
        peers.discard(session)
        if not peers:
            del self.by_user[uid]
            self._subscriptions.pop(uid, None)
            self.live.unsubscribe(self.streams.channel(uid))

    # --- the dispatcher and housekeeping --------------------------------------------

    def _dispatch(self, channel: bytes, frame: bytes) -> None:
        """A message of the pub/sub connection: the frame to each of the user's sessions."""
        try:
            peers = self.by_user.get(int(channel[self._prefix_len :]))
            if not peers:
                return
            start = len(FRAME_PREFIX)
            seq = int(frame[start : frame.index(b",", start)])
            if len(peers) == 1:
                next(iter(peers)).offer(seq, frame)
            else:
                for session in tuple(peers):  # an offer may close its session, leaving `peers`
                    session.offer(seq, frame)
        except Exception:
            logger.opt(exception=True).error("cannot dispatch a message on {!r}", channel)

    async def _reconnected(self) -> None:
        for session in list(self.sessions):
            session.catch_up()

    def housekeep(self) -> None:
        """Every TICK: token expiry warnings and closes, stuck writes, pub/sub liveness."""
        wall, mono = self.clock(), asyncio.get_running_loop().time()
        for session in list(self.sessions):
            session.tick(wall, mono)
        self.live.check(mono)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                self.housekeep()
            except Exception:
                logger.opt(exception=True).error("websocket housekeeping failed")


def _consume(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # the waiting attach() reports it; nothing to log twice


class _HubCollector(Collector):
    def __init__(self, hub: RedisEventHub) -> None:
        self.hub = hub

    def collect(self) -> Iterable[Metric]:
        hub, stats = self.hub, self.hub.stats
        for name, doc, value in (
            ("events_published", "Events numbered, kept and published", stats.published),
            (
                "events_publish_failures",
                "Events lost because Redis failed or timed out at publish",
                stats.publish_failures,
            ),
            ("events_delivered", "Events queued to sockets live", stats.delivered),
            (
                "events_replayed",
                "Events queued to sockets from the stream (resume, catch-up)",
                stats.replayed,
            ),
            ("ws_resets", "reset frames: a client asked for events no longer kept", stats.resets),
            ("events_pubsub_reconnects", "Times the pub/sub connection was re-opened", hub.live.reconnects),
        ):
            yield CounterMetricFamily(f"wardrobe_{name}", doc, value=value)
        closed = CounterMetricFamily("wardrobe_ws_closed", "Sockets closed, by close code", labels=["code"])
        for code, count in sorted(stats.closed.items()):
            closed.add_metric([str(code)], count)
        yield closed
        yield GaugeMetricFamily("wardrobe_ws_connections", "Open sockets", value=len(hub.sessions))
        yield GaugeMetricFamily("wardrobe_ws_users", "Users with a socket here", value=len(hub.by_user))
        yield GaugeMetricFamily(
            "wardrobe_events_pubsub_connected",
            "1 while the pub/sub connection is up",
            value=hub.live.connected,
        )
