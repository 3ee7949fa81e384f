"""Submitting a task: a 202 means created, reserved and scheduled; any other answer wrote nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from server.app import create_app
from server.config import Settings
from server.credits.ledger import QuotaState
from server.keys import redis_key, tasks_key
from server.tasks import leases
from tests.auth_support import auth_settings, error_code, register
from tests.conftest import Services
from tests.fakes.vendor import FakeVendor
from tests.test_tasks import ADMIN, User, add_feature, admin_headers, enhance, image_bytes, vendor_settings

# One run at a time and one waiting: the third submission finds the runner full.
SMALL_RUNNER = {"task_concurrency": 1, "task_pending": 1}
small_runner = pytest.mark.parametrize("runner", [SMALL_RUNNER], indirect=True, ids=["small-runner"])


@pytest.fixture
def runner(request: pytest.FixtureRequest) -> dict[str, int]:
    """Runner limits; the defaults unless a test asks for `small_runner`."""
    return dict(getattr(request, "param", {}))


@pytest.fixture
def settings(make_settings: Callable[..., Settings], fake: FakeVendor, runner: dict[str, int]) -> Settings:
    return auth_settings(make_settings, cron_enabled=False, **runner, **ADMIN, **vendor_settings(fake))


@pytest.fixture
async def user(client: Any, app: web.Application) -> User:
    return User(client, app, await register(client))


def rows(services: Services, database: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    return services.query(database, sql, *args)


def ledger_for_missing_tasks(services: Services, database: str) -> list[dict[str, Any]]:
    return rows(
        services,
        database,
        "SELECT l.task_id, l.kind FROM quota_ledger l LEFT JOIN tasks t ON t.id = l.task_id "
        "WHERE l.task_id IS NOT NULL AND t.id IS NULL",
    )


async def fill_the_small_runner(user: User, client: Any, fake: FakeVendor) -> tuple[dict[str, Any], Any, Any]:
    """A `held` feature (cost 1), 10 credits, a photo; task "one" running on the held fake
    vendor and "two" waiting: the small runner is full. (photo, running, waiting)."""
    await add_feature(client, "held", {"steps": [enhance("e")], "output": "e"}, cost=1)
    await user.grant(10)
    photo = await user.upload(image_bytes("teal"))
    fake.hold = asyncio.Event()
    running = await user.create("held", {"image": photo["id"]}, "one")
    await fake.until(lambda: fake.in_flight == 1)
    waiting = await user.create("held", {"image": photo["id"]}, "two")
    assert (running.status, waiting.status) == (202, 202)
    return photo, running, waiting


@small_runner
async def test_a_full_runner_answers_busy_and_writes_nothing(
    user: User, client: Any, app: web.Application, fake: FakeVendor, services: Services, database: str
) -> None:
    photo, running, waiting = await fill_the_small_runner(user, client, fake)

    refused = await user.create("held", {"image": photo["id"]}, "three")
    assert refused.status == 503 and await error_code(refused) == "BUSY"
    assert refused.headers["Retry-After"]
    ids = {(await running.json())["id"], (await waiting.json())["id"]}
    assert {r["id"] for r in rows(services, database, "SELECT id FROM tasks")} == ids
    assert {r["task_id"] for r in rows(services, database, "SELECT task_id FROM quota_transactions")} == ids
    assert {
        r["task_id"]
        for r in rows(services, database, "SELECT task_id FROM quota_ledger WHERE task_id IS NOT NULL")
    } == ids
    assert await user.quota() == QuotaState(10, 2)
    held = {k.decode() async for k in app[redis_key].scan_iter(match=leases.PREFIX + "*")}
    assert held == {leases.key(i) for i in ids}

    # The slot a refused submission looked at is still free for the next one once a run ends.
    fake.hold.set()
    for task_id in ids:
        assert (await user.finished(task_id))["status"] == "succeeded"
    again = await user.create("held", {"image": photo["id"]}, "three")
    assert again.status == 202, await again.text()
    assert (await user.finished((await again.json())["id"]))["status"] == "succeeded"
    assert await user.quota() == QuotaState(7, 0)


@small_runner
async def test_a_burst_on_a_full_runner_gets_202_exactly_for_the_tasks_it_created(
    user: User, client: Any, fake: FakeVendor, services: Services, database: str
) -> None:
    await add_feature(client, "held", {"steps": [enhance("e")], "output": "e"}, cost=1)
    await user.grant(20)
    photo = await user.upload(image_bytes("olive"))
    fake.hold = asyncio.Event()
    answers = await asyncio.gather(*(user.create("held", {"image": photo["id"]}, f"b-{i}") for i in range(8)))
    statuses = sorted(a.status for a in answers)
    assert statuses == [202, 202] + [503] * 6
    accepted = {(await a.json())["id"] for a in answers if a.status == 202}
    assert {r["id"] for r in rows(services, database, "SELECT id FROM tasks")} == accepted
    assert {
        r["task_id"] for r in rows(services, database, "SELECT task_id FROM quota_transactions")
    } == accepted
    assert ledger_for_missing_tasks(services, database) == []
    fake.hold.set()
    for task_id in accepted:
        assert (await user.finished(task_id))["status"] == "succeeded"
    assert await user.quota() == QuotaState(18, 0)


async def test_concurrent_repeats_of_one_key_on_two_instances_answer_the_same_task_and_reserve_once(
    user: User, aiohttp_client: Any, settings: Settings, services: Services, database: str
) -> None:
    other = await aiohttp_client(create_app(settings))
    await user.grant(2)  # bg-remove costs 2: the balance covers exactly one task
    photo = await user.upload(image_bytes("plum"))
    body = {"feature": "bg-remove", "inputs": {"image": photo["id"]}}
    headers = {**user.headers, "Idempotency-Key": "once"}
    clients = [user.client, other] * 10
    answers = await asyncio.gather(*(c.post("/api/v1/tasks", json=body, headers=headers) for c in clients))
    statuses = sorted(a.status for a in answers)
    assert statuses == [200] * 19 + [202], [await a.text() for a in answers if a.status not in (200, 202)]
    ids = {(await a.json())["id"] for a in answers}
    assert len(ids) == 1
    (task_id,) = ids
    assert rows(services, database, "SELECT task_id FROM quota_transactions") == [{"task_id": task_id}]
    assert ledger_for_missing_tasks(services, database) == []
    assert (await user.finished(task_id))["status"] == "succeeded"
    assert await user.quota() == QuotaState(0, 0)
    kinds = rows(services, database, "SELECT kind FROM quota_ledger WHERE task_id IS NOT NULL ORDER BY id")
    assert [k["kind"] for k in kinds] == ["reserve", "confirm"]


@pytest.mark.parametrize(
    "runner", [{**SMALL_RUNNER, "task_lease_ttl": 3.0}], indirect=True, ids=["small-runner-short-lease"]
)
async def test_a_run_waiting_in_the_queue_keeps_its_lease_so_no_other_instance_takes_it(
    user: User, client: Any, app: web.Application, fake: FakeVendor, settings: Settings, aiohttp_client: Any
) -> None:
    """The first run holds the only place for several lease lives; the second waits in the
    queue all that time, its lease renewed by the runner, and recovery elsewhere leaves it."""
    await add_feature(client, "held", {"steps": [enhance("e")], "output": "e"}, cost=1)
    await user.grant(2)
    photo = await user.upload(image_bytes("olive"))
    fake.hold = asyncio.Event()
    first = await user.create("held", {"image": photo["id"]}, "first")
    await fake.until(lambda: fake.in_flight == 1)
    second = await user.create("held", {"image": photo["id"]}, "second")
    assert (first.status, second.status) == (202, 202)
    waiting = str((await second.json())["id"])
    other = create_app(settings)
    await aiohttp_client(other)

    for _ in range(3):  # three lease lives (9 s) in the queue
        await asyncio.sleep(3.0)
        assert await leases.held(app[redis_key], [waiting]) == {waiting}
        assert await other[tasks_key].recover() == 0

    fake.hold.set()
    assert (await user.finished(waiting))["status"] == "succeeded"


@small_runner
async def test_a_repeat_answers_its_first_task_when_the_runner_is_full_or_the_feature_is_disabled_since(
    user: User, client: Any, fake: FakeVendor, services: Services, database: str
) -> None:
    """The key is looked up before an error is answered, not before every submission."""
    photo, running, _ = await fill_the_small_runner(user, client, fake)
    first_id = (await running.json())["id"]

    full = await user.create("held", {"image": photo["id"]}, "three")
    assert full.status == 503 and await error_code(full) == "BUSY"
    repeat = await user.create("held", {"image": photo["id"]}, "one")  # the runner is still full
    assert repeat.status == 200 and (await repeat.json())["id"] == first_id

    resp = await client.patch(
        "/api/v1/admin/features/held", json={"enabled": False}, headers=await admin_headers(client)
    )
    assert resp.status == 200
    repeat = await user.create("held", {"image": photo["id"]}, "one")
    assert repeat.status == 200 and (await repeat.json())["id"] == first_id
    conflict = await user.create("held", {"image": "0" * 24}, "one")  # another body, still the key's
    assert conflict.status == 409 and await error_code(conflict) == "IDEMPOTENCY_CONFLICT"
    refused = await user.create("held", {"image": photo["id"]}, "four")
    assert refused.status == 422 and await error_code(refused) == "VALIDATION_FAILED"

    fake.hold.set()
    assert len(rows(services, database, "SELECT id FROM tasks")) == 2
    assert await user.quota() == QuotaState(10, 2)


async def test_a_finished_task_keeps_its_lease_until_it_expires_and_recovery_leaves_it(
    user: User, client: Any, app: web.Application, settings: Settings, aiohttp_client: Any
) -> None:
    """A run that gave its task the final status lets the lease expire (no round trip to
    delete it); nothing acts on the lease of a finished task."""
    await user.grant(2)
    photo = await user.upload(image_bytes("tan"))
    task_id = str((await (await user.create("bg-remove", {"image": photo["id"]}, "k")).json())["id"])
    assert (await user.finished(task_id))["status"] == "succeeded"
    assert await leases.held(app[redis_key], [task_id]) == {task_id}
    assert 0 < await app[redis_key].pttl(leases.key(task_id)) <= settings.tasks.lease_ttl * 1000
    other = create_app(settings)
    await aiohttp_client(other)
    assert await other[tasks_key].recover() == 0
    assert (await user.finished(task_id))["status"] == "succeeded"
    assert await user.quota() == QuotaState(0, 0)
