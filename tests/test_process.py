"""`run.py` as a real process: concurrent start, SIGTERM, embedded servers, restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pymysql
import pytest

from tests.conftest import ROOT, Services
from tests.ports import free_port

pytestmark = pytest.mark.timeout(120)


def spawn(env_extra: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_", "ADMIN_"))}
    env.update({"APP_ENV": "test", "HOST": "127.0.0.1", "SHUTDOWN_TIMEOUT": "2", **env_extra})
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise AssertionError(f"server exited with {proc.returncode}:\n{out}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become ready")


def terminate(proc: subprocess.Popen[bytes]) -> tuple[int, float, str]:
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return proc.returncode, time.monotonic() - started, out.decode()


def our_servers(var_dir: Path) -> list[str]:
    """mariadbd / redis-server processes whose command line names this var dir."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(var_dir) in cmd and ("mariadbd" in cmd or "redis-server" in cmd):
            found.append(cmd)
    return found


def test_two_processes_started_at_once_on_an_empty_database_both_serve_and_migrate_once(
    services: Services, database: str
) -> None:
    env = {"DATABASE_URL": services.mariadb.url(database), "REDIS_URL": services.redis.url(15)}
    ports = [free_port(), free_port()]
    procs = [spawn({**env, "PORT": str(p)}) for p in ports]
    try:
        for port, proc in zip(ports, procs, strict=True):
            wait_ready(port, proc)
        rows = services.query(database, "SELECT version FROM schema_migrations")
        assert len(rows) == len(list((ROOT / "sql").glob("*.sql")))
    finally:
        outputs = [terminate(p) for p in procs]
    applying = [out.count("applying migration 0001_users.sql") for _, _, out in outputs]
    assert sorted(applying) == [0, 1], outputs
    for code, elapsed, out in outputs:
        assert code == 0, out
        assert elapsed < 10


def test_sigterm_on_embedded_servers_exits_0_within_10s_and_a_restart_keeps_the_data(tmp_path: Path) -> None:
    var_dir = tmp_path / "var"
    port = free_port()
    env = {
        "VAR_DIR": str(var_dir),
        "PORT": str(port),
        "ADMIN_PHONE": "13800138000",
        "ADMIN_PASSWORD": "adminpass1",
    }
    proc = spawn(env)
    try:
        wait_ready(port, proc, timeout=90)
        assert len(our_servers(var_dir)) == 2
    finally:
        code, elapsed, out = terminate(proc)
    assert code == 0, out
    assert elapsed < 10, elapsed
    assert our_servers(var_dir) == []

    proc = spawn({"VAR_DIR": str(var_dir), "PORT": str(port)})
    try:
        wait_ready(port, proc, timeout=90)
        conn: Any = pymysql.connect(
            unix_socket=str(var_dir / "run" / "mysqld.sock"), user="root", database="wardrobe"
        )
        with conn.cursor() as cur:
            cur.execute("SELECT role FROM users WHERE phone = '13800138000'")
            assert cur.fetchall() == (("admin",),)
        conn.close()
    finally:
        code, elapsed, out = terminate(proc)
    assert code == 0, out
    assert our_servers(var_dir) == []


def test_a_killed_server_takes_its_embedded_servers_with_it(tmp_path: Path) -> None:
    var_dir = tmp_path / "var"
    port = free_port()
    proc = spawn({"VAR_DIR": str(var_dir), "PORT": str(port)})
    wait_ready(port, proc, timeout=90)
    proc.kill()
    proc.communicate()
    deadline = time.monotonic() + 15
    while our_servers(var_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert our_servers(var_dir) == []


def test_prod_with_a_default_secret_refuses_to_start_with_one_clear_line() -> None:
    proc = spawn({"APP_ENV": "prod", "PORT": str(free_port())})
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert b"JWT_SECRET" in out and b"DATABASE_URL" in out


def run_cli(env_extra: dict[str, str], *args: str) -> tuple[int, float, str]:
    """`run.py *args` to the end: exit code, seconds taken, output."""
    started = time.monotonic()
    proc = spawn(env_extra, *args)
    out, _ = proc.communicate(timeout=100)
    return proc.returncode, time.monotonic() - started, out.decode()


def server_pids(var_dir: Path) -> dict[str, int]:
    return {name: int((var_dir / "run" / f"{name}.pid").read_text()) for name in ("mysqld", "redis")}


def call(port: int, method: str, path: str, body: dict[str, Any] | None = None, token: str = "") -> Any:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {token}"} if token else {}),
        },
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def test_commands_on_the_var_dir_of_a_live_server_use_its_instances_and_a_second_serve_refuses(
    tmp_path: Path,
) -> None:
    var_dir = tmp_path / "var"
    port = free_port()
    env = {"VAR_DIR": str(var_dir), "ADMIN_PHONE": "13800138000", "ADMIN_PASSWORD": "adminpass1"}
    proc = spawn({**env, "PORT": str(port)})
    try:
        wait_ready(port, proc, timeout=90)
        pids = server_pids(var_dir)
        token = call(port, "POST", "/auth/login", {"phone": "13800138000", "password": "adminpass1"})[
            "access_token"
        ]
        assert call(port, "GET", "/me", token=token)["role"] == "admin"

        code, took_admin, out = run_cli(
            env, "create-admin", "--phone", "13900139000", "--password", "secondpass2"
        )
        assert code == 0, out
        assert "created admin user" in out
        code, took_check, out = run_cli(env, "check-quota")
        assert code == 0, out
        assert "checked 2 user(s)" in out
        print(f"create-admin {took_admin:.2f} s, check-quota {took_check:.2f} s beside a live server")

        code, _, out = run_cli({**env, "PORT": str(free_port())}, "serve")
        assert code == 2
        assert out.count("\n") == 1 and f"pid {proc.pid}" in out, out

        assert server_pids(var_dir) == pids
        assert call(port, "GET", "/me", token=token)["role"] == "admin"
        second = call(port, "POST", "/auth/login", {"phone": "13900139000", "password": "secondpass2"})
        assert call(port, "GET", "/me", token=second["access_token"])["role"] == "admin"
    finally:
        code, _, out = terminate(proc)
    assert code == 0, out
    assert our_servers(var_dir) == []


def test_leftovers_of_a_dead_owner_are_stopped_by_the_next_command(
    tmp_path: Path, services: Services, database: str
) -> None:
    var_dir = tmp_path / "var"
    (var_dir / "run").mkdir(parents=True)
    # what a server killed before its children got the parent-death signal leaves: a pid file
    # naming a live process that runs on this VAR_DIR, and no owner holding the lock
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(var_dir)])
    (var_dir / "run" / "redis.pid").write_text(f"{leftover.pid}\n")
    try:
        env = {
            "VAR_DIR": str(var_dir),
            "DATABASE_URL": services.mariadb.url(database),
        }  # an embedded Redis only
        code, _, out = run_cli(env, "migrate", "--status")
        assert code == 0, out
        assert f"stopping a stale redis (pid {leftover.pid})" in out
        assert leftover.wait(timeout=5) == -signal.SIGTERM
    finally:
        leftover.kill()
        leftover.wait()
    assert our_servers(var_dir) == []
