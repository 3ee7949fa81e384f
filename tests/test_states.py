"""The stored state machines refuse every move their table does not hold, with the exact
reason, and let racing callers find out who won (server/statemachine.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import FormData, web

from server.config import Settings
from server.errors import AppError, ErrorCode
from server.keys import credits_key, db_key
from server.payments import orders, refunds
from server.statemachine import IllegalTransition, StateMachine
from server.tasks import states
from tests.auth_support import auth_settings, bearer, register
from tests.conftest import Services
from tests.test_tasks import image_bytes


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return auth_settings(make_settings, cron_enabled=False)


async def a_finished_task(client: Any, app: web.Application, services: Services, database: str) -> str:
    """A task of the local vendor that ran to `succeeded`, and its id."""
    account = await register(client)
    headers = bearer(account["access_token"])
    await app[credits_key].grant(int(account["user"]["id"]), 100)

    form = FormData()
    form.add_field("file", image_bytes("navy"), filename="a.png", content_type="image/png")
    photo = await (await client.post("/api/v1/assets", data=form, headers=headers)).json()
    resp = await client.post(
        "/api/v1/tasks",
        json={"feature": "bg-remove", "inputs": {"image": photo["id"]}},
        headers={**headers, "Idempotency-Key": "one"},
    )
    assert resp.status == 202, await resp.text()
    task_id = str((await resp.json())["id"])
    for _ in range(600):
        task = await (await client.get(f"/api/v1/tasks/{task_id}", headers=headers)).json()
        if task["status"] in states.FINISHED:
            break
        await asyncio.sleep(0.05)  # as a front end without a socket polls
    assert task["status"] == "succeeded"
    return task_id


async def test_a_succeeded_task_cannot_run_again_and_the_error_says_exactly_why(
    client: Any, app: web.Application, services: Services, database: str
) -> None:
    task_id = await a_finished_task(client, app, services, database)
    with pytest.raises(IllegalTransition) as caught:
        await states.TASK.apply(app[db_key], (task_id,), "running")
    assert caught.value.message == f"task {task_id} is succeeded; it cannot become running"
    assert caught.value.code is ErrorCode.CONFLICT
    assert caught.value.details == {"status": "succeeded", "to": "running"}
    [row] = services.query(database, "SELECT status FROM tasks WHERE id = %s", task_id)
    assert row["status"] == "succeeded"


async def test_finishing_a_finished_task_again_lost_the_race_and_changes_nothing(
    client: Any, app: web.Application, services: Services, database: str
) -> None:
    task_id = await a_finished_task(client, app, services, database)
    error = AppError(ErrorCode.UPSTREAM_FAILED, "too late")
    assert await states.finish(app[db_key], task_id, "failed", error) is False
    assert await states.start(app[db_key], task_id) is False  # not queued: nothing to start
    [row] = services.query(database, "SELECT status, error_code FROM tasks WHERE id = %s", task_id)
    assert row == {"status": "succeeded", "error_code": None}


async def test_a_finished_step_cannot_finish_another_way(
    client: Any, app: web.Application, services: Services, database: str
) -> None:
    task_id = await a_finished_task(client, app, services, database)
    [step] = services.query(database, "SELECT step_id FROM task_steps WHERE task_id = %s LIMIT 1", task_id)
    with pytest.raises(IllegalTransition) as caught:
        await states.finish_step(app[db_key], task_id, step["step_id"], "failed", "late")
    assert caught.value.message == f"step {task_id}/{step['step_id']} is succeeded; it cannot become failed"


async def test_a_move_of_a_row_that_does_not_exist_is_not_found(app: web.Application, client: Any) -> None:
    with pytest.raises(AppError) as caught:
        await states.TASK.apply(app[db_key], ("no-such-task",), "running")
    assert caught.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(AppError) as caught:
        await orders.transition(app[db_key], "no-such-order", "paid")  # type: ignore[arg-type]
    assert caught.value.code is ErrorCode.NOT_FOUND


@pytest.mark.parametrize(
    ("machine", "final"),
    [
        (states.TASK, {"succeeded", "failed", "cancelled"}),
        (orders.MACHINE, {"refunded"}),
        (refunds.MACHINE, {"succeeded", "failed"}),
    ],
)
def test_nothing_leaves_a_final_status(machine: StateMachine, final: set[str]) -> None:
    assert {frm for frm, _ in machine.transitions} & final == set()
    assert final <= machine.statuses


def test_a_machine_refuses_to_name_a_move_its_table_lacks() -> None:
    with pytest.raises(IllegalTransition) as caught:
        orders.MACHINE.check("20261201000000abc", "refunded", "paid")
    assert caught.value.message == "order 20261201000000abc is refunded; it cannot become paid"
    orders.MACHINE.check("x", "pending", "paid")  # a legal move passes
