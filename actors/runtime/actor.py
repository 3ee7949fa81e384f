"""The actor base class: mailbox loop, batch receive, supervision, passivation."""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic

from loguru import logger

from actors.errors import ActorStopped, MailboxFull, SystemClosed
from actors.metrics import KindStats
from actors.runtime.mailbox import Envelope, Mailbox
from actors.runtime.refs import ActorRef
from actors.runtime.typedefs import Key, M

if TYPE_CHECKING:
    from loguru import Logger

    from actors.runtime.system import ActorSystem

# Life of one actor instance. RUNNING accepts messages (also while starting or backing
# off after a crash); STOPPING drains what is queued and accepts nothing; STOPPED is final.
RUNNING, STOPPING, STOPPED = 0, 1, 2


@dataclass(slots=True, eq=False)
class KindInfo:
    """What the system knows about one actor class."""

    cls: type[Actor[Any]]
    name: str
    mailbox_size: int
    passivate_after: float | None
    stats: KindStats
    factory: Callable[[], Actor[Any]]
    instances: dict[Key, Actor[Any]] = field(default_factory=dict)  # keyed actors accepting messages
    retiring: dict[Key, Actor[Any]] = field(default_factory=dict)  # keyed actors stopping
    alive: int = 0  # of this class (stats.alive counts every class of this name)


