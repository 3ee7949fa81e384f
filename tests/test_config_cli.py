"""`run.py` as a new user meets it: bad settings, the start banner, the credits commands."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.app import create_app
from server.config import Settings
from tests.auth_support import FAST, auth_settings, bearer, register
from tests.conftest import ROOT, run_command
from tests.ports import free_port
from tests.test_process import spawn, terminate, wait_ready

pytestmark = pytest.mark.timeout(60)


def run_py(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`python run.py *args` with only `env` (and a fresh VAR_DIR) in its environment."""
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=tmp_path,  # no .env file here
        env={"PATH": "/usr/bin:/bin", "VAR_DIR": str(tmp_path / "var"), **env},
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )


BAD_SETTINGS = [
    ({"PORT": "abc"}, "PORT must be an integer from 0 to 65535, got 'abc'"),
    ({"PORT": "70000"}, "PORT must be an integer from 0 to 65535, got '70000'"),
    ({"APP_ENV": "production"}, "APP_ENV must be one of dev, test, prod, got 'production'"),
    ({"VENDORS": "{bad"}, "VENDORS must be JSON (Expecting property name"),
    (
        {"VENDORS": '{"a": {"kind": "zzz"}}'},
        "VENDORS: a.kind: input should be 'local', 'dashscope' or 'http'",
    ),
    ({"CRON_ENABLED": "maybe"}, "CRON_ENABLED must be true or false, got 'maybe'"),
    ({"DB_CONNECT_TIMEOUT": "0"}, "DB_CONNECT_TIMEOUT must be a number > 0, got '0'"),
    ({"SIGNUP_CREDITS": "-5"}, "SIGNUP_CREDITS must be an integer from 0 to 100000, got '-5'"),
    ({"LOG_LEVEL": "loud"}, "LOG_LEVEL must be one of TRACE, DEBUG, INFO"),
    ({"DB_POOL_MIN": "30"}, "DB_POOL_MIN must not exceed DB_POOL_MAX"),
    ({"DATABASE_URL": "postgres://u:p@db/wardrobe"}, "DATABASE_URL must start with mysql://"),
    ({"DATABASE_URL": "mysql://u:p@/wardrobe"}, "DATABASE_URL must name a host or a unix_socket"),
    ({"DATABASE_URL": "mysql://u:p@db:99999/wardrobe"}, "DATABASE_URL has a bad port"),
    ({"DATABASE_URL": "mysql://u:p@db:3306/"}, "DATABASE_URL must name one database"),
    ({"REDIS_URL": "http://cache:6379"}, "REDIS_URL must start with redis://, rediss:// or unix://"),
]


@pytest.mark.parametrize(
    ("env", "line"), BAD_SETTINGS, ids=[next(iter(e)) + "=" + next(iter(e.values())) for e, _ in BAD_SETTINGS]
)
def test_a_bad_setting_stops_the_server_with_one_line_naming_the_variable_and_exit_2(
    tmp_path: Path, env: dict[str, str], line: str
) -> None:
    done = run_py(tmp_path, env, "serve")
    assert done.returncode == 2, done
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: {line}"), done.stderr
    assert not (tmp_path / "var").exists()  # nothing was started: no instance, not even its directory


async def test_a_new_account_in_test_can_run_every_seeded_feature_three_times_and_prod_starts_at_zero(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    on = make_settings()  # this test's database and Redis; SIGNUP_CREDITS left unset below
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        app_env="test",
        database_url=on.database_url,
        redis_url=on.redis_url,
        cron_enabled=False,
        shutdown_timeout=1.0,
        **FAST,
    )
    client = await aiohttp_client(create_app(settings))
    me = await register(client)
    quota = await (await client.get("/api/v1/me/quota", headers=bearer(me["access_token"]))).json()
    features = await (await client.get("/api/v1/features", headers=bearer(me["access_token"]))).json()
    assert {f["slug"] for f in features} >= {"tryon-preview", "bg-remove", "multi-style"}
    assert quota["available"] >= 3 * sum(f["cost"] for f in features)

    assert Settings(_env_file=None, app_env="dev").signup_credits == quota["available"]  # type: ignore[call-arg]
    assert Settings(_env_file=None, app_env="prod").signup_credits == 0  # type: ignore[call-arg]
    assert Settings(_env_file=None, app_env="test", signup_credits=7).signup_credits == 7  # type: ignore[call-arg]


async def test_grant_credits_adds_an_adjust_row_beside_the_running_app_and_check_quota_counts_every_user(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    settings = auth_settings(make_settings, cron_enabled=False)
    client = await aiohttp_client(create_app(settings))
    me, other = await register(client), await register(client)  # no credits yet: no quota row

    code, out = await run_command(settings, "check-quota")
    assert code == 0, out
    assert out.strip().endswith("checked 2 user(s): 0 difference(s)")

    code, out = await run_command(
        settings, "grant-credits", "--phone", me["phone"], "--amount", "50", "--reason", "trial"
    )
    assert code == 0, out
    assert "balance 50, reserved 0, available 50" in out
    quota = await (await client.get("/api/v1/me/quota", headers=bearer(me["access_token"]))).json()
    assert quota == {"balance": 50, "reserved": 0, "available": 50}
    ledger = await (await client.get("/api/v1/me/quota/ledger", headers=bearer(me["access_token"]))).json()
    assert [(e["kind"], e["amount"], e["reason"]) for e in ledger["items"]] == [
        ("adjust", 50, "trial (by run.py grant-credits)")
    ]

    code, out = await run_command(
        settings, "grant-credits", "--phone", other["phone"], "--amount", "-1", "--reason", "oops"
    )
    assert code == 2
    assert out.count("\n") == 1 and out.startswith("error: "), out
    code, out = await run_command(
        settings, "grant-credits", "--phone", "13700000000", "--amount", "5", "--reason", "who"
    )
    assert code == 2
    assert out == "error: NOT_FOUND: no user has the phone 137****0000\n"

    code, out = await run_command(settings, "check-quota")
    assert code == 0, out
    assert out.strip().endswith("checked 2 user(s): 0 difference(s)")


def test_the_start_banner_shows_the_demo_and_how_to_get_an_admin(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    port = free_port()
    env = {
        "DATABASE_URL": str(settings.database_url),
        "REDIS_URL": str(settings.redis_url),
        "APP_ENV": "test",
    }
    proc = spawn({**env, "PORT": str(port)})
    try:
        wait_ready(port, proc)
    finally:
        code, _, out = terminate(proc)
    assert code == 0, out
    assert f"try it in the browser http://127.0.0.1:{port}/demo" in out
    assert "run.py create-admin --phone" in out
    assert "new accounts start with 100 credits (SIGNUP_CREDITS)" in out
