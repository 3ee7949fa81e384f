"""UserActor: one per active user, the only writer of that user's credits in this process.

Everything waiting in its mailbox (up to `batch_max`) is applied in ONE MySQL
transaction (server/quota.py: one row lock, one commit), then each sender gets
its own answer. A deadlock or lock-wait timeout retries the whole batch a bounded
number of times, then answers each with BUSY.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import ClassVar

from actors.runtime import Actor, Envelope
from server.credits.ledger import BatchResult, QuotaOp, apply_batch
from server.db import Database, is_duplicate, is_retryable
from server.errors import Busy
from server.hub.events import EventHub


class UserActor(Actor[QuotaOp]):
    """Serialises and group-commits Reserve / Confirm / Cancel / Grant / (Sized)GrantWithEffect / Snapshot."""

    mailbox_size: ClassVar[int] = 512
    batch_max: ClassVar[int] = 256
    passivate_after: ClassVar[float | None] = 300.0
    max_attempts: ClassVar[int] = 4

    def __init__(self, db: Database, hub: EventHub) -> None:
        self.db = db
        self.hub = hub

    @property
    def user_id(self) -> int:
        assert isinstance(self.key, int)
        return self.key

    async def _commit(self, ops: Sequence[QuotaOp]) -> BatchResult:
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
                await asyncio.sleep(0.01 * 2**attempt * (0.5 + random.random()))
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
        for env, outcome in zip(batch, result.outcomes, strict=True):
            if isinstance(outcome, Exception):
                env.fail(outcome)
            else:
                env.ok(outcome)
        if result.changed:
            state = result.state
            await self.hub.publish(
                self.user_id,
                "quota.changed",
                {"balance": state.balance, "reserved": state.reserved, "available": state.available},
            )
