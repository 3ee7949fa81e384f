"""Key rotation (issue 13): `run.py rotate-keys` re-wraps every data key under the newest
KEK version while reads go on (none fails), killed half-way and run again it finishes,
a third run changes nothing; then the old version is retired and every record still
decrypts (`check-pii` agrees)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from server.config import Settings
from server.keys import distributors_key
from tests.auth_support import PASSWORD, auth_settings
from tests.conftest import ROOT, Services, run_command
from tests.pii_support import ADMIN_PHONE, admin_with, new_id

ROWS = 120


@pytest.fixture
def ring(tmp_path: Path) -> Path:
    return tmp_path / "keyring.json"


@pytest.fixture
def settings(make_settings: Callable[..., Settings], ring: Path) -> Settings:
    return auth_settings(
        make_settings,
        cron_enabled=False,
        admin_phone=ADMIN_PHONE,
        admin_password=PASSWORD,
        kms_local_keyring=ring,
    )


async def rotate_until_killed(settings: Settings, ring: Path) -> None:
    """rotate-keys, killed (SIGKILL) once its first batch is reported."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "run.py",
        "rotate-keys",
        "--batch",
        "10",
        cwd=ROOT,
        env={
            "DATABASE_URL": str(settings.database_url),
            "REDIS_URL": str(settings.redis_url),
            "KMS_LOCAL_KEYRING": str(ring),
            "PATH": "",
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    async for line in proc.stdout:
        if b"rotate-keys: 10/" in line:
            proc.kill()
            break
    await proc.wait()
    assert proc.returncode == -9


async def test_rotation_online_killed_resumed_idempotent_then_old_version_retired(
    client: TestClient[Any, Any], settings: Settings, ring: Path, services: Services, database: str
) -> None:
    distributors = client.app[distributors_key]
    numbers = {}
    for i in range(ROWS):
        numbers[1000 + i] = new_id()
        await distributors.apply(1000 + i, "钱七", numbers[1000 + i])
    env = {"KMS_LOCAL_KEYRING": str(ring)}
    code, out = await run_command(settings, "kms", "add-version", **env)
    assert code == 0 and "version 2" in out, out

    reader = await admin_with(client, settings, "pii:read")
    failures: list[str] = []
    reads = 0
    done = asyncio.Event()

    async def read_load() -> None:
        nonlocal reads
        while not done.is_set():
            for user_id, number in list(numbers.items())[reads % ROWS :][:5]:
                resp = await client.get(
                    f"/api/v1/admin/distributors/{user_id}/identity",
                    headers={**reader, "X-Access-Reason": "rotation check"},
                )
                body = await resp.json()
                if resp.status != 200 or body["id_card_no"] != number:
                    failures.append(f"{resp.status} {body}")
                reads += 1

    load = asyncio.create_task(read_load())
    try:
        await rotate_until_killed(settings, ring)
        versions = services.query(
            database,
            "SELECT kek_version, COUNT(*) AS n FROM distributors GROUP BY kek_version ORDER BY kek_version",
        )
        assert [v["kek_version"] for v in versions] == ["local:1", "local:2"], versions  # half-way
        code, out = await run_command(settings, "rotate-keys", "--batch", "25", **env)
        assert code == 0, out
        assert "0 failed" in out
    finally:
        done.set()
        await load
    assert failures == [] and reads > 0
    code, out = await run_command(settings, "rotate-keys", **env)
    assert code == 0 and "0 re-wrapped" in out, out  # idempotent
    assert services.query(database, "SELECT DISTINCT kek_version AS v FROM distributors") == [
        {"v": "local:2"}
    ]

    code, out = await run_command(settings, "kms", "retire", "1", **env)
    assert code == 0, out
    code, out = await run_command(settings, "check-pii", "--sample", str(ROWS), **env)
    assert code == 0 and f"{ROWS} sampled, 0 failed, 0 row(s) under retired" in out, out
    for user_id, number in numbers.items():
        resp = await client.get(
            f"/api/v1/admin/distributors/{user_id}/identity", headers={**reader, "X-Access-Reason": "after"}
        )
        assert (await resp.json())["id_card_no"] == number


async def test_check_pii_reports_rows_under_a_retired_version_and_retire_refuses_while_rows_use_it(
    client: TestClient[Any, Any], settings: Settings, ring: Path
) -> None:
    await client.app[distributors_key].apply(7, "孙八", new_id())
    env = {"KMS_LOCAL_KEYRING": str(ring)}
    assert (await run_command(settings, "kms", "add-version", **env))[0] == 0
    code, out = await run_command(settings, "kms", "retire", "1", **env)
    assert code == 2 and "1 row(s) still use local:1" in out, out
    code, out = await run_command(settings, "check-pii", **env)
    assert code == 0 and "KEK local:1: 1 row(s)" in out, out
