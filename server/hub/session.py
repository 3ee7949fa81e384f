"""One socket's delivery: its cursor, catch-up from the stream, and a bounded outbound queue.

`cursor` is the highest seq queued for the client. A session is either *live* (the
hub's dispatcher hands it each event: the next seq is queued with `put_nowait`, a
duplicate is dropped, a hole starts a catch-up) or *catching up* (a task reads the
stream after `cursor` and queues what it finds, waiting for room; live events only
raise `_target`, the highest seq known to exist). Events are in the stream before
they are published, so reading the stream until `cursor >= _target` and then turning
live, with no await in between, loses nothing and sends nothing twice.

Events may take WS_QUEUE_SIZE slots of the queue; CONTROL_SLOTS more are kept for
control frames (pong, errors, auth.expiring). A live event that finds no slot
closes the socket with 4429: the dispatcher never waits for one client.

One writer task per socket sends what is queued through aiohttp's
`WebSocketResponse.send_frame` (the frames are the UTF-8 bytes Redis holds, sent as
text frames: no decode and re-encode). aiohttp waits for the transport to drain when
its buffer is past the high-water mark; a send that has not returned after
WS_SEND_TIMEOUT also closes the socket with 4429.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web
from loguru import logger

from server.config import Settings
from server.hub.stream import EventStreams
from server.timing import rfc3339

CONTROL_SLOTS = 16
REPLAY_BATCH = 256

# Close codes (docs/websocket.md).
UNAUTHENTICATED = 4401
AUTH_TIMEOUT = 4408
TOO_MANY = 4429
UNAVAILABLE = 1011
GOING_AWAY = 1001


class _TooSlow(Exception):
    pass


@dataclass(slots=True)
class HubStats:
    """Plain counters on the hot path; exported by the hub's collector at scrape time."""

    published: int = 0
    publish_failures: int = 0
    delivered: int = 0
    replayed: int = 0
    resets: int = 0
    closed: dict[int, int] = field(default_factory=dict)


def encode(frame: dict[str, Any]) -> bytes:
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":")).encode()


