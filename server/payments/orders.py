"""The order state machine: the legal transitions in one table, one function that applies one.

    pending ──▶ paid ──▶ partially_refunded ──▶ refunded
       │         ▲  └──────────────────────────────▲
       ▼         │
     closed ─────┘   (the money arrived after all: a verified payment wins over a close)

Every change is a conditional UPDATE (`WHERE status IN (the legal sources)`), so of any
number of racing notifications, queries, closes and instances exactly one moves an order;
the others find it moved and get either "already there" or the exact IllegalTransition.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import threading
from dataclasses import dataclass
from typing import Any, Literal

from server.db import Conn, Row
from server.statemachine import StateMachine
from server.timing import rfc3339

Status = Literal["pending", "paid", "partially_refunded", "refunded", "closed"]

#: The only moves an order makes (server/statemachine.py applies them).
MACHINE = StateMachine(
    entity="order",
    table="orders",
    keys=("order_no",),
    transitions=frozenset(
        {
            ("pending", "paid"),
            ("closed", "paid"),
            ("pending", "closed"),
            ("paid", "partially_refunded"),
            ("paid", "refunded"),
            ("partially_refunded", "partially_refunded"),  # a second partial refund
            ("partially_refunded", "refunded"),
        }
    ),
)

#: Statuses in which the order's money has arrived.
PAID_STATUSES: frozenset[Status] = frozenset({"paid", "partially_refunded", "refunded"})

#: What an order or refund number from outside (a path, a cursor, a provider's notification)
#: must look like before it is looked up: WeChat Pay's rules for out_trade_no (Alipay's are
#: wider; ours are 32 hex digits). The columns are ASCII, and MySQL refuses to compare them
#: with other text (error 1267), so anything else is answered "no such order" unread.
_ORDER_NO = re.compile(r"[0-9A-Za-z_\-|*]{1,32}")


def is_order_no(value: str) -> bool:
    """Whether `value` can be an order (or refund) number at all: else none has it."""
    return _ORDER_NO.fullmatch(value) is not None


ORDER_COLUMNS = (
    "order_no, user_id, product_id, product_kind, credits, membership_days, channel, amount_fen, status, "
    "pay_params, idempotency_key, request_hash, provider_txn_id, paid_source, refunded_fen, created_at, "
    "expires_at, paid_at, closed_at"
)
#: What settling reads of an order: its terms, its status, and what `Order.public()` shows
#: once it is paid. The notification path reads only these: each column costs the MySQL
#: client a packet to parse, and the order read was the costliest statement of the path.
SETTLE_COLUMNS = (
    "order_no, user_id, product_id, product_kind, credits, membership_days, channel, amount_fen, status, "
    "refunded_fen, created_at, expires_at, paid_at"
)


def new_order_no(now: dt.datetime | None = None) -> str:
    """32 characters of [0-9a-f]: the UTC second (14 digits) and 72 random bits.

    Sortable by time for an operator, unguessable, and within both WeChat Pay's
    (6..32, [0-9A-Za-z_-|*]) and Alipay's (≤ 64) rules. `now`: UTC, naive or aware."""
    now = now or dt.datetime.now(dt.UTC)
    return now.strftime("%Y%m%d%H%M%S") + _random_hex(9)


#: The random part of order numbers: os.urandom bytes (`secrets`), drawn 4 KiB at a time
#: and each handed out once. Drawn per number, each was a system call, which lets go of
#: the GIL: with the payment SDK's threads busy, the event loop then waited for it back,
#: ~0.4 ms of every order (cProfile, bench/payments.py). A forked child drops the bytes
#: its parent drew (and the lock, which another thread may have held at the fork).
_ENTROPY_CHUNK = 4096
_entropy = bytearray()
_entropy_lock = threading.Lock()


def _random_hex(nbytes: int) -> str:
    with _entropy_lock:
        if len(_entropy) < nbytes:
            _entropy[:] = secrets.token_bytes(_ENTROPY_CHUNK)
        taken = _entropy[-nbytes:]
        del _entropy[-nbytes:]
    return taken.hex()


def _forget_entropy() -> None:
    global _entropy_lock
    _entropy_lock = threading.Lock()
    _entropy.clear()


os.register_at_fork(after_in_child=_forget_entropy)


@dataclass(frozen=True, slots=True)
class Order:
    order_no: str
    user_id: int
    product_id: str
    product_kind: str
    credits: int
    membership_days: int
    channel: str
    amount_fen: int
    status: Status
    pay_params: dict[str, Any] | None
    request_hash: str
    provider_txn_id: str | None
    refunded_fen: int
    created_at: dt.datetime
    expires_at: dt.datetime
    paid_at: dt.datetime | None

    @classmethod
    def of(cls, row: Row) -> Order:
        return cls(
            order_no=str(row["order_no"]),
            user_id=int(row["user_id"]),
            product_id=str(row["product_id"]),
            product_kind=str(row["product_kind"]),
            credits=int(row["credits"]),
            membership_days=int(row["membership_days"]),
            channel=str(row["channel"]),
            amount_fen=int(row["amount_fen"]),
            status=row["status"],
            pay_params=json.loads(row["pay_params"]) if row.get("pay_params") else None,
            request_hash=str(row.get("request_hash", "")),
            provider_txn_id=row.get("provider_txn_id"),
            refunded_fen=int(row["refunded_fen"]),
            created_at=row["created_at"],
            expires_at=row["expires_at"],
            paid_at=row["paid_at"],
        )

    def public(self) -> dict[str, Any]:
        return {
            "order_no": self.order_no,
            "product_id": self.product_id,
            "channel": self.channel,
            "amount_fen": self.amount_fen,
            "status": self.status,
            "pay_params": self.pay_params if self.status == "pending" else None,
            "paid_at": rfc3339(self.paid_at),
            "expires_at": rfc3339(self.expires_at),
            "refunded_fen": self.refunded_fen,
            "created_at": rfc3339(self.created_at),
        }


async def load(conn: Conn, order_no: str, *, lock: bool = False) -> Order | None:
    if not is_order_no(order_no):
        return None
    row = await conn.fetchone(
        f"SELECT {ORDER_COLUMNS} FROM orders WHERE order_no = %s" + (" FOR UPDATE" if lock else ""),
        order_no,
    )
    return None if row is None else Order.of(row)


async def load_for_settlement(conn: Conn, order_no: str) -> Order | None:
    """The order as settling needs it (SETTLE_COLUMNS): `pay_params` and `provider_txn_id`
    are None and `request_hash` is empty, whatever the row holds."""
    if not is_order_no(order_no):
        return None
    row = await conn.fetchone(f"SELECT {SETTLE_COLUMNS} FROM orders WHERE order_no = %s", order_no)
    return None if row is None else Order.of(row)


async def transition(tx: Conn, order_no: str, to: Status, **sets: Any) -> bool:
    """Move the order to `to` (setting the columns in `sets` too) if it may go there.

    True: this call moved it. False: it was already `to` and `to` is not a legal
    self-transition (a replay). Raises IllegalTransition for any other status, and
    NotFound for an unknown order."""
    return await MACHINE.apply(tx, (order_no,), to, sets)
