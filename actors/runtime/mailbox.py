"""Messages, envelopes and the bounded single-consumer mailbox."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Generic

from actors.runtime.typedefs import M, R_co, T


class Message(Generic[R_co]):
    """Base class of messages; `R_co` is what `ask` returns for it.

    Subclasses are `@dataclass(frozen=True, slots=True)`::

        @dataclass(frozen=True, slots=True)
        class Reserve(Message[Reservation]):
            task_id: str
            amount: int

    A message only ever told (never asked) can subclass `Message[None]`.
    """

    __slots__ = ()


class Envelope(Generic[M]):
    """One message in a mailbox, with the future its asker waits on (None for a tell).

    A batch handler answers each envelope once, with `ok(value)` or `fail(exc)`.
    Answering a second time raises RuntimeError. An answer whose asker already timed out
    or went away is dropped quietly (and counted as outcome `timeout` / `cancelled`).
    """

    __slots__ = ("error", "msg", "outcome", "reply")

    def __init__(self, msg: M, reply: asyncio.Future[Any] | None = None) -> None:
        self.msg = msg
        self.reply = reply
        #: "" until answered; then one of the outcomes of `actors.metrics.OUTCOMES`.
        self.outcome = ""
        self.error: BaseException | None = None

    @property
    def answered(self) -> bool:
        return bool(self.outcome)

    def ok(self, value: Any = None) -> None:
        """Answer with a result (an ask returns it; a tell just counts as handled)."""
        if self.outcome:
            raise RuntimeError(f"{type(self.msg).__name__} was already answered ({self.outcome})")
        fut = self.reply
        if fut is None:
            self.outcome = "ok"
        elif fut.done():
            self.outcome = "cancelled" if fut.cancelled() else "timeout"
        else:
            fut.set_result(value)
            self.outcome = "ok"

    def fail(self, exc: Exception) -> None:
        """Answer with an error (an ask raises it; a tell's error is logged and goes to
        `Actor.on_failure`)."""
        self.settle_error(exc, "error")

    def settle_error(self, exc: BaseException, outcome: str) -> None:
        if self.outcome:
            raise RuntimeError(f"{type(self.msg).__name__} was already answered ({self.outcome})")
        self.error = exc
        fut = self.reply
        if fut is None:
            self.outcome = outcome
        elif fut.done():
            self.outcome = "cancelled" if fut.cancelled() else "timeout"
        else:
            fut.set_exception(exc)
            self.outcome = outcome


class Mailbox(Generic[T]):
    """A bounded FIFO with exactly one consumer (the actor's loop).

    Not an `asyncio.Queue`: the loop needs to be woken without an item (to stop or
    passivate), to take a whole batch at once, and to be emptied on stop; one waiter
    future instead of Queue's getter/putter deques also keeps the hot path short.
    Producers never wait: `offer` answers False when full and the caller raises MailboxFull.
    """

    __slots__ = ("_items", "_waiter", "capacity")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"mailbox capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._items: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, item: T) -> bool:
        items = self._items
        if len(items) >= self.capacity:
            return False
        items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        return True

    def wake(self) -> None:
        """Resolve the pending `waiter()` even though nothing arrived."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def waiter(self) -> asyncio.Future[None]:
        """A future that the next `offer()` or `wake()` resolves: the consumer awaits it
        when the mailbox is empty. (A plain method, not a coroutine: one frame less per
        message on the hot path.)"""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        return waiter

    def pop(self) -> T:
        return self._items.popleft()

    def take(self, limit: int) -> list[T]:
        items = self._items
        return [items.popleft() for _ in range(min(limit, len(items)))]

    def drain(self) -> list[T]:
        out = list(self._items)
        self._items.clear()
        return out
