"""`run.py` as a new user meets it: bad settings, the start banner, the credits commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

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
