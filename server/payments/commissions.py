"""Distributor commissions (issue 13): recorded when a referred buyer's order is paid,
reversed or adjusted when it is refunded, settled by a cron job.

    pending ──▶ settled    COMMISSION_SETTLE_DAYS after payment, no full refund meanwhile
        └────▶ reversed   the order was refunded in full inside that window

`record_commission` runs inside the settlement transaction, which runs once per order
(the order's pending → paid move), and inserts at most one row per order (unique
order_no + ref ''): the buyer's referrer must be an approved distributor; the amount is
`amount_fen × rate` (the distributor's own rate, else DISTRIBUTOR_COMMISSION_RATE),
rounded half-even to whole fen. `reverse_commission` runs inside a refund's transaction
(once per refund): inside the window a partial refund lowers the pending amount to the
rate of what is still paid, a full one reverses it; after settlement it records a
negative adjustment (kind 'adjustment', ref = the refund number, status settled), never
taking back more than was earned. Amounts are integer fen throughout.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from decimal import ROUND_HALF_EVEN, Decimal

from server.config import DistributorSettings
from server.db import Conn, Database
from server.payments.orders import Order
from server.statemachine import IllegalTransition, StateMachine

MACHINE = StateMachine(
    entity="commission",
    table="commissions",
    keys=("id",),
    transitions=frozenset({("pending", "settled"), ("pending", "reversed")}),
)
SETTLE_BATCH = 500


def commission_fen(amount_fen: int, rate: Decimal) -> int:
    """`amount_fen × rate` in whole fen, rounded half-even."""
    return int((Decimal(amount_fen) * rate).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


REFERRER_SQL = (
    "SELECT d.user_id, d.commission_rate FROM users u "
    "JOIN distributors d ON d.user_id = u.referrer_id AND d.status = 'approved' WHERE u.id = %s"
)


async def record_commission(
    tx: Conn, order: Order, terms: DistributorSettings | None = None, *, along: Sequence[str] = ()
) -> None:
    """One pending commission for the buyer's referrer if it is an approved distributor.

    `along`: other statements of the caller's (`Conn.format`ted) sent in the same round
    trip, after the referrer lookup; one that fails raises here."""
    terms = terms or DistributorSettings()
    row = await tx.fetchone("; ".join([tx.format(REFERRER_SQL, order.user_id), *along]))
    if row is None:
        return
    rate = Decimal(row["commission_rate"]) if row["commission_rate"] is not None else terms.commission_rate
    amount = commission_fen(order.amount_fen, rate)
    if amount <= 0:
        return
    paid = order.paid_at or _utcnow()
    await tx.execute(
        "INSERT IGNORE INTO commissions (order_no, ref, kind, distributor_id, buyer_id, amount_fen, "
        "rate, order_fen, status, settles_at) "
        "VALUES (%s, '', 'commission', %s, %s, %s, %s, %s, 'pending', %s)",
        order.order_no, int(row["user_id"]), order.user_id, amount, rate, order.amount_fen,
        paid + dt.timedelta(days=terms.settle_days),
    )  # fmt: skip


async def reverse_commission(tx: Conn, order: Order, refund_no: str, amount_fen: int) -> None:
    """Lower, reverse or adjust the order's commission for one refund (see the module)."""
    row = await tx.fetchone(
        "SELECT id, status, amount_fen, rate, order_fen, distributor_id, buyer_id FROM commissions "
        "WHERE order_no = %s AND ref = '' FOR UPDATE",
        order.order_no,
    )
    if row is None or row["status"] == "reversed":
        return
    rate = Decimal(row["rate"])
    refunded = order.refunded_fen + amount_fen  # `order` is as it was before this refund
    if row["status"] == "pending":
        if refunded >= order.amount_fen:
            await MACHINE.apply(tx, (int(row["id"]),), "reversed")
        else:
            await tx.execute(
                "UPDATE commissions SET amount_fen = %s WHERE id = %s AND status = 'pending'",
                commission_fen(order.amount_fen - refunded, rate),
                int(row["id"]),
            )
        return
    taken = await tx.fetchval(
        "SELECT COALESCE(SUM(amount_fen), 0) FROM commissions WHERE order_no = %s AND kind = 'adjustment'",
        order.order_no,
    )
    back = min(commission_fen(amount_fen, rate), int(row["amount_fen"]) + int(taken or 0))
    if back <= 0:
        return
    now = _utcnow()
    await tx.execute(
        "INSERT IGNORE INTO commissions (order_no, ref, kind, distributor_id, buyer_id, amount_fen, "
        "rate, order_fen, status, settles_at, settled_at) "
        "VALUES (%s, %s, 'adjustment', %s, %s, %s, %s, %s, 'settled', %s, %s)",
        order.order_no, refund_no, int(row["distributor_id"]), int(row["buyer_id"]), -back, rate,
        order.amount_fen, now, now,
    )  # fmt: skip


async def settle_due(db: Database, now: dt.datetime | None = None) -> int:
    """Settle every pending commission whose window has passed; the number settled.
    Racing instances each move a row at most once (the state machine's conditional UPDATE)."""
    now = now or _utcnow()
    settled = 0
    after = 0
    while True:
        ids = await db.fetchall(
            "SELECT id FROM commissions WHERE status = 'pending' AND settles_at <= %s AND id > %s "
            "ORDER BY id LIMIT %s",
            now, after, SETTLE_BATCH,
        )  # fmt: skip
        if not ids:
            return settled
        for r in ids:
            try:
                if await MACHINE.apply(db, (int(r["id"]),), "settled", {"settled_at": now}):
                    settled += 1
            except IllegalTransition:  # reversed meanwhile by a refund: it stays so
                pass
        after = int(ids[-1]["id"])
