"""Reserve+confirm pairs per second: through the UserActor (group commit) versus the
naive per-request saga (one transaction per operation through `apply_batch`: SET
TRANSACTION; BEGIN; SELECT … FOR UPDATE on the account and on the reservation;
INSERT or UPDATE the reservation; INSERT the ledger row; UPDATE the account;
COMMIT), 50 concurrent requesters, on the same MariaDB in the same run.

With 1,000 users every actor turn holds one operation, so batching shares nothing;
the actor wins there by its lone-operation path (docs/credits.md: three conditional
writes from the row it remembers, five round trips instead of eight).

    .venv/bin/python bench/quota.py [--pairs 3000] [--requesters 50]

MariaDB runs with its durable defaults (innodb_flush_log_at_trx_commit=1), as in
production: a commit costs a log flush, which is what group commit saves.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loguru import logger

from actors.runtime import ActorSystem
from actors.user import UserActor
from server.config import Settings
from server.credits.ledger import Confirm, Grant, QuotaOp, Reserve, apply_batch, check_all
from server.db import Database, is_duplicate, is_retryable
from server.embedded import EmbeddedMariaDB, ensure_database
from server.hub.events import NullHub
from server.metrics import Metrics
from server.migrations import Migrator

_ids = itertools.count()


async def naive(db: Database, user_id: int, op: QuotaOp) -> None:
    """One operation, one transaction, retried on deadlock like any careful handler."""
    for _ in range(20):
        try:
            async with db.transaction("READ COMMITTED") as tx:
                result = await apply_batch(tx, user_id, [op])
            if isinstance(result.outcomes[0], Exception):
                raise result.outcomes[0]
            return
        except Exception as exc:
            if not (is_retryable(exc) or is_duplicate(exc)):
                raise
    raise RuntimeError("gave up after 20 deadlocks")


async def run_pairs(
    pairs: int, requesters: int, users: list[int], call: Callable[[int, QuotaOp], Awaitable[None]]
) -> float:
    work = iter(range(pairs))
    run = next(_ids)

    async def requester() -> None:
        for i in work:
            uid = users[i % len(users)]
            task = f"b{run}-{i}"
            await call(uid, Reserve(task, 1, ttl=300))
            await call(uid, Confirm(task))

    started = time.perf_counter()
    await asyncio.gather(*(requester() for _ in range(requesters)))
    return pairs / (time.perf_counter() - started)


async def main(pairs: int, requesters: int) -> None:
    logger.remove()
    with tempfile.TemporaryDirectory(prefix="bench-quota-") as tmp:
        mariadb = EmbeddedMariaDB(Path(tmp))  # durable defaults
        mariadb.start()
        try:
            ensure_database(mariadb, "bench")
            settings = Settings(  # type: ignore[call-arg]
                _env_file=None, database_url=mariadb.url("bench"), db_pool_max=requesters + 10
            )
            db = await Database.connect(settings.database(), settings, Metrics())
            await Migrator(db).migrate()
            system = ActorSystem(default_ask_timeout=60)
            system.register(UserActor, lambda: UserActor(db, NullHub()))
            await system.start()

            async def via_actor(uid: int, op: QuotaOp) -> None:
                await system.ref(UserActor, uid).ask(op)

            async def via_naive(uid: int, op: QuotaOp) -> None:
                await naive(db, uid, op)

            hot = [1]
            many = list(range(1000, 2000))
            for uid in hot + many:
                await system.ref(UserActor, uid).ask(Grant(10 * pairs, "grant"))
            await run_pairs(200, requesters, hot, via_actor)  # warm up both paths
            await run_pairs(200, requesters, hot, via_naive)

            rows = []
            for label, users in (("1 hot user", hot), ("1,000 users", many)):
                actor = await run_pairs(pairs, requesters, users, via_actor)
                naive_rate = await run_pairs(pairs, requesters, users, via_naive)
                rows.append((label, actor, naive_rate))
            await system.stop(10)
            checked, problems = await check_all(db)
            await db.close()
        finally:
            mariadb.stop()

    print(f"reserve+confirm pairs/s, {requesters} concurrent requesters, {pairs} pairs per run")
    print(f"{'workload':<14}{'actor':>10}{'naive':>10}{'ratio':>8}")
    for label, a, n in rows:
        print(f"{label:<14}{a:>10.0f}{n:>10.0f}{a / n:>7.2f}x")
    print(f"ledger check: {checked} accounts, {len(problems)} differences")
    print("\nfor bench/RESULTS.md:")
    for label, a, n in rows:
        print(f"| {label} | {a:.0f} | {n:.0f} | {a / n:.2f}× |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--requesters", type=int, default=50)
    args = parser.parse_args()
    asyncio.run(main(args.pairs, args.requesters))