class Actor(Generic[M]):
    """Base class of every actor kind.

    Subclass it with the message type the kind accepts and implement `receive` (one
    message per turn) or, for group work, set `batch_max > 1` and implement
    `receive_batch` (everything waiting, up to `batch_max`, per turn). The loop never runs
    two turns of one actor at once, and handles messages in mailbox order.

    Class attributes are the kind's defaults; `ActorSystem(mailbox_sizes=...,
    passivate_after=...)` overrides the first two by class name.

    The runtime sets `id`, `key` and `system` before `on_start` runs; `__init__` (called
    by the kind's factory, see `ActorSystem.register`) must not rely on them.
    """

    mailbox_size: ClassVar[int] = 100
    #: Keyed actors only: stop after this many idle seconds (None: never).
    passivate_after: ClassVar[float | None] = 300.0
    #: 1: `receive` per message. More: `receive_batch` with up to this many envelopes.
    batch_max: ClassVar[int] = 1
    #: More than `max_restarts` crashes within `restart_window` seconds stop the actor.
    max_restarts: ClassVar[int] = 5
    restart_window: ClassVar[float] = 60.0
    #: Backoff before restart n is restart_backoff * 2**(n-1), at most restart_backoff_max.
    restart_backoff: ClassVar[float] = 0.05
    restart_backoff_max: ClassVar[float] = 5.0

    id: str
    key: Key | None
    system: ActorSystem
    _kind: KindInfo
    _loop: asyncio.AbstractEventLoop
    _mailbox: Mailbox[Envelope[M]]
    _task: asyncio.Task[None] | None
    _state: int
    _stop_reason: str
    _current: Sequence[Envelope[M]]
    _waiting: bool
    _idle_since: float
    _idle_timer: asyncio.TimerHandle | None
    _backoff: asyncio.Future[None] | None
    _crashes: deque[float] | None
    _predecessor: Actor[Any] | None

    # ------------------------------------------------------------------ hooks

    async def receive(self, msg: M) -> Any:
        """Handle one message. The return value answers an ask; an exception raised here
        goes to the asker (ask) or to the log and `on_failure` (tell); the actor lives on."""
        raise NotImplementedError(f"{type(self).__name__} must implement receive()")

    async def receive_batch(self, batch: Sequence[Envelope[M]]) -> None:
        """Handle every envelope of `batch` (called when `batch_max > 1`).

        Answer each envelope with `env.ok(result)` or `env.fail(exc)`, in any order, as
        soon as its outcome is known. An envelope left unanswered is answered with None.
        An exception escaping this method is a crash: unanswered envelopes get that
        exception and the supervisor restarts the loop.
        """
        for env in batch:
            try:
                env.ok(await self.receive(env.msg))
            except Exception as exc:
                env.fail(exc)

    async def on_start(self) -> None:
        """Runs before the first message, and again after every restart."""

    async def on_stop(self) -> None:
        """Runs once after the last message (stop, passivation or giving up); not when
        the actor is cancelled because its drain overran the shutdown bound."""

    async def on_failure(self, msg: M, exc: Exception) -> None:
        """Runs after a told message failed (already logged). Raise to crash the loop and
        have the supervisor restart the actor."""

    # ------------------------------------------------------------ public helpers

    @property
    def ref(self) -> ActorRef[M]:
        """A ref to this actor; for a keyed actor it follows the key across passivation."""
        if self.key is None:
            return ActorRef(self.system, self._kind.cls, None, self)
        return ActorRef(self.system, self._kind.cls, self.key, None)

    @property
    def log(self) -> Logger:
        """The loguru logger with this actor's id bound as `actor`."""
        return logger.bind(actor=self.id)

    @property
    def mailbox_depth(self) -> int:
        return len(self._mailbox)

    def stop(self) -> None:
        """Handle what is already queued, then stop. Later messages to a keyed actor go to
        a fresh instance (started once this one is gone); to others they raise ActorStopped."""
        self._request_stop("stopped")

    # ------------------------------------------------------------------ runtime

    def _bind(
        self, system: ActorSystem, kind: KindInfo, key: Key | None, actor_id: str, pred: Actor[Any] | None
    ) -> None:
        self.system = system
        self.key = key
        self.id = actor_id
        self._kind = kind
        self._loop = asyncio.get_running_loop()
        self._mailbox = Mailbox(kind.mailbox_size)
        self._task = None
        self._state = RUNNING
        self._stop_reason = "stopped"
        self._current = ()
        self._waiting = False
        self._idle_since = 0.0
        self._idle_timer = None
        self._backoff = None
        self._crashes = None
        self._predecessor = pred
        if key is not None and kind.passivate_after is not None:
            self._idle_timer = self._loop.call_later(kind.passivate_after, self._idle_check)

    def _enqueue(self, env: Envelope[Any]) -> None:
        if self._state == RUNNING:
            if self._mailbox.offer(env):
                return
            self._kind.stats.outcomes["rejected"] += 1
            raise MailboxFull(self.id, self._mailbox.capacity)
        if self.system.closed:
            raise SystemClosed(self.id)
        if self.key is not None:
            # A keyed actor that stopped or is stopping: the key lives on in a fresh instance.
            self.system.resolve(self._kind.cls, self.key)._enqueue(env)
            return
        raise ActorStopped(self.id)

    def _request_stop(self, reason: str) -> None:
        if self._state != RUNNING:
            return
        self._state = STOPPING
        self._stop_reason = reason
        self.system._retire(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._mailbox.wake()
        if self._backoff is not None and not self._backoff.done():
            self._backoff.set_result(None)

    def _idle_check(self) -> None:
        # Passivation happens here, in one synchronous step: the mailbox is empty and the
        # loop is parked, and _request_stop takes the actor out of the registry before any
        # other callback can run. A message offered before this step keeps the actor alive;
        # one sent after it finds a fresh instance (see docs/actors.md).
        self._idle_timer = None
        after = self._kind.passivate_after
        if self._state != RUNNING or after is None:
            return
        delay = after
        if self._waiting and not self._mailbox:
            idle_for = self._loop.time() - self._idle_since
            if idle_for >= after:
                self._request_stop("passivated")
                return
            delay = after - idle_for
        self._idle_timer = self._loop.call_later(delay, self._idle_check)

    async def _run(self) -> None:
        """The actor's one task: start, serve, restart after crashes, finish."""
        cancelled = True
        try:
            pred, self._predecessor = self._predecessor, None
            if pred is not None and pred._task is not None and not pred._task.done():
                await asyncio.wait((pred._task,))  # keep one instance per key at a time
            while True:
                try:
                    await self._serve()
                    break
                except Exception as exc:
                    if not await self._crashed(exc):
                        break
                except asyncio.CancelledError as exc:
                    task = self._task
                    if task is None or task.cancelling():
                        raise
                    # Raised by a handler, not by a cancel() of this task: a crash.
                    if not await self._crashed(exc):
                        break
            try:
                await self.on_stop()
            except Exception:
                self.log.opt(exception=True).error("{} on_stop failed", self.id)
            cancelled = False
        finally:
            self._finish(cancelled)

    async def _serve(self) -> None:
        await self.on_start()
        # The hot loop: locals instead of attribute lookups, and the common case of
        # Envelope.ok and Buckets.observe written out (see bench/actors.py).
        mailbox = self._mailbox
        items = mailbox._items  # this loop is the mailbox's only consumer
        stats = self._kind.stats
        outcomes = stats.outcomes
        latency = stats.latency
        bounds, counts = latency.bounds, latency.counts
        receive = self.receive
        clock = time.perf_counter
        loop_time = self._loop.time
        batch_max = self.batch_max
        while True:
            if not items:
                if self._state != RUNNING:
                    return
                self._idle_since = loop_time()
                self._waiting = True
                await mailbox.waiter()
                self._waiting = False
                continue
            if batch_max > 1:
                await self._handle_batch(mailbox.take(batch_max))
                continue
            env = items.popleft()
            self._current = (env,)
            started = clock()
            try:
                result = await receive(env.msg)
            except Exception as exc:
                latency.observe(clock() - started)
                self._current = ()
                env.fail(exc)
                outcomes[env.outcome] += 1
                if env.reply is None:
                    await self._tell_failed(env.msg, exc)
            else:
                elapsed = clock() - started
                counts[bisect_left(bounds, elapsed)] += 1
                latency.total += elapsed
                self._current = ()
                reply = env.reply
                if reply is not None and not reply.done():
                    reply.set_result(result)  # env is dropped now: no need to mark it answered
                    outcomes["ok"] += 1
                else:
                    env.ok(result)  # a tell, or an ask that timed out or was cancelled
                    outcomes[env.outcome] += 1

    async def _handle_batch(self, batch: list[Envelope[M]]) -> None:
        stats = self._kind.stats
        self._current = batch
        started = time.perf_counter()
        await self.receive_batch(batch)
        stats.latency.observe(time.perf_counter() - started)
        stats.batch.observe(len(batch))
        self._current = ()
        outcomes = stats.outcomes
        failed: list[tuple[M, Exception]] = []
        for env in batch:
            if not env.outcome:
                env.ok(None)
            outcomes[env.outcome] += 1
            if env.reply is None and isinstance(env.error, Exception):
                failed.append((env.msg, env.error))
        for msg, exc in failed:
            await self._tell_failed(msg, exc)

    async def _tell_failed(self, msg: M, exc: Exception) -> None:
        self.log.opt(exception=exc).error("{}: {} failed (told): {!r}", self.id, type(msg).__name__, exc)
        await self.on_failure(msg, exc)

    async def _crashed(self, exc: BaseException) -> bool:
        """Settle the turn the crash interrupted; True when the loop should restart."""
        current, self._current = self._current, ()
        outcomes = self._kind.stats.outcomes
        # A stray CancelledError must not reach askers: they would think they were cancelled.
        error = exc if isinstance(exc, Exception) else RuntimeError(f"{self.id} crashed: {exc!r}")
        for env in current:
            if not env.outcome:
                env.settle_error(error, "crashed")
            outcomes[env.outcome] += 1
        if self._state != RUNNING:
            self.log.opt(exception=exc).error("{} crashed while stopping: {!r}", self.id, exc)
            return False
        now = self._loop.time()
        crashes = self._crashes = self._crashes if self._crashes is not None else deque()
        while crashes and crashes[0] <= now - self.restart_window:
            crashes.popleft()
        if len(crashes) >= self.max_restarts:
            self.log.opt(exception=exc).error(
                "{} crashed {} times within {:g}s; giving up: {!r}",
                self.id,
                len(crashes) + 1,
                self.restart_window,
                exc,
            )
            self._request_stop("gave_up")
            return False
        crashes.append(now)
        self._kind.stats.restarts += 1
        delay = min(self.restart_backoff * 2 ** (len(crashes) - 1), self.restart_backoff_max)
        self.log.opt(exception=exc).warning(
            "{} crashed; restart {} in {:g}s: {!r}", self.id, len(crashes), delay, exc
        )
        backoff = self._backoff = self._loop.create_future()
        timer = self._loop.call_later(delay, _resolve, backoff)
        try:
            await backoff  # stop() resolves it early
        finally:
            timer.cancel()
            self._backoff = None
        return self._state == RUNNING

    def _finish(self, cancelled: bool) -> None:
        """Settle everything still pending; idempotent (the task's done callback calls it
        again, for a task cancelled before it ever ran)."""
        if self._state == STOPPED:
            return
        stats = self._kind.stats
        stats.stops["cancelled" if cancelled else self._stop_reason] += 1
        self._state = STOPPED
        self.system._retire(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        pending = [*self._current, *self._mailbox.drain()]
        self._current = ()
        dropped = 0
        for env in pending:
            if not env.outcome:
                env.settle_error(ActorStopped(self.id), "stopped")
                dropped += env.reply is None
            stats.outcomes[env.outcome] += 1
        if dropped:
            logger.bind(actor=self.id).warning("{} stopped with {} told messages unhandled", self.id, dropped)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        self._finish(True)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.log.opt(exception=exc).error("{} task died: {!r}", self.id, exc)
        self.system._reap(self)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
