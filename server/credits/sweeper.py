"""The reservation sweeper: cancels reservations past their expiry whose task no
live process holds (no lease in Redis). Runs every minute, once per cluster."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from aiohttp import web
from loguru import logger

from actors.user import UserActor
from server.credits.ledger import Cancel, Reservation, utcnow
from server.keys import actor_system_key, db_key, metrics_key, redis_key
from server.tasks import leases

EXPIRED_REASON = "expired: no live process held the task"
BATCH = 500


async def sweep_expired_reservations(app: web.Application) -> int:
    """Returns how many reservations this run cancelled."""
    now = utcnow()
    rows = await app[db_key].fetchall(
        "SELECT task_id, user_id FROM quota_transactions "
        "WHERE phase = 'reserved' AND expires_at < %s ORDER BY expires_at LIMIT %s",
        now,
        BATCH,
    )
    live = await leases.held(app[redis_key], [str(r["task_id"]) for r in rows])
    by_user: dict[int, list[str]] = defaultdict(list)
    for r in rows:
        if str(r["task_id"]) not in live:
            by_user[int(r["user_id"])].append(str(r["task_id"]))
    system = app[actor_system_key]
    asks = [
        system.ref(UserActor, user_id).ask(Cancel(task_id, EXPIRED_REASON, expired_before=now))
        for user_id, task_ids in by_user.items()
        for task_id in task_ids
    ]
    cancelled = 0
    for outcome in await asyncio.gather(*asks, return_exceptions=True):
        if isinstance(outcome, Reservation):
            cancelled += outcome.changed
        elif isinstance(outcome, BaseException):
            logger.warning("sweeper could not cancel a reservation: {}", outcome)
    app[metrics_key].quota_swept.inc(cancelled)
    return cancelled
