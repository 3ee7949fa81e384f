"""Cluster-wide figures read from MySQL: the ops dashboard shows them and the `ops-gauges`
cron job (every instance, every minute) exports them as gauges (docs/ops.md)."""

from __future__ import annotations

from typing import TypedDict

from server.db import Database

TASK_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


class ReservationFigures(TypedDict):
    count: int
    sum: int
    overdue: int


async def task_counts(db: Database) -> dict[str, int]:
    """Tasks by status; every known status is present (0 when none)."""
    rows = await db.fetchall("SELECT status, COUNT(*) AS n FROM tasks GROUP BY status")
    counts = dict.fromkeys(TASK_STATUSES, 0)
    counts.update({str(r["status"]): int(r["n"]) for r in rows})
    return dict(sorted(counts.items()))


async def reservations(db: Database) -> ReservationFigures:
    """Open reservations: how many, the credits they hold, how many are past expiry
    (`expires_at` is UTC, as the sweeper compares it)."""
    row = await db.fetchone(
        "SELECT COUNT(*) AS n, COALESCE(SUM(amount), 0) AS total, "
        "COALESCE(SUM(expires_at < UTC_TIMESTAMP(6)), 0) AS overdue "
        "FROM quota_transactions WHERE phase = 'reserved'"
    )
    if row is None:
        return ReservationFigures(count=0, sum=0, overdue=0)
    return ReservationFigures(count=int(row["n"]), sum=int(row["total"]), overdue=int(row["overdue"]))
