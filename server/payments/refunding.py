"""Refunds: asked by an operator, made by the provider, applied once through the buyer's actor.

1. `refund()` validates and, in one transaction holding the order row, counts what is
   left (amount − refunded − refunds still processing) and writes the refund row
   `processing`; any refusal before that (unpaid order: 409, too much: 422) writes nothing.
2. The provider is asked (idempotent per refund number). Alipay answers at once; WeChat
   Pay usually says PROCESSING and tells us later (refund notification, or our query from
   the cron job). A definite refusal makes the refund `failed` and changes nothing else; an
   unknown outcome (timeout) leaves it `processing` for the cron job to query.
3. Success is `_succeed()`: one transaction run by the buyer's UserActor
   (Credits.apply: quota row locked first, then the order row): the refund
   `processing → succeeded` (a conditional UPDATE: applied once however many answers,
   queries and notifications race), the order `paid|partially_refunded →
   partially_refunded|refunded` with `refunded_fen`, the clawback of credits in proportion
   (ledger kind `refund`, ref = refund number; never below zero available, the rest
   recorded as `clawback_shortfall`), the membership days of a fully refunded order taken
   back, and the commission reversal hook.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

from loguru import logger

from server.auth.users import Profiles
from server.credits.facade import Credits
from server.credits.ledger import Grant, QuotaState
from server.db import Conn, Database, Row, is_duplicate
from server.errors import AppError, Conflict, ErrorCode, NotFound, validation_failed
from server.hub.events import EventHub
from server.metrics import Metrics
from server.payments import orders, refunds
from server.payments.commissions import reverse_commission
from server.payments.orders import Order
from server.payments.providers import NotificationRefused, Provider, RefundRequest, RefundResult
from server.payments.refunds import Refund
from server.statemachine import IllegalTransition
from server.timing import utcnow

REFUNDABLE = ("paid", "partially_refunded")
STALE_AFTER = dt.timedelta(seconds=30)  # the cron job queries refunds processing this long
STALE_BATCH = 200


class _KeyTaken(Exception):
    """A racing request with the same Idempotency-Key inserted its refund first."""


def refund_hash(amount_fen: int | None, reason: str) -> str:
    raw = json.dumps({"amount_fen": amount_fen, "reason": reason}, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()


def clawback_due(credits: int, amount_fen: int, refunded_fen: int) -> int:
    """Credits to have taken back once `refunded_fen` of `amount_fen` is refunded: in
    proportion, rounded half up (so partial refunds add up to all credits at the end)."""
    return (2 * credits * refunded_fen + amount_fen) // (2 * amount_fen)


class Refunds:
    def __init__(
        self,
        *,
        db: Database,
        credits: Credits,
        hub: EventHub,
        profiles: Profiles,
        metrics: Metrics,
        provider_for: Callable[[str], Provider | None],
    ) -> None:
        self.db = db
        self.credits = credits
        self.hub = hub
        self.profiles = profiles
        self.metrics = metrics
        self.provider_for = provider_for

    async def load(self, refund_no: str) -> Refund | None:
        async with self.db.connection() as conn:
            return await refunds.load(conn, refund_no)

    async def of_order(self, order_no: str) -> list[Refund]:
        rows = await self.db.fetchall(
            f"SELECT {refunds.REFUND_COLUMNS} FROM refunds WHERE order_no = %s "
            "ORDER BY created_at, refund_no",
            order_no,
        )
        return [Refund.of(r) for r in rows]

    async def latest(self, limit: int) -> list[Refund]:
        rows = await self.db.fetchall(
            f"SELECT {refunds.REFUND_COLUMNS} FROM refunds ORDER BY created_at DESC, refund_no DESC LIMIT %s",
            limit,
        )
        return [Refund.of(r) for r in rows]

    async def _by_key(self, order_no: str, key: str, digest: str) -> Refund | None:
        no = await self.db.fetchval(
            "SELECT refund_no FROM refunds WHERE order_no = %s AND idempotency_key = %s", order_no, key
        )
        if no is None:
            return None
        refund = await self.load(str(no))
        assert refund is not None
        if refund.request_hash != digest:
            raise AppError(
                ErrorCode.IDEMPOTENCY_CONFLICT, "This Idempotency-Key was used with a different request body"
            )
        return refund

    # ------------------------------------------------------------ asking

    async def refund(
        self, admin_id: int, order_no: str, key: str, amount_fen: int | None, reason: str
    ) -> tuple[Refund, bool]:
        """(refund, created). A repeat of a key with the same body answers the first refund."""
        digest = refund_hash(amount_fen, reason)
        async with self.db.connection() as conn:
            order = await orders.load(conn, order_no)
        if order is None:
            raise NotFound(f"No order {order_no}")
        found = await self._by_key(order_no, key, digest)
        if found is not None:
            return found, False
        provider = self.provider_for(order.channel)
        if provider is None:
            raise Conflict(f"{order.channel} is not configured on this server: its orders cannot be refunded")
        refund_no = orders.new_order_no()
        try:
            amount = await self._open(admin_id, order_no, refund_no, key, digest, amount_fen, reason)
        except _KeyTaken:
            found = await self._by_key(order_no, key, digest)  # a racing request with the key won
            assert found is not None
            return found, False
        self.metrics.refunds.labels(order.channel, "processing").inc()
        logger.info("refund {} of {} fen asked for order {}", refund_no, amount, order_no)
        request = RefundRequest(order_no, refund_no, amount, order.amount_fen, reason)
        try:
            result = await provider.refund(request)
            await self.apply(refund_no, result, "refund")
        except AppError as exc:  # outcome unknown: stays processing, the cron job queries it
            logger.warning("refund {}: {}; left processing", refund_no, exc.message)
        except NotificationRefused as exc:  # an answer that is not about this refund
            logger.error("refund {}: provider answer refused ({}); left processing", refund_no, exc.reason)
        refund = await self.load(refund_no)
        assert refund is not None
        return refund, True

    async def _open(
        self,
        admin_id: int,
        order_no: str,
        refund_no: str,
        key: str,
        digest: str,
        amount_fen: int | None,
        reason: str,
    ) -> int:
        """Write the `processing` row, holding the order row; answer the amount."""
        async with self.db.transaction() as tx:
            order = await orders.load(tx, order_no, lock=True)
            assert order is not None
            if order.status not in REFUNDABLE:
                raise IllegalTransition("order", order_no, order.status, "refunded")
            in_flight = await tx.fetchval(
                "SELECT COALESCE(SUM(amount_fen), 0) FROM refunds "
                "WHERE order_no = %s AND status = 'processing'",
                order_no,
            )
            left = order.amount_fen - order.refunded_fen - int(in_flight or 0)
            amount = left if amount_fen is None else amount_fen
            if amount <= 0 or amount > left:
                message = f"at most {left} fen is left to refund" if left > 0 else "nothing is left to refund"
                raise validation_failed([{"field": "amount_fen", "message": message}])
            try:
                await tx.execute(
                    "INSERT INTO refunds (refund_no, order_no, user_id, amount_fen, status, reason, "
                    "idempotency_key, request_hash, created_by, created_at) "
                    "VALUES (%s, %s, %s, %s, 'processing', %s, %s, %s, %s, %s)",
                    refund_no, order_no, order.user_id, amount, reason, key, digest, admin_id, utcnow(),
                )  # fmt: skip
            except Exception as exc:
                if is_duplicate(exc):
                    raise _KeyTaken from None
                raise
        return amount

    # ------------------------------------------------------------ answers

    def mismatch(self, refund: Refund, order: Order, result: RefundResult) -> str | None:
        """Why a provider's refund answer does not belong to this refund, or None."""
        provider = self.provider_for(order.channel)
        mchid = provider.expected_ids.get("mchid") if provider is not None else None
        if result.refund_no != refund.refund_no:
            return "refund number differs"
        if result.order_no is not None and result.order_no != refund.order_no:
            return "order number differs"
        if result.amount_fen is not None and result.amount_fen != refund.amount_fen:
            return f"amount {result.amount_fen} differs from the refund's {refund.amount_fen}"
        if mchid is not None and result.mchid is not None and result.mchid != mchid:
            return f"mchid {result.mchid[:40]!r} is not ours"
        return None

    async def apply(self, refund_no: str, result: RefundResult, source: str) -> bool:
        """Apply a provider's answer about a refund. True: this call changed it."""
        refund = await self.load(refund_no)
        if refund is None:
            raise NotificationRefused("unknown refund")
        async with self.db.connection() as conn:
            order = await orders.load(conn, refund.order_no)
        assert order is not None
        why = self.mismatch(refund, order, result)
        if why is not None:
            raise NotificationRefused(why, verified=True, order_no=refund.order_no)
        if result.status == "processing" or refund.status != "processing":
            return False
        if result.status == "failed":
            async with self.db.transaction() as tx:
                moved = await refunds.transition(
                    tx,
                    refund_no,
                    "failed",
                    finished_at=utcnow(),
                    provider_refund_id=result.provider_refund_id,
                )
            if moved:
                self.metrics.refunds.labels(order.channel, "failed").inc()
                logger.warning(
                    "refund {} failed at the provider ({}): {}", refund_no, source, result.raw_state
                )
            return moved
        return await self._succeed(refund, order, result.provider_refund_id, source)

    async def _succeed(
        self, refund: Refund, order: Order, provider_refund_id: str | None, source: str
    ) -> bool:
        now = utcnow()
        taken_shortfall: list[int] = []

        async def effect(
            tx: Conn, state: QuotaState, _: Sequence[Sequence[Row]]
        ) -> Grant | Literal[False] | None:
            locked = await orders.load(tx, order.order_no, lock=True)  # after the quota row
            assert locked is not None
            if not await refunds.transition(
                tx, refund.refund_no, "succeeded", finished_at=now, provider_refund_id=provider_refund_id
            ):
                return False
            refunded = locked.refunded_fen + refund.amount_fen
            full = refunded >= locked.amount_fen
            await orders.transition(
                tx, order.order_no, "refunded" if full else "partially_refunded", refunded_fen=refunded
            )
            before = await tx.fetchval(
                "SELECT COALESCE(SUM(clawback_credits + clawback_shortfall), 0) FROM refunds "
                "WHERE order_no = %s AND status = 'succeeded'",
                order.order_no,
            )
            want = max(0, clawback_due(locked.credits, locked.amount_fen, refunded) - int(before or 0))
            taken = min(want, max(0, state.available))
            await tx.execute(
                "UPDATE refunds SET clawback_credits = %s, clawback_shortfall = %s WHERE refund_no = %s",
                taken, want - taken, refund.refund_no,
            )  # fmt: skip
            if full and locked.membership_days:
                await tx.execute(
                    "UPDATE users SET membership_expires_at = "
                    "DATE_SUB(membership_expires_at, INTERVAL %s DAY) "
                    "WHERE id = %s AND membership_expires_at IS NOT NULL",
                    locked.membership_days, locked.user_id,
                )  # fmt: skip
            await reverse_commission(tx, locked, refund.refund_no, refund.amount_fen)
            taken_shortfall[:] = [taken, want - taken]
            if not taken:
                return None
            reason = f"refund {refund.refund_no}"
            return Grant(-taken, "refund", ref=refund.refund_no, reason=reason, order_no=order.order_no)

        outcome = await self.credits.apply(order.user_id, effect)
        if not outcome.applied:
            return False
        taken, shortfall = taken_shortfall
        self.metrics.refunds.labels(order.channel, "succeeded").inc()
        self.metrics.refunded_fen.labels(order.channel).inc(refund.amount_fen)
        self.metrics.clawback_credits.labels("taken").inc(taken)
        self.metrics.clawback_credits.labels("shortfall").inc(shortfall)
        logger.info(
            "refund {} of order {} succeeded ({}): {} credits taken back, {} short",
            refund.refund_no, order.order_no, source, taken, shortfall,
        )  # fmt: skip
        if order.membership_days:
            await self.profiles.invalidate(order.user_id)
        async with self.db.connection() as conn:
            reloaded = await orders.load(conn, order.order_no)
        assert reloaded is not None
        await self.hub.publish(order.user_id, "order.refunded", reloaded.public())
        return True

    # ------------------------------------------------------------ notifications and the cron job

    async def wechat_notification(
        self, provider: Provider, headers: Mapping[str, str], body: bytes, now: float
    ) -> tuple[bool, str | None, str | None]:
        """(applied now, order number, event id) for a WeChat Pay refund notification;
        raises NotificationRefused."""
        result, event_id = provider.verify_refund_notification(headers, body, now)
        if result.status == "processing":
            raise NotificationRefused(f"not a refund outcome: {result.raw_state}", verified=True)
        try:
            applied = await self.apply(result.refund_no, result, "notify")
        except NotificationRefused as exc:
            exc.verified = True
            exc.order_no = exc.order_no or result.order_no
            raise
        return bool(applied), result.order_no, event_id

    async def check_processing(self) -> int:
        """Query every refund processing for 30 s or more; apply what the provider says."""
        rows = await self.db.fetchall(
            f"SELECT {refunds.REFUND_COLUMNS} FROM refunds WHERE status = 'processing' AND created_at <= %s "
            "ORDER BY created_at LIMIT %s",
            utcnow() - STALE_AFTER,
            STALE_BATCH,
        )
        done = 0
        for refund in (Refund.of(r) for r in rows):
            async with self.db.connection() as conn:
                order = await orders.load(conn, refund.order_no)
            provider = self.provider_for(order.channel) if order is not None else None
            if provider is None:
                continue
            try:
                result = await provider.query_refund(refund.order_no, refund.refund_no)
                done += await self.apply(refund.refund_no, result, "cron")
            except (AppError, NotificationRefused) as exc:
                logger.warning("processing refund {}: {}", refund.refund_no, exc)
        return done
