"""Credits as a saga in user actors: reserve → confirm | cancel, group commit, sweeper."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from actors.user import UserActor
from server.app import CRON_JOBS, create_app, cron_runner
from server.config import Settings
from server.credits.facade import EXPIRED_REASON
from server.credits.ledger import (
    Cancel,
    Confirm,
    Grant,
    QuotaState,
    Reservation,
    Reserve,
    Snapshot,
    check_all,
)
from server.errors import AppError, ErrorCode
from server.keys import actor_system_key, cron_key, db_key, redis_key
from server.tasks import leases
from tests.conftest import Services, run_command

_user_ids = itertools.count(1000)


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(cron_enabled=False)


@pytest.fixture
async def app2(aiohttp_client: Any, settings: Settings) -> web.Application:
    """A second server instance on the same MariaDB and Redis."""
    app = create_app(settings)
    await aiohttp_client(app)
    return app


async def wait_until_lease_gone(app: web.Application, task_id: str) -> None:
    """Redis expires the dead process's lease; poll for it (keyspace events are off)."""
    async with asyncio.timeout(10):
        while await leases.held(app[redis_key], [task_id]):  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def user(app: web.Application, user_id: int) -> Any:
    return app[actor_system_key].ref(UserActor, user_id)


async def test_reserve_then_confirm_charges_once_and_a_second_confirm_changes_nothing(
    client: Any, app: web.Application
) -> None:
    u = user(app, next(_user_ids))
    await u.ask(Grant(100, "grant", ref="welcome"))
    r = await u.ask(Reserve("task-a", 30, ttl=60))
    assert r.phase == "reserved"
    assert await u.ask(Snapshot()) == QuotaState(100, 30)
    assert (await u.ask(Confirm("task-a"))).phase == "confirmed"
    assert (await u.ask(Confirm("task-a"))).phase == "confirmed"
    assert await u.ask(Snapshot()) == QuotaState(70, 0)
    checked, problems = await check_all(app[db_key])
    assert checked >= 1 and problems == []


async def test_confirm_after_cancel_is_a_conflict_and_changes_nothing(
    client: Any, app: web.Application
) -> None:
    u = user(app, next(_user_ids))
    await u.ask(Grant(50, "grant"))
    await u.ask(Reserve("task-b", 20, ttl=60))
    assert (await u.ask(Cancel("task-b", "user cancelled"))).phase == "cancelled"
    with pytest.raises(AppError) as err:
        await u.ask(Confirm("task-b"))
    assert err.value.code == ErrorCode.CONFLICT
    assert (await u.ask(Cancel("task-b", "again"))).reason == "user cancelled"
    assert await u.ask(Snapshot()) == QuotaState(50, 0)


async def test_reserving_an_existing_task_answers_the_recorded_reservation(
    client: Any, app: web.Application
) -> None:
    u = user(app, next(_user_ids))
    await u.ask(Grant(50, "grant"))
    first = await u.ask(Reserve("task-c", 20, ttl=60))
    again = await u.ask(Reserve("task-c", 20, ttl=60))
    assert again == first
    assert await u.ask(Snapshot()) == QuotaState(50, 20)
    with pytest.raises(AppError) as err:
        await u.ask(Reserve("task-c", 25, ttl=60))
    assert err.value.code == ErrorCode.CONFLICT


async def test_an_insufficient_reserve_fails_alone_in_its_batch(client: Any, app: web.Application) -> None:
    u = user(app, next(_user_ids))
    await u.ask(Grant(10, "grant"))
    outcomes = await asyncio.gather(
        u.ask(Reserve("t1", 6, ttl=60)),
        u.ask(Reserve("t2", 6, ttl=60)),
        u.ask(Reserve("t3", 4, ttl=60)),
        return_exceptions=True,
    )
    assert isinstance(outcomes[0], Reservation) and isinstance(outcomes[2], Reservation)
    assert isinstance(outcomes[1], AppError) and outcomes[1].code == ErrorCode.QUOTA_INSUFFICIENT
    assert outcomes[1].details == {"required": 6, "available": 4}
    assert await u.ask(Snapshot()) == QuotaState(10, 10)