class Session:
    def __init__(
        self,
        ws: web.WebSocketResponse,
        request: web.Request,
        streams: EventStreams,
        stats: HubStats,
        settings: Settings,
        on_close: Callable[[Session], None],
    ) -> None:
        self.ws = ws
        self.request = request
        self.streams = streams
        self.stats = stats
        self._on_close = on_close
        self.user_id: int | None = None
        self.cursor = 0
        self.expires_at: float | None = None  # the access token's exp (epoch seconds)
        self.close_code: int | None = None
        self.limit = settings.ws.queue_size
        # bytes: a frame for the writer; None: the socket closes, stop after what came before
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(self.limit + CONTROL_SLOTS)
        self._send_timeout = settings.ws.send_timeout
        self._close_timeout = settings.ws.close_timeout
        self._warning = settings.ws.expiry_warning
        self._warned = False
        self._live = False
        self._started = False  # go_live() ran: `cursor` means something
        self._target = 0
        self._cursor_frame: bytes | None = None  # the frame this socket sent for `cursor`
        self._check_last = False
        self._room: asyncio.Event | None = None
        self._sending_since = 0.0  # the writer waits in send_frame (the peer takes no bytes)
        self._writer: asyncio.Task[None] | None = None
        self._catchup: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None

    # --- called by the hub's dispatcher: synchronous, never waits -----------------

    def offer(self, seq: int, frame: bytes) -> None:
        if not self._live:
            self._target = max(self._target, seq)
            return
        cursor = self.cursor
        if seq == cursor + 1:
            queue = self.queue
            if queue.qsize() >= self.limit:
                self._too_slow()
                return
            queue.put_nowait(frame)
            self.cursor, self._cursor_frame = seq, frame
            self.stats.delivered += 1
        elif seq > cursor:  # a hole: read cursor+1 … seq from the stream
            self._target = seq
            self._start_catch_up()

    def catch_up(self) -> None:
        """The pub/sub connection came back: read whatever was published meanwhile."""
        if self._started and self.close_code is None:  # (attaching ones read last_seq after)
            self._check_last = True
            self._start_catch_up()

    def tick(self, wall: float, mono: float) -> None:
        """Housekeeping (every half second): stuck writes and token expiry."""
        if self.close_code is not None:
            return
        if self._sending_since and mono - self._sending_since > self._send_timeout:
            self._too_slow()
            return
        exp = self.expires_at
        if exp is None:
            return
        if wall >= exp:
            self.close(UNAUTHENTICATED, "TOKEN_EXPIRED")
        elif not self._warned and wall >= exp - self._warning:
            self._warned = True
            self.send({"type": "auth.expiring", "expires_at": rfc3339(exp)})

    # --- called by the socket's handler -------------------------------------------

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write(), name="ws-writer")

    def send(self, frame: dict[str, Any]) -> None:
        """Queue a control frame (not an event)."""
        if self.close_code is not None:
            return
        try:
            self.queue.put_nowait(encode(frame))
        except asyncio.QueueFull:
            self._too_slow()

    def renew(self, expires_at: float) -> None:
        self.expires_at = expires_at
        self._warned = False

    def go_live(self, last_seq: int, after_seq: int | None = None) -> None:
        """After `ready`: deliver every event after `after_seq` (replayed first) or, without
        one, after `last_seq`."""
        self._started = True
        if after_seq is not None:
            self._target = max(self._target, last_seq)
            self.cursor, self._cursor_frame = after_seq, None
            self._check_last = after_seq > last_seq  # a seq Redis never gave: reset
            self._start_catch_up()
            return
        self.cursor, self._cursor_frame = last_seq, None
        if self._target > last_seq:
            self._start_catch_up()
        else:
            self._live = True

    async def resume(self, after_seq: int) -> None:
        """Replay every kept event after `after_seq`, then go on live."""
        if self._catchup is not None:
            await _cancel(self._catchup)
            self._catchup = None
        if self.close_code is not None:
            return
        self._target = max(self._target, self.cursor)
        self.cursor, self._cursor_frame = after_seq, None
        self._check_last = True
        self._live = False
        self._catchup = asyncio.create_task(self._catch_up(), name="ws-catch-up")

    def close(self, code: int, reason: str) -> None:
        """Close with `code` (once). The hub stops routing to the session at once and
        owns the closing task until it ends, even if the handler is cancelled meanwhile."""
        if self.close_code is not None:
            return
        self.close_code = code
        self._live = False
        self.stats.closed[code] = self.stats.closed.get(code, 0) + 1
        self._closer = asyncio.create_task(self._close(code, reason), name="ws-closer")
        self._on_close(self)

    @property
    def closer(self) -> asyncio.Task[None] | None:
        return self._closer

    async def finish(self) -> None:
        """The handler is done: stop the tasks, close the socket if still open."""
        if self.close_code is None:
            self.close(int(self.ws.close_code or 1006), "")  # the peer closed or vanished
        await self.wait_closed()

    def wait_closed(self) -> Awaitable[Any]:
        return asyncio.wait([self._closer]) if self._closer is not None else asyncio.sleep(0)

    def cancel(self) -> None:
        """Hub teardown: whatever still runs stops now."""
        for task in (self._writer, self._catchup, self._closer):
            if task is not None:
                task.cancel()

    # --- tasks --------------------------------------------------------------------

    def _too_slow(self) -> None:
        logger.info("user {} socket too slow (queue {}), closing", self.user_id, self.queue.qsize())
        self.close(TOO_MANY, "too slow")

    def _start_catch_up(self) -> None:
        if self.close_code is not None:
            return
        self._live = False
        if self._catchup is None or self._catchup.done():
            self._catchup = asyncio.create_task(self._catch_up(), name="ws-catch-up")

    async def _catch_up(self) -> None:
        assert self.user_id is not None
        uid, streams = self.user_id, self.streams
        try:
            while True:
                if self._check_last:
                    self._check_last = False
                    last = await streams.last_seq(uid)
                    if self.cursor > last or not await self._cursor_kept(last):
                        # The client knows seqs Redis does not, or Redis gave the client's last
                        # seq to another event (a failover lost events the replica never had,
                        # and the new primary numbered new ones from its own count).
                        self._reset(last, "unknown_seq")
                    self._target = max(self._target, last)
                entries = await streams.read_after(uid, self.cursor, REPLAY_BATCH)
                if (entries and entries[0][0] != self.cursor + 1) or (
                    not entries and self._target > self.cursor
                ):
                    self._reset(await streams.last_seq(uid), "trimmed")
                    continue
                for seq, frame in entries:
                    await self._put(frame)
                    self.cursor, self._cursor_frame = seq, frame
                self.stats.replayed += len(entries)
                if len(entries) < REPLAY_BATCH and self._target <= self.cursor and not self._check_last:
                    self._live = True  # no await since the last read: nothing slips between
                    return
        except _TooSlow:
            self._too_slow()
        except Exception as exc:
            logger.warning("replay for user {} failed ({!r}); closing so the client resumes", uid, exc)
            self.close(UNAVAILABLE, "events unavailable, reconnect")

    async def _cursor_kept(self, last: int) -> bool:
        """Whether the stream still holds, at the client's seq, the frame this socket sent
        for it (True when unknown: nothing was sent here yet, or the entry was trimmed)."""
        sent = self._cursor_frame
        if sent is None or self.cursor == 0 or self.cursor > last:
            return True
        assert self.user_id is not None
        kept = await self.streams.read_after(self.user_id, self.cursor - 1, 1)
        if not kept or kept[0][0] != self.cursor:
            return True  # trimmed: the replay below says so if anything after it is gone
        return kept[0][1] == sent

    def _reset(self, last: int, reason: str) -> None:
        """Events after the client's seq are gone: it must refetch; live goes on after `last`."""
        self.stats.resets += 1
        self.send({"type": "reset", "last_seq": last, "reason": reason})
        self.cursor, self._cursor_frame = last, None
        self._target = last

    async def _put(self, frame: bytes) -> None:
        queue = self.queue
        while queue.qsize() >= self.limit:
            if self._room is None:
                self._room = asyncio.Event()
            self._room.clear()
            try:
                async with asyncio.timeout(self._send_timeout):
                    await self._room.wait()
            except TimeoutError:
                raise _TooSlow from None
        queue.put_nowait(frame)

    async def _write(self) -> None:
        queue, ws = self.queue, self.ws
        loop = asyncio.get_running_loop()
        try:
            while True:
                frame = await queue.get()
                if frame is None:
                    return  # closing: everything queued before has been sent
                self._sending_since = loop.time()
                await ws.send_frame(frame, WSMsgType.TEXT)  # waits only while aiohttp drains
                self._sending_since = 0.0
                room = self._room
                if room is not None and queue.qsize() < self.limit:
                    room.set()
        except ConnectionError:
            pass  # the peer is gone (aiohttp: "Cannot write to closing transport"); the read loop ends too
        except Exception:
            logger.opt(exception=True).error("writing to user {}'s socket failed", self.user_id)
            self.close(UNAVAILABLE, "internal error")

    async def _close(self, code: int, reason: str) -> None:
        if self._catchup is not None:
            await _cancel(self._catchup)
        writer = self._writer
        try:
            async with asyncio.timeout(self._close_timeout):
                if writer is not None and not writer.done():
                    if code == TOO_MANY:
                        writer.cancel()  # it is behind: what is queued is dropped (the client resumes)
                    else:
                        try:
                            self.queue.put_nowait(None)  # send what is queued, then stop
                        except asyncio.QueueFull:
                            writer.cancel()
                    await asyncio.wait([writer])
                await self.ws.close(code=code, message=reason.encode()[:120])
        except TimeoutError:
            # The peer takes nothing. aiohttp closes the transport, which would keep what is
            # buffered for such a peer as long as the connection lasts: abort it instead.
            transport = self.request.transport
            if transport is not None:
                transport.abort()
        except Exception:
            logger.opt(exception=True).warning("closing user {}'s socket failed", self.user_id)
        finally:
            if writer is not None and not writer.done():
                await _cancel(writer)


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    await asyncio.wait([task])
