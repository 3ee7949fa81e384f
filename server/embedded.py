"""Private MariaDB and Redis instances under a directory (`./var` by default).

Used by `run.py` when DATABASE_URL / REDIS_URL are unset, and by the tests. Both
listen on unix sockets only, keep their data in the directory between runs, and
are stopped when their owner exits: cleanly by `stop()`, and by the kernel
(PR_SET_PDEATHSIG) if the owner dies without running it.

The owner is the one process that starts them: it holds an `flock` on
`<base>/run/owner.lock` for its whole life (`VarDirLock`), and the kernel drops
the lock when it dies. Only a process holding that lock starts the instances or
stops what a pid file names, so a live owner's instances are never touched; any
other process uses them through their sockets.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

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
    """True while `pid` runs; a zombie (dead, not yet reaped by its parent) is not alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _runs_on(pid: int, base: Path) -> bool:
    """Whether the command line of `pid` names `base` (a pid file may outlive its process)."""
    try:
        return str(base).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class Owner:
    """What the owner of a VAR_DIR wrote in its lock file."""

    pid: int
    command: str
    ready: tuple[str, ...]  # the instances it runs, once all answer (empty while it starts them)


class VarDirLock:
    """The ownership of one directory's embedded instances: an `flock` held for the owner's life.

    One object per directory and process (`of()`); `acquire()`/`release()` nest, so
    `run.py` and each `_Server.start()` of the same process share one lock."""

    _mine: ClassVar[dict[Path, VarDirLock]] = {}

    def __init__(self, base: Path) -> None:
        self.base = base.resolve()
        self.path = self.base / "run" / "owner.lock"
        self._fd: int | None = None
        self._depth = 0
        self._command = "embedded"
        self._ready: list[str] = []

    @classmethod
    def of(cls, base: Path) -> VarDirLock:
        base = base.resolve()
        if base not in cls._mine:
            cls._mine[base] = cls(base)
        return cls._mine[base]

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, command: str | None = None) -> bool:
        """Take the lock without waiting; False while another live process holds it."""
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            self._fd, self._ready = fd, []
            if command:
                self._command = command
            self._write()
        self._depth += 1
        return True

    def release(self) -> None:
        self._depth -= 1
        if self._depth <= 0 and self._fd is not None:
            fd, self._fd, self._depth = self._fd, None, 0
            os.close(fd)  # drops the flock

    def mark_ready(self, names: list[str]) -> None:
        """Tell other processes which instances run and answer: they may use them now."""
        self._ready = list(names)
        self._write()

    def _write(self) -> None:
        assert self._fd is not None
        data = json.dumps({"pid": os.getpid(), "command": self._command, "ready": self._ready}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def owner(self) -> Owner | None:
        """The live process holding the lock, as it described itself; None when nobody holds
        it, or while a new owner has not written its description yet."""
        if self.held:
            return Owner(os.getpid(), self._command, tuple(self._ready))
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # held: somebody owns it
            else:
                return None  # free: the last owner is dead
            raw = os.pread(fd, 4096, 0)
        finally:
            os.close(fd)
        try:
            data = json.loads(raw)
            owner = Owner(int(data["pid"]), str(data["command"]), tuple(data["ready"]))
        except (ValueError, KeyError, TypeError):
            return None
        return owner if _pid_alive(owner.pid) else None


class _Server:
    name = "server"

    def __init__(self, base: Path) -> None:
        self.base = base.resolve()
        self.run_dir = self.base / "run"
        self.log_dir = self.base / "log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock: VarDirLock | None = None

    @property
    def pid_file(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    def _claim(self) -> None:
        """Own the directory (see VarDirLock) before starting anything in it."""
        lock = VarDirLock.of(self.base)
        if not lock.acquire():
            owner = lock.owner()
            who = f"{owner.command} (pid {owner.pid})" if owner else "another process"
            raise ConfigError(f"{self.base} is in use by {who}: its embedded servers are not ours to start")
        self._lock = lock

    def _unclaim(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def _stop_stale(self) -> None:
        """A previous owner died without stopping its instance: end it. Only an owner calls this,
        so the process a pid file names is never a live owner's child."""
        if not self.pid_file.exists():
            return
        try:
            pid = int(self.pid_file.read_text().strip() or "0")
        except ValueError:
            pid = 0
        if pid and _pid_alive(pid) and _runs_on(pid, self.base):
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
        try:
            if proc is None or proc.poll() is not None:
                return
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("embedded {} did not stop in {}s; killing it", self.name, timeout)
                proc.kill()
                proc.wait(5)
        finally:
            self._unclaim()  # after it has stopped: the next owner finds nothing of ours running


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
        self._claim()
        try:
            self._start(mariadbd, install_db, timeout)
        except BaseException:
            self.stop()
            raise
        logger.info("embedded MariaDB ready on {}", self.socket)

    def _start(self, mariadbd: str, install_db: str, timeout: float) -> None:
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
        self._claim()
        try:
            self._start(redis_server, timeout)
        except BaseException:
            self.stop()
            raise
        logger.info("embedded Redis ready on {}", self.socket)

    def _start(self, redis_server: str, timeout: float) -> None:
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
