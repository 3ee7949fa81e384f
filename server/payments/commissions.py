"""The distributor commission hook of a paid order (issue 13 fills it in).

`record_commission` runs inside the settlement transaction. Until distributors exist
it writes nothing; then it will insert one `commissions` row (unique per order) when
the buyer's referrer is an approved distributor.
"""

from __future__ import annotations

from server.db import Conn
from server.payments.orders import Order


async def record_commission(tx: Conn, order: Order) -> None:
    """No distributors yet: nothing to record."""
    del tx, order
