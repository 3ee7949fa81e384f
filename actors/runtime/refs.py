"""ActorRef: how everything outside an actor talks to it."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Generic, cast

from actors.runtime.mailbox import Envelope, Message
from actors.runtime.typedefs import Key, M, R

if TYPE_CHECKING:
    from actors.runtime.actor import Actor
    from actors.runtime.system import ActorSystem


class ActorRef(Generic[M]):
    """A cheap handle with `tell` and `ask`.

    A ref to a keyed actor holds only (kind, key) and finds the live instance on every
    send, spawning one if there is none: it never pins a passivated actor in memory and
    never sends to a stopped one. A ref to an unkeyed actor holds the actor itself.
    """

    __slots__ = ("_actor", "_cls", "_key", "_system")

    def __init__(
        self, system: ActorSystem, cls: type[Actor[Any]], key: Key | None, actor: Actor[M] | None
    ) -> None:
        self._system = system
        self._cls = cls
        self._key = key
        self._actor = actor

    @property
    def id(self) -> str:
        if self._actor is not None:
            return self._actor.id
        return f"{self._cls.__name__}:{self._key}"

    @property
    def key(self) -> Key | None:
        return self._key

    def __repr__(self) -> str:
        return f"<ActorRef {self.id}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ActorRef):
            return NotImplemented
        if self._actor is not None or other._actor is not None:
            return self._actor is other._actor
        return self._system is other._system and self._cls is other._cls and self._key == other._key

    def __hash__(self) -> int:
        return hash((self._cls, self._key)) if self._actor is None else id(self._actor)

    def _target(self) -> Actor[M]:
        if self._actor is not None:
            return self._actor
        return cast("Actor[M]", self._system.resolve(self._cls, self._key))

    def tell(self, msg: M) -> None:
        """Queue `msg` and return at once.

        Raises MailboxFull (a Busy: 503 + Retry-After) when the mailbox is full, and
        ActorStopped / SystemClosed when the actor or the system is stopping.
        """
        self._target()._enqueue(Envelope(msg))

    async def ask(self, msg: Message[R], timeout: float | None = None) -> R:  # noqa: ASYNC109 - part of the API
        """Send `msg` and wait for the handler's result (or its exception, re-raised here).

        Waits at most `timeout` seconds (the system's `default_ask_timeout` when None),
        then raises AskTimeout; the message may still be handled later and that reply is
        dropped. Raises MailboxFull, ActorStopped and SystemClosed like `tell`, and
        ActorStopped when the actor stops before answering. Never ask yourself, or in a
        cycle: see docs/actors.md.
        """
        actor = self._actor
        if actor is None:
            actor = self._system.resolve(self._cls, self._key)
        # A parked actor is not running anything, so cannot be the asker: skip the lookup.
        if not actor._waiting and actor._task is asyncio.current_task(actor._loop):
            raise RuntimeError(f"{actor.id} asked itself: it would wait on its own mailbox forever")
        reply: asyncio.Future[R] = actor._loop.create_future()
        actor._enqueue(Envelope(msg, reply))
        system = self._system
        # No asyncio.wait_for (a task per ask) and no call_later (a heap entry per ask):
        # the reply joins a coarse deadline slot, see timeouts.py.
        slot = system._ask_timer.add(
            reply, actor, msg, system.default_ask_timeout if timeout is None else timeout
        )
        try:
            return await reply
        except asyncio.CancelledError:
            if reply.done() and not reply.cancelled():
                reply.exception()  # answered in the same step we were cancelled: mark it seen
            raise
        finally:
            slot.pop(reply, None)
