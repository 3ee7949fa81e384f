"""Credits: the one entry point to a user's credits.

Every change goes through that user's UserActor (actors/user.py), which serialises
and group-commits it to MySQL (server/credits/ledger.py); reads that need no
ordering go to MySQL directly. Other capabilities (tasks, payments, the admin
routes) call these methods and never address the actor themselves.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence

from loguru import logger

from actors.runtime import ActorRef, ActorSystem
from actors.user import UserActor
from server import figures
from server.credits.ledger import (
    Cancel,
    Confirm,
    Effect,
    EffectOutcome,
    Grant,
    GrantKind,
    QuotaOp,
    QuotaState,
    Read,
    Reservation,
    Reserve,
    Snapshot,
    WithEffect,
)
from server.db import Database, Row
from server.errors import AppError, ErrorCode
from server.figures import ReservationFigures
from server.hub.events import Event, EventHub
from server.metrics import Metrics
from server.timing import utcnow

# QuotaState (a balance) and ReservationFigures (the ops dashboard's) are the answers' types.
__all__ = ["EXPIRED_REASON", "SWEEP_BATCH", "Credits", "LiveCheck", "QuotaState", "ReservationFigures"]

EXPIRED_REASON = "expired: no live process held the task"
SWEEP_BATCH = 500

# task ids -> those a live process holds (the tasks' leases), for the sweeper.
LiveCheck = Callable[[Sequence[str]], Awaitable[set[str]]]


class Credits:
    """reserve → confirm | cancel around every task, grants, balances, the ledger."""

    def __init__(
        self, system: ActorSystem, db: Database, hub: EventHub, metrics: Metrics, live: LiveCheck
    ) -> None:
        """Registers the UserActor kind on `system`; `live` tells the sweeper which
        reservations' tasks a live process still holds (the tasks' leases)."""
        system.register(UserActor, lambda: UserActor(db, hub))
        self.system = system
        self.db = db
        self.metrics = metrics
        self.live = live

    # ------------------------------------------------------------ the saga

    async def reserve(self, user_id: int, task_id: str, amount: int, ttl: float) -> Reservation:
        """Hold `amount` credits for `task_id`; QUOTA_INSUFFICIENT when fewer are available.
        A repeat for the same task answers the same reservation."""
        return await self._user(user_id).ask(Reserve(task_id, amount, ttl=ttl))

    async def confirm(self, user_id: int, task_id: str) -> Reservation:
        """Charge a reservation; CONFLICT when it was cancelled first."""
        return await self._user(user_id).ask(Confirm(task_id))

    async def cancel(self, user_id: int, task_id: str, reason: str) -> Reservation:
        """Return a reservation's credits; CONFLICT when it was confirmed first."""
        return await self._user(user_id).ask(Cancel(task_id, reason[:200]))

    # ------------------------------------------------------------ grants and reads

    async def grant(
        self,
        user_id: int,
        amount: int,
        kind: GrantKind = "grant",
        *,
        ref: str | None = None,
        reason: str | None = None,
        order_no: str | None = None,
    ) -> QuotaState:
        """Add (or, for `refund`/`adjust`, remove) credits; a `ref` is applied once."""
        return await self._user(user_id).ask(Grant(amount, kind, ref=ref, reason=reason, order_no=order_no))

    async def adjust(self, user_id: int, amount: int, reason: str, *, key: str | None = None) -> QuotaState:
        """Add or remove credits by hand (ledger kind `adjust`); QUOTA_INSUFFICIENT below
        zero available. With an idempotency `key` (scoped by the caller, e.g. the admin's
        id and its Idempotency-Key) it is applied once: a repeat answers the balance as it
        is, and the key sent again with another user, amount or reason is
        IDEMPOTENCY_CONFLICT with nothing written. A refused adjustment writes nothing, so
        its key stays free. The key is the grant's `ref` (hashed): the ledger's unique
        (kind, ref) decides between racing repeats on every instance."""
        if key is None:
            return await self.grant(user_id, amount, "adjust", reason=reason)
        ref = "key:" + hashlib.sha256(key.encode()).hexdigest()
        asked = (user_id, amount, reason)
        done = await self._adjustment(ref)
        if done is None:
            state = await self.grant(user_id, amount, "adjust", ref=ref, reason=reason)
            if await self._adjustment(ref) == asked:  # this one, or a repeat that won the race
                return state
        elif done == asked:
            return await self.balance(user_id)
        raise AppError(ErrorCode.IDEMPOTENCY_CONFLICT, "This Idempotency-Key was used for another adjustment")

    async def _adjustment(self, ref: str) -> tuple[int, int, str] | None:
        """(user id, amount, reason) of the adjustment recorded under `ref`, if any."""
        row = await self.db.fetchone(
            "SELECT user_id, balance_delta, reason FROM quota_ledger WHERE kind = 'adjust' AND ref = %s", ref
        )
        return None if row is None else (int(row["user_id"]), int(row["balance_delta"]), str(row["reason"]))

    async def apply(
        self,
        user_id: int,
        effect: Effect,
        *,
        grant_refs: tuple[tuple[str, str], ...] = (),
        reads: tuple[Read, ...] = (),
        announce: Callable[[], Sequence[Event]] | None = None,
    ) -> EffectOutcome:
        """Run another capability's SQL in this user's credit transaction (the account row
        locked first), then the grant it answers; both commit or neither. `grant_refs`,
        `reads` and `announce`: see WithEffect (how a paid order credits its buyer)."""
        op = WithEffect(effect, grant_refs=grant_refs, reads=reads, announce=announce)
        return await self._user(user_id).ask(op)

    async def balance(self, user_id: int) -> QuotaState:
        return await self._user(user_id).ask(Snapshot())

    async def ledger(self, user_id: int, before: int | None, limit: int) -> list[Row]:
        """The user's ledger rows, newest first, with ids below `before`."""
        return await self.db.fetchall(
            "SELECT id, kind, balance_delta, reserved_delta, balance_after, reserved_after, task_id, "
            "order_no, reason, created_at FROM quota_ledger WHERE user_id = %s AND id < %s "
            "ORDER BY id DESC LIMIT %s",
            user_id,
            before if before is not None else 2**63 - 1,
            limit,
        )

    async def reservation_figures(self) -> ReservationFigures:
        """Open reservations of every user: how many, the credits they hold, how many are
        past expiry (the ops dashboard)."""
        return await figures.reservations(self.db)

    # ------------------------------------------------------------ the sweeper

    async def sweep_expired(self) -> int:
        """Cancel reservations past their expiry whose task no live process holds; the
        cron job runs it every minute, once per cluster. Returns how many it cancelled."""
        now = utcnow()
        rows = await self.db.fetchall(
            "SELECT task_id, user_id FROM quota_transactions "
            "WHERE phase = 'reserved' AND expires_at < %s ORDER BY expires_at LIMIT %s",
            now,
            SWEEP_BATCH,
        )
        held = await self.live([str(r["task_id"]) for r in rows])
        by_user: dict[int, list[str]] = defaultdict(list)
        for r in rows:
            if str(r["task_id"]) not in held:
                by_user[int(r["user_id"])].append(str(r["task_id"]))
        asks = [
            self._user(user_id).ask(Cancel(task_id, EXPIRED_REASON, expired_before=now))
            for user_id, task_ids in by_user.items()
            for task_id in task_ids
        ]
        cancelled = 0
        for outcome in await asyncio.gather(*asks, return_exceptions=True):
            if isinstance(outcome, Reservation):
                cancelled += outcome.changed
            elif isinstance(outcome, BaseException):
                logger.warning("sweeper could not cancel a reservation: {}", outcome)
        self.metrics.credits_swept.inc(cancelled)
        return cancelled

    def _user(self, user_id: int) -> ActorRef[QuotaOp]:
        return self.system.ref(UserActor, user_id)
