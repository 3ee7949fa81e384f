"""UserActor: one per active user, the only writer of that user's credits in this process.

Everything waiting in its mailbox (up to `batch_max`) is applied in ONE MySQL
transaction (server/credits/ledger.py: one row lock, one commit), then each sender gets
its own answer. A deadlock or lock-wait timeout retries the whole batch a bounded
number of times, then answers each with BUSY.

A batch of one Reserve, Confirm or Cancel (the usual case when many users each send
one operation at a time: nothing to share) takes `plan_single` instead: the actor
remembers the account row its last commit left and the reservations it holds, so the
operation is three conditional writes and a commit, with no read first. A miss (the
row or the reservation changed elsewhere) rolls back and takes the batch path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import ClassVar

from actors.runtime import Actor, Envelope
from server.credits.ledger import (
    AccountRow,
    BatchResult,
    Cancel,
    Confirm,
    QuotaOp,
    Reservation,
    Reserve,
    StaleAccount,
    WithEffect,
    apply_batch,
    plan_single,
)
from server.db import Database, is_duplicate, is_retryable
from server.errors import Busy
from server.hub.events import Event, EventHub
from server.timing import backoff_delay


class UserActor(Actor[QuotaOp]):
    """Serialises and group-commits Reserve / Confirm / Cancel / Grant / (Sized)GrantWithEffect / Snapshot."""

    mailbox_size: ClassVar[int] = 512
    batch_max: ClassVar[int] = 256
    passivate_after: ClassVar[float | None] = 300.0
    max_attempts: ClassVar[int] = 4
    #: Reservations remembered for the single-operation path (oldest forgotten first).
    held_max: ClassVar[int] = 1024

    def __init__(self, db: Database, hub: EventHub) -> None:
        self.db = db
        self.hub = hub
        self._row: AccountRow | None = None  # as the last commit left it; None: unknown
        self._held: dict[str, Reservation] = {}  # task id → reserved by a commit of ours

    @property
    def user_id(self) -> int:
        assert isinstance(self.key, int)
        return self.key

    async def _commit(self, ops: Sequence[QuotaOp]) -> BatchResult:
        row, self._row = self._row, None  # unknown until this commit succeeds
        result = None
        if len(ops) == 1 and row is not None:
            result = await self._commit_single(ops[0], row)
        if result is None:
            result = await self._commit_batch(ops)
        self._row = AccountRow(result.state.balance, result.state.reserved, result.version)
        for op, outcome in zip(ops, result.outcomes, strict=True):
            if isinstance(op, Reserve | Confirm | Cancel):
                self._held.pop(op.task_id, None)
                if isinstance(outcome, Reservation):
                    self._remember(outcome)
        return result

    def _remember(self, r: Reservation) -> None:
        if r.phase == "reserved" and r.user_id == self.user_id:
            if len(self._held) >= self.held_max:
                del self._held[next(iter(self._held))]
            self._held[r.task_id] = r

    async def _commit_single(self, op: QuotaOp, row: AccountRow) -> BatchResult | None:
        """`op` by `plan_single`, or None when the batch path must answer it."""
        held = self._held.get(op.task_id) if isinstance(op, Reserve | Confirm | Cancel) else None
        plan = plan_single(self.user_id, op, row, held)
        if plan is None:
            return None
        try:
            # Writes by primary or unique key only, so the session's isolation level
            # locks the same rows as READ COMMITTED: no SET TRANSACTION round trip.
            async with self.db.transaction() as tx:
                return await plan.apply(tx)
        except StaleAccount:
            return None
        except Exception as exc:
            if is_retryable(exc) or is_duplicate(exc):
                return None  # the batch path reads what won and retries with backoff
            raise

    async def _commit_batch(self, ops: Sequence[QuotaOp]) -> BatchResult:
        for attempt in range(1, self.max_attempts + 1):
            try:
                async with self.db.transaction("READ COMMITTED") as tx:
                    return await apply_batch(tx, self.user_id, ops)
            except Exception as exc:
                # A duplicate key means another process inserted the same task id or
                # grant ref first: the retry reads it and answers that operation alone.
                retryable = is_retryable(exc) or is_duplicate(exc)
                if not retryable or attempt == self.max_attempts:
                    if retryable:
                        raise Busy("Credits are busy for this user, retry shortly") from exc
                    raise
                self.log.warning("credit batch attempt {} hit {}; retrying", attempt, exc)
                await asyncio.sleep(backoff_delay(attempt, 0.01, 0.5))
        raise AssertionError("unreachable")

    async def receive_batch(self, batch: Sequence[Envelope[QuotaOp]]) -> None:
        try:
            result = await self._commit([env.msg for env in batch])
        except Exception as exc:
            if not isinstance(exc, Busy):
                self.log.opt(exception=True).error("credit batch of {} failed", len(batch))
            for env in batch:
                env.fail(exc)
            return
        events: list[Event] = []
        for env, outcome in zip(batch, result.outcomes, strict=True):
            if isinstance(outcome, Exception):
                env.fail(outcome)
                continue
            env.ok(outcome)
            op = env.msg
            if isinstance(op, WithEffect) and op.announce is not None and outcome.applied:
                events.extend(op.announce())
        if result.changed:
            state = result.state
            quota = {"balance": state.balance, "reserved": state.reserved, "available": state.available}
            events.insert(0, ("quota.changed", quota))
        # The batch's events in one script run: quota.changed, then what the effects announce.
        await self.hub.publish_many(self.user_id, events)
