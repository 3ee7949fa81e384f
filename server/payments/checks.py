"""`run.py check-orders`: paid orders against the credit ledger, and refunds against both."""

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
    problems += await _check_refunds(db)
    return len(rows), problems


async def _check_refunds(db: Database) -> list[str]:
    """A succeeded refund's clawback appears once in the ledger (kind `refund`, ref = its
    number, the credits it took), a failed or processing one's never; the order's
    refunded_fen is the sum of its succeeded refunds."""
    rows = await db.fetchall(
        "SELECT r.refund_no, r.status, r.clawback_credits, COUNT(l.id) AS n, "
        "COALESCE(SUM(-l.balance_delta), 0) AS taken FROM refunds r "
        "LEFT JOIN quota_ledger l ON l.kind = 'refund' AND l.ref = r.refund_no "
        "GROUP BY r.refund_no, r.status, r.clawback_credits"
    )
    problems = []
    for r in rows:
        want = 1 if r["status"] == "succeeded" and int(r["clawback_credits"]) else 0
        if int(r["n"]) != want or int(r["taken"]) != (int(r["clawback_credits"]) if want else 0):
            problems.append(
                f"refund {r['refund_no']} ({r['status']}): {r['n']} clawback row(s) taking {r['taken']}, "
                f"expected {want} taking {r['clawback_credits'] if want else 0}"
            )
    orphans = await db.fetchall(
        "SELECT l.id, l.ref FROM quota_ledger l LEFT JOIN refunds r ON r.refund_no = l.ref "
        "WHERE l.kind = 'refund' AND l.order_no IS NOT NULL "
        "AND (r.refund_no IS NULL OR r.status <> 'succeeded')"
    )
    problems += [f"ledger {r['id']}: clawback for refund {r['ref']}, which did not succeed" for r in orphans]
    sums = await db.fetchall(
        "SELECT o.order_no, o.refunded_fen, COALESCE(SUM(r.amount_fen), 0) AS s FROM orders o "
        "LEFT JOIN refunds r ON r.order_no = o.order_no AND r.status = 'succeeded' "
        "GROUP BY o.order_no, o.refunded_fen HAVING o.refunded_fen <> s"
    )
    problems += [
        f"order {r['order_no']}: refunded_fen {r['refunded_fen']}, refunds add up to {r['s']}" for r in sums
    ]
    return problems