async def test_a_grant_with_a_reference_is_applied_once(client: Any, app: web.Application) -> None:
    u = user(app, next(_user_ids))
    results = await asyncio.gather(*(u.ask(Grant(30, "grant", ref="order-1")) for _ in range(5)))
    assert results[-1] == QuotaState(30, 0)
    assert await u.ask(Grant(30, "grant", ref="order-1")) == QuotaState(30, 0)
    assert await u.ask(Snapshot()) == QuotaState(30, 0)


async def test_an_adjustment_cannot_take_available_below_zero(client: Any, app: web.Application) -> None:
    u = user(app, next(_user_ids))
    await u.ask(Grant(10, "grant"))
    await u.ask(Reserve("t", 8, ttl=60))
    with pytest.raises(AppError) as err:
        await u.ask(Grant(-3, "adjust", reason="too much"))
    assert err.value.code == ErrorCode.QUOTA_INSUFFICIENT
    assert await u.ask(Grant(-2, "adjust", reason="exactly to zero")) == QuotaState(8, 8)


async def test_waiting_operations_are_committed_as_one_batch(
    client: Any, app: web.Application, services: Services, database: str
) -> None:
    uid = next(_user_ids)
    u = user(app, uid)
    await u.ask(Grant(1000, "grant"))
    before = services.query(database, "SELECT version FROM quota_accounts WHERE user_id = %s", uid)[0][
        "version"
    ]
    await asyncio.gather(*(u.ask(Reserve(f"batch-{i}", 1, ttl=60)) for i in range(100)))
    after = services.query(database, "SELECT version FROM quota_accounts WHERE user_id = %s", uid)[0][
        "version"
    ]
    assert after - before < 10  # 100 reservations, a handful of commits


async def test_confirms_and_cancels_settled_in_one_batch_each_keep_their_own_phase_and_reason(
    client: Any, app: web.Application, services: Services, database: str
) -> None:
    uid = next(_user_ids)
    u = user(app, uid)
    await u.ask(Grant(100, "grant"))
    tasks = [f"mixed-{uid}-{i}" for i in range(6)]
    await asyncio.gather(*(u.ask(Reserve(t, 5, ttl=60)) for t in tasks))
    await asyncio.gather(
        *(u.ask(Confirm(t) if i % 2 == 0 else Cancel(t, f"why {i}")) for i, t in enumerate(tasks))
    )
    rows = services.query(
        database,
        "SELECT task_id, phase, reason FROM quota_transactions WHERE user_id = %s ORDER BY task_id",
        uid,
    )
    assert [(r["task_id"], r["phase"]) for r in rows] == [
        (t, "confirmed" if i % 2 == 0 else "cancelled") for i, t in enumerate(tasks)
    ]
    assert [r["reason"] for r in rows if r["phase"] == "cancelled"] == ["why 1", "why 3", "why 5"]
    assert await u.ask(Snapshot()) == QuotaState(85, 0)


async def test_a_storm_on_two_instances_keeps_ledger_and_balance_equal(
    client: Any, app: web.Application, app2: web.Application, services: Services, database: str
) -> None:
    uid = next(_user_ids)
    instances = [user(app, uid), user(app2, uid)]
    await instances[0].ask(Grant(500, "grant"))
    rng = random.Random(7)

    async def life(i: int) -> None:
        task = f"storm-{i}"
        a, b = rng.choice(instances), rng.choice(instances)
        try:
            await a.ask(Reserve(task, rng.randint(1, 9), ttl=60))
        except AppError as exc:
            assert exc.code == ErrorCode.QUOTA_INSUFFICIENT
            return
        settle = [Confirm(task), Cancel(task, "failed")]
        rng.shuffle(settle)
        for msg in settle:  # both orders, from both instances: exactly one may win
            try:
                await b.ask(msg)
            except AppError as exc:
                assert exc.code == ErrorCode.CONFLICT

    await asyncio.gather(*(life(i) for i in range(300)))
    _, problems = await check_all(app[db_key])
    assert problems == []
    both = services.query(
        database,
        "SELECT task_id FROM quota_ledger WHERE user_id = %s AND kind IN ('confirm', 'cancel') "
        "GROUP BY task_id HAVING COUNT(*) > 1",
        uid,
    )
    assert both == []
    state = await instances[1].ask(Snapshot())
    assert state.reserved == 0 and state.available >= 0


