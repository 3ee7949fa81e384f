"""The UserActor's single-operation path (issue 10, defect 16): a lone Reserve, Confirm
or Cancel writes from what the actor remembers, compared and set in MySQL. These tests
change the account behind one actor's back, through a second instance or by hand, and
check that the remembered row is never written over."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from actors.user import UserActor
from server.app import create_app
from server.config import Settings
from server.credits.ledger import Cancel, Confirm, Grant, QuotaState, Reserve, Snapshot, check_all
from server.errors import AppError, ErrorCode
from server.keys import actor_system_key, db_key
from tests.conftest import Services

_user_ids = itertools.count(50_000)


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(cron_enabled=False)


@pytest.fixture
async def apps(aiohttp_client: Any, settings: Settings) -> tuple[web.Application, web.Application]:
    """Two server instances on the same MariaDB and Redis, each with its own UserActors."""
    pair = create_app(settings), create_app(settings)
    for app in pair:
        await aiohttp_client(app)
    return pair


def user(app: web.Application, user_id: int) -> Any:
    return app[actor_system_key].ref(UserActor, user_id)


async def no_differences(app: web.Application) -> None:
    _, problems = await check_all(app[db_key])
    assert problems == []


async def test_a_lone_reserve_after_another_instance_reserved_is_refused_on_the_current_balance(
    apps: tuple[web.Application, web.Application],
) -> None:
    uid = next(_user_ids)
    a, b = user(apps[0], uid), user(apps[1], uid)
    await a.ask(Grant(10, "grant"))
    await a.ask(Reserve("a-1", 3, ttl=60))  # a remembers 10 / 3
    await b.ask(Reserve("b-1", 5, ttl=60))  # now 10 / 8
    with pytest.raises(AppError) as err:
        await a.ask(Reserve("a-2", 4, ttl=60))
    assert err.value.code == ErrorCode.QUOTA_INSUFFICIENT
    assert err.value.details == {"required": 4, "available": 2}
    assert (await a.ask(Reserve("a-3", 2, ttl=60))).phase == "reserved"
    assert await a.ask(Snapshot()) == QuotaState(10, 10)
    await no_differences(apps[0])


async def test_a_lone_confirm_of_a_reservation_another_instance_cancelled_is_a_conflict(
    apps: tuple[web.Application, web.Application],
) -> None:
    uid = next(_user_ids)
    a, b = user(apps[0], uid), user(apps[1], uid)
    await a.ask(Grant(10, "grant"))
    await a.ask(Reserve("t", 4, ttl=60))  # a holds t as reserved
    assert (await b.ask(Cancel("t", "cancelled elsewhere"))).phase == "cancelled"
    with pytest.raises(AppError) as err:
        await a.ask(Confirm("t"))
    assert err.value.code == ErrorCode.CONFLICT
    assert (await a.ask(Cancel("t", "again"))).reason == "cancelled elsewhere"
    assert await a.ask(Snapshot()) == QuotaState(10, 0)
    await no_differences(apps[0])


async def test_a_reserve_of_a_task_another_instance_reserved_answers_that_reservation(
    apps: tuple[web.Application, web.Application],
) -> None:
    uid = next(_user_ids)
    a, b = user(apps[0], uid), user(apps[1], uid)
    await a.ask(Grant(10, "grant"))
    theirs = await b.ask(Reserve("same-task", 3, ttl=60))
    assert await a.ask(Reserve("same-task", 3, ttl=60)) == theirs
    assert (await a.ask(Confirm("same-task"))).phase == "confirmed"
    assert await b.ask(Snapshot()) == QuotaState(7, 0)
    await no_differences(apps[0])


async def test_a_balance_changed_by_hand_is_not_written_over(
    apps: tuple[web.Application, web.Application], services: Services, database: str
) -> None:
    uid = next(_user_ids)
    a = user(apps[0], uid)
    await a.ask(Grant(10, "grant"))
    # An operator's fix that forgets to bump `version`: the balance still differs.
    services.query(database, "UPDATE quota_accounts SET balance = 20 WHERE user_id = %s", uid)
    await a.ask(Reserve("after-fix", 5, ttl=60))  # a remembers 10 / 0, which would allow it
    assert await a.ask(Snapshot()) == QuotaState(20, 5)
    [row] = services.query(
        database, "SELECT balance_after, reserved_after FROM quota_ledger WHERE task_id = 'after-fix'"
    )
    assert row == {"balance_after": 20, "reserved_after": 5}


async def test_lone_operations_from_two_instances_keep_the_ledger_exact(
    apps: tuple[web.Application, web.Application],
) -> None:
    uid = next(_user_ids)
    actors = [user(app, uid) for app in apps]
    rng = random.Random(16)
    await actors[0].ask(Grant(60, "grant"))
    balance, reserved, open_ = 60, 0, {}
    for i in range(150):
        who = rng.choice(actors)
        if open_ and rng.random() < 0.6:
            task = rng.choice(sorted(open_))
            amount = open_.pop(task)
            if rng.random() < 0.5:
                await who.ask(Confirm(task))
                balance -= amount
            else:
                await who.ask(Cancel(task, "changed my mind"))
            reserved -= amount
            continue
        amount = rng.randint(1, 9)
        try:
            await who.ask(Reserve(f"mix-{i}", amount, ttl=60))
        except AppError as exc:
            assert exc.code == ErrorCode.QUOTA_INSUFFICIENT and balance - reserved < amount
        else:
            open_[f"mix-{i}"] = amount
            reserved += amount
    assert await actors[1].ask(Snapshot()) == QuotaState(balance, reserved)
    await no_differences(apps[0])
