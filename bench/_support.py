"""What the benchmark scripts share: ports, CPU pinning, waiting for a server, and the
embedded MariaDB + Redis that server processes run on."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.ports import free_port  # noqa: F401  (the one port helper; the bench scripts import it from here)

ROOT = Path(__file__).resolve().parent.parent


def pin(cpu: int) -> None:
    """Run this process on `cpu` only (with two or more CPUs)."""
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {cpu})


def pin_process(pid: int, cpu: int) -> None:
    """Run every thread of process `pid` on `cpu` (threads it starts later inherit the
    affinity of the thread that starts them)."""
    if (os.cpu_count() or 1) >= 2:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(ProcessLookupError):  # that thread ended meanwhile
                os.sched_setaffinity(int(task.name), {cpu})


def wait_until_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    """Until `url` answers at all (any HTTP status), for up to 60 s; exits if `proc` does."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer")


@dataclass
class Services:
    redis: Any  # server.embedded.EmbeddedRedis (its pid_file, for pinning)
    mariadb: Any  # server.embedded.EmbeddedMariaDB (likewise)
    env: dict[str, str]  # for server processes: test mode, the fresh database, the Redis db
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)  # stopped on the way out


@contextmanager
def services(database: str, redis_db: int) -> Iterator[Services]:
    """Embedded MariaDB and Redis under var/bench with `database` created afresh and Redis db
    `redis_db` emptied. On the way out the processes in `procs` are terminated, then both servers."""
    import pymysql
    import redis as redis_sync

    from server.embedded import EmbeddedMariaDB, EmbeddedRedis, ensure_database

    var = ROOT / "var" / "bench"
    mariadb, redis = EmbeddedMariaDB(var, fast=True), EmbeddedRedis(var, persist=False)
    ready = Services(redis, mariadb, {})
    try:
        mariadb.start()
        redis.start()
        ensure_database(mariadb, database)
        conn = pymysql.connect(unix_socket=str(mariadb.socket), user="root")
        with conn.cursor() as cur:  # a fresh database each run
            cur.execute(f"DROP DATABASE {database}")
            cur.execute(f"CREATE DATABASE {database} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
        conn.close()
        redis_sync.Redis(unix_socket_path=str(redis.socket), db=redis_db).flushdb()
        ready.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_", "ADMIN_"))},
            "APP_ENV": "test",
            "DATABASE_URL": mariadb.url(database),
            "REDIS_URL": redis.url(redis_db),
            "LOG_LEVEL": "WARNING",
            "CRON_ENABLED": "false",
        }
        yield ready
    finally:
        for proc in ready.procs:
            proc.terminate()
            proc.wait(10)
        redis.stop()
        mariadb.stop()