async def test_the_sweeper_cancels_expired_unleased_reservations_exactly_once(
    client: Any, app: web.Application, app2: web.Application, services: Services, database: str
) -> None:
    uid = next(_user_ids)
    u = user(app, uid)
    await u.ask(Grant(100, "grant"))
    await u.ask(Reserve("orphan", 10, ttl=0.05))
    await u.ask(Reserve("held", 10, ttl=0.05))
    await u.ask(Reserve("fresh", 10, ttl=600))
    assert await leases.acquire(app[redis_key], "held", "another-live-process", 60_000)
    await asyncio.sleep(0.1)  # let the two short reservations pass their expiry
    assert cron_key not in app  # cron is off in these tests: the job is driven by hand
    runs = await asyncio.gather(
        cron_runner(app).run(CRON_JOBS[0], slot=1),
        cron_runner(app2).run(CRON_JOBS[0], slot=1),
    )
    assert sorted(runs, key=str) == [1, None]  # one instance ran the slot and cancelled one
    assert await cron_runner(app2).run(CRON_JOBS[0], slot=2) == 0
    phases = {
        r["task_id"]: (r["phase"], r["reason"])
        for r in services.query(
            database, "SELECT task_id, phase, reason FROM quota_transactions WHERE user_id = %s", uid
        )
    }
    assert phases == {
        "orphan": ("cancelled", EXPIRED_REASON),
        "held": ("reserved", None),
        "fresh": ("reserved", None),
    }
    cancels = services.query(
        database, "SELECT COUNT(*) AS n FROM quota_ledger WHERE kind = 'cancel' AND user_id = %s", uid
    )
    assert cancels[0]["n"] == 1
    assert await u.ask(Snapshot()) == QuotaState(100, 20)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.integers(0, 5), st.integers(1, 30)),
        st.tuples(st.just("confirm"), st.integers(0, 5), st.just(0)),
        st.tuples(st.just("cancel"), st.integers(0, 5), st.just(0)),
        st.tuples(st.just("grant"), st.integers(0, 3), st.integers(1, 40)),
    ),
    min_size=1,
    max_size=30,
)


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=ops, concurrent=st.booleans())
async def test_random_sequences_keep_every_invariant(
    client: Any,
    app: web.Application,
    services: Services,
    database: str,
    sequence: list[Any],
    concurrent: bool,
) -> None:
    uid = next(_user_ids)
    u = user(app, uid)

    def msg(kind: str, n: int, amount: int) -> Any:
        if kind == "reserve":
            return Reserve(f"u{uid}-t{n}", amount, ttl=60)
        if kind == "confirm":
            return Confirm(f"u{uid}-t{n}")
        if kind == "cancel":
            return Cancel(f"u{uid}-t{n}", "random")
        return Grant(amount, "grant", ref=f"u{uid}-g{n}")

    messages = [msg(*op) for op in sequence]
    if concurrent:  # arrive together: one or a few batches, reordered by the gather
        await asyncio.gather(*(u.ask(m) for m in messages), return_exceptions=True)
    else:
        for m in messages:
            try:
                await u.ask(m)
            except AppError as exc:
                assert exc.code in (ErrorCode.QUOTA_INSUFFICIENT, ErrorCode.CONFLICT, ErrorCode.NOT_FOUND)
    state = await u.ask(Snapshot())
    assert state.available >= 0 and state.reserved >= 0
    rows = services.query(
        database,
        "SELECT COALESCE(SUM(balance_delta), 0) AS b, COALESCE(SUM(reserved_delta), 0) AS r "
        "FROM quota_ledger WHERE user_id = %s",
        uid,
    )
    assert (int(rows[0]["b"]), int(rows[0]["r"])) == (state.balance, state.reserved)
    open_ = services.query(
        database,
        "SELECT COALESCE(SUM(amount), 0) AS s FROM quota_transactions "
        "WHERE user_id = %s AND phase = 'reserved'",
        uid,
    )
    assert int(open_[0]["s"]) == state.reserved
    settled_twice = services.query(
        database,
        "SELECT task_id FROM quota_ledger WHERE user_id = %s AND kind IN ('confirm', 'cancel') "
        "GROUP BY task_id HAVING COUNT(*) > 1",
        uid,
    )
    assert settled_twice == []
    grants = {op[1] for op in sequence if op[0] == "grant"}
    granted = services.query(
        database, "SELECT COUNT(*) AS n FROM quota_ledger WHERE user_id = %s AND kind = 'grant'", uid
    )
    assert granted[0]["n"] == len(grants)


