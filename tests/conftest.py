"""Real MariaDB and Redis, started once per test session by the same code `run.py`
uses (server/embedded.py); each test gets its own database and Redis db."""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest
from aiohttp import web, web_app
from aiohttp.test_utils import TestClient
from loguru import logger

from server.app import create_app
from server.config import Settings
from server.embedded import EmbeddedMariaDB, EmbeddedRedis
from tests.fakes.vendor import FakeVendor

ROOT = Path(__file__).resolve().parent.parent


async def run_command(settings: Settings, *args: str, **env: str) -> tuple[int, str]:
    """`python run.py *args` on this test's database and Redis (plus `env`): exit code, output."""
    database = {"DATABASE_URL": str(settings.database_url), "REDIS_URL": str(settings.redis_url)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "run.py",
        *args,
        cwd=ROOT,
        env={**database, "PATH": "", **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


_redis_db = itertools.count(1)


class Services:
    def __init__(self, mariadb: EmbeddedMariaDB, redis: EmbeddedRedis) -> None:
        self.mariadb = mariadb
        self.redis = redis

    def admin_conn(self) -> pymysql.Connection[Any]:
        return pymysql.connect(
            unix_socket=str(self.mariadb.socket), user="root", password="", autocommit=True
        )

    def create_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        conn = self.admin_conn()
        try:
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
        finally:
            conn.close()
        return name

    def drop_database(self, name: str) -> None:
        conn = self.admin_conn()
        try:
            with conn.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        finally:
            conn.close()

    def query(self, database: str, sql: str, *args: Any) -> list[dict[str, Any]]:
        """Read the database behind the app's back, as an operator would."""
        conn = pymysql.connect(
            unix_socket=str(self.mariadb.socket),
            user="root",
            password="",
            database=database,
            autocommit=True,
            cursorclass=pymysql.cursors.DictCursor,
        )
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args or None)
                return list(cur.fetchall())
        finally:
            conn.close()


@pytest.fixture(scope="session", autouse=True)
def _freeze_imported_heap() -> None:
    """Move what the session starts with (every imported module, the collected tests) out
    of the garbage collector's reach, as `run.py serve` does after start-up
    (server/app.py `freeze_heap`). Full collections then scan only what the tests make.
    Before, one took ~0.5 s on this 2-vCPU VM, long enough to fire a test's timeouts."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _forget_finished_apps() -> Iterator[None]:
    """After each test, empty aiohttp's cache of built middleware chains.

    aiohttp keeps them in a process-wide `lru_cache(maxsize=1024)` keyed on (handler, apps)
    (`aiohttp.web_app._cached_build_middleware`). A server builds its app once, so that is
    harmless there. A test session builds one or more apps per test, though, and each
    cached entry kept its finished app alive, with its routes, metrics registry and
    clients. The session's heap grew to ~1.3 M objects, and a full garbage collection
    took up to 3 s. One such pause, inside tests/test_ws.py, made all of a test's Redis
    publishes time out at once. The cache is private to aiohttp, hence the `getattr`; the
    same fix is home-assistant/supervisor#7196."""
    yield
    cache = getattr(web_app, "_cached_build_middleware", None)
    if cache is not None:
        cache.cache_clear()


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    base = Path(os.environ.get("WARDROBE_TEST_VAR") or tmp_path_factory.mktemp("services"))
    mariadb = EmbeddedMariaDB(base, fast=True)
    redis = EmbeddedRedis(base, persist=False)
    mariadb.start()
    redis.start()
    try:
        yield Services(mariadb, redis)
    finally:
        redis.stop()
        mariadb.stop()


@pytest.fixture
def database(services: Services) -> Iterator[str]:
    name = services.create_database()
    yield name
    services.drop_database(name)


@pytest.fixture
def aiohttp_client(database: str, aiohttp_client: Any) -> Any:
    """pytest-aiohttp's factory, set up after this test's database so that it is torn
    down first: every app it started is closed (its cleanup_ctx awaited: actors, task
    jobs, cron runs, listeners) before the database is dropped. Without this, pytest
    dropped the database first and the apps' teardown, and whatever they still ran,
    met `Unknown database 't_…'` (issue 10, defect 11). The order of the two
    arguments is the order of set-up."""
    return aiohttp_client


@pytest.fixture
def make_settings(services: Services, database: str) -> Callable[..., Settings]:
    """Settings for an app on this test's database and Redis db; keywords override."""
    redis_db = next(_redis_db) % 16
    import redis as redis_sync

    client = redis_sync.Redis(unix_socket_path=str(services.redis.socket), db=redis_db)
    client.flushdb()
    client.close()

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "app_env": "test",
            "database_url": services.mariadb.url(database),
            "redis_url": services.redis.url(redis_db),
            "var_dir": ROOT / "var" / "test",
            "db_pool_max": 10,
            "shutdown_timeout": 1.0,
            "signup_credits": 0,  # tests count credits from zero; the dev/test default is 100
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def app(settings: Settings) -> web.Application:
    return create_app(settings)


@pytest.fixture
async def client(aiohttp_client: Any, app: web.Application) -> AsyncIterator[TestClient[Any, Any]]:
    yield await aiohttp_client(app)


@pytest.fixture
async def fake(aiohttp_server: Any) -> FakeVendor:
    """An in-process fake AI vendor (tests/fakes/vendor.py), running."""
    fake = FakeVendor()
    server = await aiohttp_server(fake.app())
    fake.base_url = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """Everything loguru writes during the test, formatted with tracebacks."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG", format="{message}\n{exception}")
    yield lines
    logger.remove(sink)


@pytest.fixture
def make_prod_settings(make_settings: Callable[..., Settings], tmp_path: Path) -> Callable[..., Settings]:
    """Settings with APP_ENV=prod on this test's database: prod also wants a key ring file
    of its own (mode 0600) for the personal data, as an operator would provide."""
    from server.pii.kms import KeyRing

    ring = tmp_path / "prod-keyring.json"
    KeyRing(ring).create_if_missing()
    ring.chmod(0o600)

    def make(**overrides: Any) -> Settings:
        return make_settings(app_env="prod", kms_local_keyring=ring, **overrides)

    return make
