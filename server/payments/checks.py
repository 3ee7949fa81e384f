"""`run.py check-orders`: paid orders against the credit ledger."""

from __future__ import annotations

from server.db import Database


async def check_orders(db: Database) -> tuple[int, list[str]]:
    """(orders checked, problems): a paid order granting credits needs exactly one `grant`
    with its number (none when its product grants no credits), and every grant with an
    order number needs a paid order."""
    rows = await db.fetchall(
        "SELECT o.order_no, o.credits, COUNT(l.id) AS grants FROM orders o "
        "LEFT JOIN quota_ledger l ON l.kind = 'grant' AND l.order_no = o.order_no "
        "WHERE o.status IN ('paid', 'partially_refunded', 'refunded') GROUP BY o.order_no, o.credits"
    )
    problems = [
        f"order {r['order_no']}: paid with {r['grants']} grant(s), expected {1 if r['credits'] else 0}"
        for r in rows
        if int(r["grants"]) != (1 if int(r["credits"]) else 0)
    ]
    orphans = await db.fetchall(
        "SELECT l.id, l.order_no, o.status FROM quota_ledger l LEFT JOIN orders o ON o.order_no = l.order_no "
        "WHERE l.kind = 'grant' AND l.order_no IS NOT NULL "
        "AND (o.order_no IS NULL OR o.status NOT IN ('paid', 'partially_refunded', 'refunded'))"
    )
    problems += [
        f"ledger {r['id']}: grant for order {r['order_no']}, which is {r['status'] or 'missing'}"
        for r in orphans
    ]
    return len(rows), problems
