"""The exceptions of the actor runtime.

All of them are `AppError`s with code BUSY, so a request that meets one gets a 503 with
Retry-After from the error middleware: each means "this process cannot serve that now,
try again shortly", never "your request was wrong". Only `MailboxFull` is a `Busy`
(refused at once, nothing queued: safe to retry); `AskTimeout` is not (see there).
"""

from __future__ import annotations

from server.errors import AppError, Busy, ErrorCode


class ActorStopped(AppError):
    """The actor stopped (shutdown, or it gave up after a crash loop) before it answered.

    Raised by `tell`/`ask` on a stopped actor, and set on every ask still pending when an
    actor stops, so no caller ever hangs on a dead actor.
    """

    def __init__(self, actor: str, message: str | None = None) -> None:
        super().__init__(ErrorCode.BUSY, message or f"Actor {actor} stopped", retry_after=1)
        self.actor = actor


class SystemClosed(ActorStopped):
    """The actor system is shutting down: no new message is accepted."""

    def __init__(self, actor: str = "system") -> None:
        super().__init__(actor, "Actor system is shutting down")


class MailboxFull(Busy):
    """`tell`/`ask` found the actor's bounded mailbox full; nothing was queued."""

    def __init__(self, actor: str, capacity: int) -> None:
        super().__init__(f"Mailbox of {actor} is full ({capacity} messages)", retry_after=1)
        self.actor = actor
        self.capacity = capacity


class AskTimeout(AppError):
    """No reply came within the ask's timeout.

    Over HTTP it is a 503 BUSY with Retry-After, like the others: an actor that cannot
    answer in time is overloaded or stuck. It is deliberately neither a `Busy` nor a
    `TimeoutError`: nothing refused the message (it may still run later, and that late
    reply is dropped), so a retry loop for full mailboxes must not repeat it, and a
    deadline around larger work (a task's TASK_TIMEOUT) must not be mistaken for it.
    """

    def __init__(self, actor: str, message_type: str, timeout: float) -> None:
        super().__init__(
            ErrorCode.BUSY, f"{message_type} to {actor} got no reply within {timeout:g}s", retry_after=1
        )
        self.actor = actor
        self.message_type = message_type
        self.timeout = timeout


__all__ = ["ActorStopped", "AskTimeout", "MailboxFull", "SystemClosed"]
