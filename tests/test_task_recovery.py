"""A server killed in the middle of a task: the task still ends and its credits settle once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from server.config import Settings
from server.keys import redis_key, tasks_key
from server.tasks import leases
from tests.auth_support import auth_settings, register
from tests.conftest import ROOT, Services
from tests.fakes.vendor import FakeVendor
from tests.ports import free_port
from tests.test_tasks import User, image_bytes, vendor_settings

pytestmark = pytest.mark.timeout(120)
LEASE_TTL = 1.5
PIPELINE = {
    "steps": [
        {
            "id": "e",
            "type": "call",
            "vendor": "fake",
            "operation": "enhance",
            "inputs": {"image": "$input.image"},
        }
    ],
    "output": "e",
}


@pytest.fixture
def settings(make_settings: Callable[..., Settings], fake: FakeVendor) -> Settings:
    return auth_settings(make_settings, cron_enabled=False, task_lease_ttl=LEASE_TTL, **vendor_settings(fake))


def vendors_env(settings: Settings) -> str:
    out = {}
    for name, v in settings.vendors.items():
        entry = v.model_dump(mode="json", exclude_none=True)
        if v.api_key is not None:
            entry["api_key"] = v.api_key.get_secret_value()
        out[name] = entry
    return json.dumps(out)


async def start_server(settings: Settings, port: int) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_", "VENDORS"))}
    env.update(
        {
            "APP_ENV": "test",
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "DATABASE_URL": str(settings.database_url),
            "REDIS_URL": str(settings.redis_url),
            "VAR_DIR": str(settings.var_dir),
            "CRON_ENABLED": "false",
            "TASK_LEASE_TTL": str(LEASE_TTL),
            "VENDORS": vendors_env(settings),
        }
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "run.py",
        "serve",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    async with asyncio.timeout(60), aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    if resp.status == 200:
                        return proc
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)


async def run_and_kill(
    user: User, settings: Settings, fake: FakeVendor, services: Services, database: str
) -> str:
    """Create a task on a second server process, kill -9 it while the vendor call is in flight."""
    services.query(
        database,
        "INSERT INTO features (slug, name, cost, inputs, pipeline) VALUES ('fake-one', 'Fake', 5, %s, %s)",
        json.dumps({"image": {"type": "image"}}),
        json.dumps(PIPELINE),
    )
    await user.grant(5)
    photo = await user.upload(image_bytes("navy"))
    fake.hold = asyncio.Event()
    port = free_port()
    proc = await start_server(settings, port)
    try:
        async with aiohttp.ClientSession() as session:
            resp = await session.post(
                f"http://127.0.0.1:{port}/api/v1/tasks",
                json={"feature": "fake-one", "inputs": {"image": photo["id"]}},
                headers={**user.headers, "Idempotency-Key": "survive-a-crash"},
            )
            assert resp.status == 202, await resp.text()
            task_id = str((await resp.json())["id"])
        await fake.until(lambda: fake.in_flight == 1)
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    fake.hold.set()  # the dead process's request may now end; nobody reads its answer
    fake.hold = None
    async with asyncio.timeout(10):  # Redis expires the dead process's lease
        while await leases.held(user.app[redis_key], [task_id]):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    return task_id


async def test_a_task_of_a_killed_server_is_run_again_by_another_and_charged_once(
    client: Any, app: web.Application, settings: Settings, fake: FakeVendor, services: Services, database: str
) -> None:
    user = User(client, app, await register(client))
    task_id = await run_and_kill(user, settings, fake, services, database)
    assert (await user.task(task_id))["status"] == "running"
    assert await app[tasks_key].recover() == 1
    assert await app[tasks_key].recover() == 0  # taken once
    task = await user.finished(task_id)
    assert task["status"] == "succeeded", task
    kinds = services.query(database, "SELECT kind FROM quota_ledger WHERE task_id = %s ORDER BY id", task_id)
    assert [k["kind"] for k in kinds] == ["reserve", "confirm"]
    assert services.query(database, "SELECT attempts FROM tasks WHERE id = %s", task_id)[0]["attempts"] == 2
    assert (await user.quota()).balance == 0


async def test_a_task_out_of_attempts_fails_with_its_credits_returned_once(
    client: Any,
    aiohttp_client: Any,
    make_settings: Callable[..., Settings],
    fake: FakeVendor,
    services: Services,
    database: str,
) -> None:
    from server.app import create_app

    settings = auth_settings(
        make_settings,
        cron_enabled=False,
        task_lease_ttl=LEASE_TTL,
        task_max_attempts=1,
        **vendor_settings(fake),
    )
    app = create_app(settings)
    client = await aiohttp_client(app)
    user = User(client, app, await register(client))
    task_id = await run_and_kill(user, settings, fake, services, database)
    assert await app[tasks_key].recover() == 1
    task = await user.task(task_id)
    assert task["status"] == "failed" and task["error"]["code"] == "INTERNAL"
    kinds = services.query(database, "SELECT kind FROM quota_ledger WHERE task_id = %s ORDER BY id", task_id)
    assert [k["kind"] for k in kinds] == ["reserve", "cancel"]
    assert (await user.quota()).available == 5