KILLED_HOLDER = """
import asyncio, sys
from aiohttp import web
from server.app import create_app
from server.config import Settings
from server.tasks import leases
from server.keys import actor_system_key, redis_key
from server.credits.ledger import Grant, Reserve
from actors.user import UserActor

async def main():
    app = create_app(Settings(_env_file=None, app_env="test", cron_enabled=False,
                              database_url=sys.argv[1], redis_url=sys.argv[2]))
    runner = web.AppRunner(app)
    await runner.setup()
    u = app[actor_system_key].ref(UserActor, int(sys.argv[3]))
    await u.ask(Grant(100, "grant"))
    await leases.acquire(app[redis_key], "killed-task", "doomed-process", 1000)
    await u.ask(Reserve("killed-task", 40, ttl=1))
    print("RESERVED", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_process_killed_between_reserve_and_confirm_leaves_a_reservation_the_sweeper_cancels_once(
    client: Any,
    app: web.Application,
    app2: web.Application,
    settings: Settings,
    services: Services,
    database: str,
) -> None:
    import signal
    import sys

    from tests.conftest import ROOT

    uid = next(_user_ids)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        KILLED_HOLDER,
        str(settings.database_url),
        str(settings.redis_url),
        str(uid),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"RESERVED"
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    u = user(app, uid)
    assert await u.ask(Snapshot()) == QuotaState(100, 40)
    # Before the lease and the reservation expire, the sweeper leaves the task alone.
    assert await cron_runner(app).run(CRON_JOBS[0], slot=10) == 0
    await wait_until_lease_gone(app, "killed-task")
    await asyncio.sleep(0.1)  # and the reservation's own 1 s expiry has passed too
    runs = await asyncio.gather(
        cron_runner(app).run(CRON_JOBS[0], slot=11),
        cron_runner(app2).run(CRON_JOBS[0], slot=11),
        cron_runner(app2).run(CRON_JOBS[0], slot=12),
    )
    assert sum(r or 0 for r in runs) == 1
    assert await u.ask(Snapshot()) == QuotaState(100, 0)
    cancels = services.query(
        database, "SELECT COUNT(*) AS n FROM quota_ledger WHERE task_id = 'killed-task' AND kind = 'cancel'"
    )
    assert cancels[0]["n"] == 1


async def test_check_quota_reports_a_tampered_balance_and_exits_non_zero(
    client: Any, app: web.Application, settings: Settings, services: Services, database: str
) -> None:
    uid = next(_user_ids)
    await user(app, uid).ask(Grant(25, "grant"))

    code, out = await run_command(settings, "check-quota")
    assert code == 0, out
    assert "0 difference(s)" in out
    services.query(database, "UPDATE quota_accounts SET balance = balance + 1 WHERE user_id = %s", uid)
    code, out = await run_command(settings, "check-quota")
    assert code == 1
    assert f"user {uid}: balance vs ledger: recorded 26, expected 25" in out


@pytest.mark.parametrize("command", ["check-quota", "clean-files"])
async def test_maintenance_commands_on_an_unmigrated_database_say_to_migrate(
    settings: Settings, command: str
) -> None:
    # No app was started on this test's database, so it has no tables yet.
    code, out = await run_command(settings, command)
    assert code == 2, out
    assert out.strip().endswith("pending; run `python run.py migrate` first")
    assert "Traceback" not in out
