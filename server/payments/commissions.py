"""The distributor commission hooks of a paid and of a refunded order (issue 13 fills them in).

`record_commission` runs inside the settlement transaction. Until distributors exist
it writes nothing; then it will insert one `commissions` row (unique per order) when
the buyer's referrer is an approved distributor. `reverse_commission` runs inside a
refund's transaction (once per refund) and will reverse that order's commission in
proportion to the amount refunded.
"""

from __future__ import annotations

from server.db import Conn
from server.payments.orders import Order


async def record_commission(tx: Conn, order: Order) -> None:
    """No distributors yet: nothing to record."""
    del tx, order


async def reverse_commission(tx: Conn, order: Order, refund_no: str, amount_fen: int) -> None:
    """No distributors yet: nothing to reverse."""
    del tx, order, refund_no, amount_fen
