"""The refund state machine: the legal transitions in one table, one function that applies one.

    processing ──▶ succeeded      (the provider refunded: order, clawback, membership, commission)
        │
        └────────▶ failed         (the provider refused: nothing else changes)

A refund row is written `processing` before the provider is asked (so its number is
reserved and the amount counted against what is left); it then moves once, by a
conditional UPDATE, so any number of racing answers, queries and notifications apply it
once. The order's own move (paid → partially_refunded → refunded) is orders.py's.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Literal

from server.db import Conn, Row
from server.payments.orders import is_order_no
from server.statemachine import StateMachine
from server.timing import rfc3339

Status = Literal["processing", "succeeded", "failed"]

#: The only moves a refund makes (server/statemachine.py applies them).
MACHINE = StateMachine(
    entity="refund",
    table="refunds",
    keys=("refund_no",),
    transitions=frozenset({("processing", "succeeded"), ("processing", "failed")}),
)

REFUND_COLUMNS = (
    "refund_no, order_no, user_id, amount_fen, status, reason, idempotency_key, request_hash, "
    "provider_refund_id, clawback_credits, clawback_shortfall, created_by, created_at, finished_at"
)


@dataclass(frozen=True, slots=True)
class Refund:
    refund_no: str
    order_no: str
    user_id: int
    amount_fen: int
    status: Status
    reason: str
    request_hash: str
    provider_refund_id: str | None
    clawback_credits: int
    clawback_shortfall: int
    created_at: dt.datetime
    finished_at: dt.datetime | None

    @classmethod
    def of(cls, row: Row) -> Refund:
        return cls(
            refund_no=str(row["refund_no"]),
            order_no=str(row["order_no"]),
            user_id=int(row["user_id"]),
            amount_fen=int(row["amount_fen"]),
            status=row["status"],
            reason=str(row["reason"]),
            request_hash=str(row["request_hash"]),
            provider_refund_id=row["provider_refund_id"],
            clawback_credits=int(row["clawback_credits"]),
            clawback_shortfall=int(row["clawback_shortfall"]),
            created_at=row["created_at"],
            finished_at=row["finished_at"],
        )

    def public(self) -> dict[str, Any]:
        return {
            "refund_no": self.refund_no,
            "order_no": self.order_no,
            "amount_fen": self.amount_fen,
            "status": self.status,
            "reason": self.reason,
            "clawback_credits": self.clawback_credits,
            "clawback_shortfall": self.clawback_shortfall,
            "created_at": rfc3339(self.created_at),
            "finished_at": rfc3339(self.finished_at),
        }


async def load(conn: Conn, refund_no: str, *, lock: bool = False) -> Refund | None:
    if not is_order_no(refund_no):  # refund numbers are made like order numbers
        return None
    row = await conn.fetchone(
        f"SELECT {REFUND_COLUMNS} FROM refunds WHERE refund_no = %s" + (" FOR UPDATE" if lock else ""),
        refund_no,
    )
    return None if row is None else Refund.of(row)


async def transition(tx: Conn, refund_no: str, to: Status, **sets: Any) -> bool:
    """Move the refund to `to` (setting the columns in `sets` too) if it may go there.

    True: this call moved it. False: it was already `to` (a replay). Raises
    IllegalTransition for any other status, and NotFound for an unknown refund."""
    return await MACHINE.apply(tx, (refund_no,), to, sets)
