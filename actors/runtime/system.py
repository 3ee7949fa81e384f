"""ActorSystem: spawns actors, finds keyed ones, owns their tasks, stops them all."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar

from loguru import logger
from prometheus_client import CollectorRegistry

from actors.errors import SystemClosed
from actors.metrics import ActorCollector, KindStats, MailboxSnapshot, SystemSnapshot, kind_snapshot
from actors.runtime.actor import Actor, KindInfo
from actors.runtime.refs import ActorRef
from actors.runtime.timeouts import AskTimer
from actors.runtime.typedefs import Key, M

ActorT = TypeVar("ActorT", bound=Actor[Any])

NEW, RUNNING, CLOSING, CLOSED = "new", "running", "closing", "closed"


class ActorSystem:
    """Owns every actor of the process.

    Start it once (`await system.start()`, or `async with ActorSystem() as system`) and
    stop it once (`await system.stop(timeout)`); the app does both in its cleanup_ctx.
    Metrics go to `registry` (a fresh CollectorRegistry when None) while it runs.

    `mailbox_sizes` and `passivate_after` override, by actor class name, the class
    attributes of the same names (`{"UserActor": 256}`).
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        default_ask_timeout: float = 10.0,
        mailbox_sizes: Mapping[str, int] | None = None,
        passivate_after: Mapping[str, float | None] | None = None,
        cancel_grace: float = 1.0,
    ) -> None:
        if default_ask_timeout <= 0:
            raise ValueError(f"default_ask_timeout must be positive, got {default_ask_timeout}")
        self.registry = registry if registry is not None else CollectorRegistry()
        self.default_ask_timeout = default_ask_timeout
        self._mailbox_sizes = dict(mailbox_sizes or {})
        self._passivate_after = dict(passivate_after or {})
        self._cancel_grace = cancel_grace
        self._collector = ActorCollector(self)
        self._state = NEW
        self._kinds: dict[type[Actor[Any]], KindInfo] = {}
        self._stats: dict[str, KindStats] = {}  # by kind name: one time series per name
        self._factories: dict[type[Actor[Any]], Callable[[], Actor[Any]]] = {}
        self._actors: set[Actor[Any]] = set()  # every actor whose task has not ended
        self._seq = itertools.count(1)
        self._empty_waiters: list[tuple[type[Actor[Any]] | None, asyncio.Future[None]]] = []
        self._stopped: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind to the running loop and register the metrics."""
        if self._state != NEW:
            raise RuntimeError(f"ActorSystem.start() called on a {self._state} system")
        self._loop = asyncio.get_running_loop()
        self._ask_timer = AskTimer(self._loop)
        self.registry.register(self._collector)
        self._state = RUNNING

    async def stop(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - the drain bound
        """Stop every actor: refuse new messages, let each drain its mailbox for up to
        `timeout` seconds in all, then cancel the rest. Every ask still pending fails with
        ActorStopped. A second call waits for the first."""
        if self._state == NEW:
            self._state = CLOSED
            return
        if self._stopped is not None:
            await asyncio.shield(self._stopped)
            return
        self._stopped = self._loop.create_future()
        self._state = CLOSING
        try:
            await self._stop_all(timeout)
        finally:
            self._state = CLOSED
            self._ask_timer.close()
            self.registry.unregister(self._collector)
            self._stopped.set_result(None)

    async def _stop_all(self, timeout: float) -> None:  # noqa: ASYNC109
        actors = list(self._actors)
        for actor in actors:
            actor._request_stop("stopped")
        tasks = {actor._task for actor in actors if actor._task is not None}
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        if not pending:
            return
        logger.bind(actor="system").warning(
            "{} actors did not drain within {:g}s; cancelling them", len(pending), timeout
        )
        for task in pending:
            task.cancel()
        _, stuck = await asyncio.wait(pending, timeout=self._cancel_grace)
        for actor in actors:
            if actor._task in stuck:
                # It swallowed the cancellation; its askers must not wait for it.
                logger.bind(actor=actor.id).error(
                    "{} ignored cancellation for {:g}s; abandoning it", actor.id, self._cancel_grace
                )
                actor._finish(True)

    async def __aenter__(self) -> ActorSystem:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def closed(self) -> bool:
        """True from the moment `stop()` begins."""
        return self._state in (CLOSING, CLOSED)

    # ------------------------------------------------------------------ actors

    def register(self, cls: type[ActorT], factory: Callable[[], ActorT]) -> None:
        """Use `factory` to build instances of keyed kind `cls` (default: `cls()`), e.g.
        `system.register(UserActor, lambda: UserActor(pool))`."""
        self._factories[cls] = factory
        if cls in self._kinds:
            self._kinds[cls].factory = factory

    def spawn(self, actor: Actor[M], *, name: str | None = None) -> ActorRef[M]:
        """Start an unkeyed actor (a vendor actor, say) and return its ref."""
        info = self._kind(type(actor))
        self._launch(actor, info, None, name or f"{info.name}#{next(self._seq)}", None)
        return ActorRef(self, info.cls, None, actor)

    def ref(self, cls: type[Actor[M]], key: Key) -> ActorRef[M]:
        """A ref to the keyed actor `cls` for `key`; the actor is spawned on first use."""
        if key is None:
            raise ValueError("an actor key cannot be None")
        return ActorRef(self, cls, key, None)

    def resolve(self, cls: type[Actor[M]], key: Key) -> Actor[M]:
        """The live instance of `cls` for `key`, spawned when there is none."""
        info = self._kinds.get(cls)
        if info is not None:
            actor = info.instances.get(key)
            if actor is not None:
                return actor
        else:
            info = self._kind(cls)
        actor = info.factory()
        pred = info.retiring.get(key)
        self._launch(actor, info, key, f"{info.name}:{key}", pred)
        info.instances[key] = actor
        return actor

    def _kind(self, cls: type[Actor[Any]]) -> KindInfo:
        info = self._kinds.get(cls)
        if info is None:
            name = cls.__name__
            stats = self._stats.get(name)
            if stats is None:
                stats = self._stats[name] = KindStats(name)
            info = KindInfo(
                cls=cls,
                name=name,
                mailbox_size=self._mailbox_sizes.get(name, cls.mailbox_size),
                passivate_after=self._passivate_after.get(name, cls.passivate_after),
                stats=stats,
                factory=self._factories.get(cls, cls),
            )
            self._kinds[cls] = info
        return info

    def _launch(
        self, actor: Actor[Any], info: KindInfo, key: Key | None, actor_id: str, pred: Actor[Any] | None
    ) -> None:
        if self._state != RUNNING:
            if self.closed:
                raise SystemClosed(actor_id)
            raise RuntimeError("ActorSystem.start() has not been awaited")
        actor._bind(self, info, key, actor_id, pred)
        task = self._loop.create_task(actor._run(), name=actor_id)
        actor._task = task
        task.add_done_callback(actor._on_task_done)
        self._actors.add(actor)
        info.alive += 1
        info.stats.alive += 1
        info.stats.spawns += 1

    def _retire(self, actor: Actor[Any]) -> None:
        """Take a keyed actor out of the registry (it is stopping): the next message for
        its key spawns a successor, which starts once this one has finished."""
        key = actor.key
        if key is None:
            return
        info = actor._kind
        if info.instances.get(key) is actor:
            del info.instances[key]
            info.retiring[key] = actor

    def _reap(self, actor: Actor[Any]) -> None:
        """The actor's task has ended: forget it."""
        if actor not in self._actors:
            return
        self._actors.remove(actor)
        info = actor._kind
        if actor.key is not None and info.retiring.get(actor.key) is actor:
            del info.retiring[actor.key]
        info.alive -= 1
        info.stats.alive -= 1
        if self._empty_waiters:
            for cls, fut in self._empty_waiters:
                if not fut.done() and self.alive(cls) == 0:
                    fut.set_result(None)

    # ------------------------------------------------------------------ observation

    def alive(self, cls: type[Actor[Any]] | None = None) -> int:
        """How many actors (of `cls`) have a running task."""
        if cls is None:
            return len(self._actors)
        info = self._kinds.get(cls)
        return 0 if info is None else info.alive

    async def wait_empty(self, cls: type[Actor[Any]] | None = None) -> None:
        """Wait until no actor (of `cls`) is alive, e.g. after passivation."""
        while self.alive(cls):
            fut: asyncio.Future[None] = self._loop.create_future()
            entry = (cls, fut)
            self._empty_waiters.append(entry)
            try:
                await fut
            finally:
                self._empty_waiters.remove(entry)

    def kind_stats(self) -> list[KindStats]:
        return list(self._stats.values())

    def mailbox_depths(self) -> dict[str, int]:
        depths: dict[str, int] = dict.fromkeys(self._stats, 0)
        for actor in tuple(self._actors):  # a copy: scrapes may run in another thread
            depths[actor._kind.name] += len(actor._mailbox)
        return depths

    def snapshot(self, top: int = 10) -> SystemSnapshot:
        """Plain dicts for the ops dashboard: per kind counts, and the `top` deepest mailboxes."""
        depths = self.mailbox_depths()
        actors = tuple(self._actors)
        deepest = heapq.nlargest(top, (a for a in actors if len(a._mailbox)), key=lambda a: len(a._mailbox))
        return SystemSnapshot(
            closed=self.closed,
            kinds={name: kind_snapshot(stats, depths[name]) for name, stats in self._stats.items()},
            deepest=[
                MailboxSnapshot(
                    actor=a.id, kind=a._kind.name, depth=len(a._mailbox), capacity=a._mailbox.capacity
                )
                for a in deepest
            ],
        )
