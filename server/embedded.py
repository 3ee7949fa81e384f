"""Private MariaDB and Redis instances under a directory (`./var` by default).

Used by `run.py` when DATABASE_URL / REDIS_URL are unset, and by the tests. Both
listen on unix sockets only, keep their data in the directory between runs, and
are stopped when their owner exits: cleanly by `stop()`, and by the kernel
(PR_SET_PDEATHSIG) if the owner dies without running it.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from loguru import logger

from server.config import ConfigError

_SBIN = ["/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin"]


def find_binary(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
        for d in _SBIN:
            p = Path(d) / name
            if p.exists() and os.access(p, os.X_OK):
                return str(p)
    return None


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM it when its parent dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _socket_answers(path: Path) -> bool:
    if not path.exists():
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Server:
    name = "server"

    def __init__(self, base: Path) -> None:
        self.base = base.resolve()
        self.run_dir = self.base / "run"
        self.log_dir = self.base / "log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid_file(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    def _stop_stale(self) -> None:
        """A previous owner was killed hard: end the instance it left behind."""
        if not self.pid_file.exists():
            return
        try:
            pid = int(self.pid_file.read_text().strip() or "0")
        except ValueError:
            pid = 0
        if pid and _pid_alive(pid):
            logger.warning("stopping a stale {} (pid {}) left by an earlier run", self.name, pid)
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)

    def _spawn(self, argv: list[str], log_name: str) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / log_name, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - no threads yet at this point
                start_new_session=True,  # a Ctrl-C in the terminal goes to us, not to it
            )
        finally:
            log.close()

    def _wait_ready(self, sock: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ConfigError(
                    f"embedded {self.name} exited with code {self.proc.returncode}; "
                    f"see {self.log_dir / (self.name + '.log')}"
                )
            if _socket_answers(sock):
                return
            time.sleep(0.05)
        self.stop()
        raise ConfigError(f"embedded {self.name} did not answer within {timeout:.0f}s")

    def stop(self, timeout: float = 8.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("embedded {} did not stop in {}s; killing it", self.name, timeout)
            proc.kill()
            proc.wait(5)


class EmbeddedMariaDB(_Server):
    """mariadbd with its data in `<base>/mysql`, reachable only through `<base>/run/mysqld.sock`."""

    name = "mysqld"

    def __init__(self, base: Path, *, fast: bool = False) -> None:
        super().__init__(base)
        self.data_dir = self.base / "mysql"
        self.socket = self.run_dir / "mysqld.sock"
        self.fast = fast  # tests: trade durability for speed

    def url(self, database: str) -> str:
        return f"mysql://root@localhost/{database}?unix_socket={self.socket}"

    def start(self, timeout: float = 60.0) -> None:
        mariadbd = find_binary("mariadbd", "mysqld")
        install_db = find_binary("mariadb-install-db", "mysql_install_db")
        if not mariadbd or not install_db:
            raise ConfigError(
                "MariaDB is not installed: run `apt-get install mariadb-server` (or `make run` as root), "
                "or set DATABASE_URL to an existing MySQL/MariaDB server"
            )
        self._stop_stale()
        user_args = ["--user=root"] if os.geteuid() == 0 else []
        if not (self.data_dir / "mysql").is_dir():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            logger.info("initialising embedded MariaDB in {}", self.data_dir)
            res = subprocess.run(
                [
                    install_db,
                    "--no-defaults",
                    f"--datadir={self.data_dir}",
                    "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                    *user_args,
                ],
                capture_output=True,
                timeout=120,
                check=False,
            )
            if res.returncode != 0:
                shutil.rmtree(self.data_dir, ignore_errors=True)
                raise ConfigError(
                    "mariadb-install-db failed: " + res.stderr.decode(errors="replace").strip()[-500:]
                )
        argv = [
            mariadbd,
            "--no-defaults",
            f"--datadir={self.data_dir}",
            f"--socket={self.socket}",
            f"--pid-file={self.pid_file}",
            "--skip-networking",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_unicode_ci",
            "--default-time-zone=+00:00",
            "--max-connections=500",
            "--innodb-buffer-pool-size=128M",
            f"--log-error={self.log_dir / 'mysqld.log'}",
            *user_args,
        ]
        if self.fast:
            argv += [
                "--innodb-flush-log-at-trx-commit=0",
                "--innodb-doublewrite=0",
                "--sync-binlog=0",
                "--innodb-flush-method=nosync",
            ]
        self._spawn(argv, "mysqld.stdout.log")
        self._wait_ready(self.socket, timeout)
        logger.info("embedded MariaDB ready on {}", self.socket)


class EmbeddedRedis(_Server):
    """redis-server with an append-only file in `<base>/redis`, on `<base>/run/redis.sock`."""

    name = "redis"

    def __init__(self, base: Path, *, persist: bool = True) -> None:
        super().__init__(base)
        self.data_dir = self.base / "redis"
        self.socket = self.run_dir / "redis.sock"
        self.persist = persist

    def url(self, db: int = 0) -> str:
        return f"unix://{self.socket}?db={db}"

    def start(self, timeout: float = 30.0) -> None:
        redis_server = find_binary("redis-server")
        if not redis_server:
            raise ConfigError(
                "Redis is not installed: run `apt-get install redis-server` (or `make run` as root), "
                "or set REDIS_URL to an existing Redis server"
            )
        self._stop_stale()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            redis_server,
            "--port",
            "0",
            "--unixsocket",
            str(self.socket),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.data_dir),
            "--pidfile",
            str(self.pid_file),
            "--daemonize",
            "no",
            "--databases",
            "16",
            "--save",
            "",
            "--appendonly",
            "yes" if self.persist else "no",
            "--appendfsync",
            "everysec",
            "--logfile",
            str(self.log_dir / "redis.log"),
        ]
        self._spawn(argv, "redis.stdout.log")
        self._wait_ready(self.socket, timeout)
        logger.info("embedded Redis ready on {}", self.socket)


def ensure_database(mariadb: EmbeddedMariaDB, name: str) -> None:
    """Create `name` on the embedded server if absent (blocking; before the loop serves)."""
    import pymysql

    conn = pymysql.connect(unix_socket=str(mariadb.socket), user="root", password="", autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(
                f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
            )
    finally:
        conn.close()
