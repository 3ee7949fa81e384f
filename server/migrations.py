"""Numbered SQL migrations in `sql/NNNN_name.sql`, applied in order, once.

Each applied file is recorded in `schema_migrations` with its SHA-256; a file
edited after it was applied is refused. A MySQL named lock (GET_LOCK) makes two
processes starting at once apply them one after the other: the second finds
nothing left to do. The SQL must run on MariaDB 10.11 and MySQL 8 alike.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from server.config import ROOT
from server.db import Conn, Database

SQL_DIR = ROOT / "sql"
FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
LOCK_TIMEOUT_S = 120

CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INT NOT NULL PRIMARY KEY,
    name VARCHAR(200) NOT NULL,
    checksum CHAR(64) NOT NULL,
    applied_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
"""


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    path: Path
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def split_statements(sql: str) -> list[str]:
    """Split on `;` outside quotes and comments."""
    out: list[str] = []
    buf: list[str] = []
    i, n = 0, len(sql)
    quote: str | None = None
    while i < n:
        ch = sql[i]
        if quote:
            buf.append(ch)
            if ch == "\\" and i + 1 < n:
                buf.append(sql[i + 1])
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch in "'\"`":
            quote = ch
            buf.append(ch)
        elif (ch == "-" and sql.startswith("-- ", i)) or ch == "#":
            end = sql.find("\n", i)
            i = n if end < 0 else end
            continue
        elif ch == "/" and sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            i = n if end < 0 else end + 2
            continue
        elif ch == ";":
            stmt = "".join(buf).strip()
            if stmt:
                out.append(stmt)
            buf = []
        else:
            buf.append(ch)
        i += 1
    tail = "".join(buf).strip()
    if tail:
        out.append(tail)
    return out


def discover(sql_dir: Path = SQL_DIR) -> list[Migration]:
    found: list[Migration] = []
    seen: dict[int, Path] = {}
    for path in sorted(sql_dir.glob("*.sql")):
        m = FILE_RE.match(path.name)
        if not m:
            raise MigrationError(f"{path.name}: migration files are named NNNN_lower_snake.sql")
        version = int(m.group(1))
        if version in seen:
            raise MigrationError(f"{path.name} and {seen[version].name} share version {version}")
        seen[version] = path
        found.append(Migration(version, m.group(2), path, path.read_text(encoding="utf-8")))
    return found


@dataclass(frozen=True, slots=True)
class Status:
    applied: list[int]
    pending: list[Migration]


class Migrator:
    def __init__(self, db: Database, sql_dir: Path = SQL_DIR) -> None:
        self.db = db
        self.migrations = discover(sql_dir)

    async def _applied(self, conn: Conn) -> dict[int, str]:
        if not await self._table_exists(conn):
            await conn.execute(CREATE_TABLE)
        rows = await conn.fetchall("SELECT version, checksum FROM schema_migrations ORDER BY version")
        return {int(r["version"]): str(r["checksum"]) for r in rows}

    def _check(self, applied: dict[int, str]) -> list[Migration]:
        known = {m.version: m for m in self.migrations}
        for version, checksum in applied.items():
            mig = known.get(version)
            if mig is None:
                raise MigrationError(
                    f"the database has migration {version:04d} that this code does not know: "
                    "is this an older checkout than the one that migrated it?"
                )
            if mig.checksum != checksum:
                raise MigrationError(
                    f"{mig.path.name} was edited after it was applied (checksum differs); "
                    "add a new migration instead of changing an applied one"
                )
        return [m for m in self.migrations if m.version not in applied]

    @staticmethod
    async def _table_exists(conn: Conn) -> bool:
        # Checked first: CREATE TABLE IF NOT EXISTS on an existing table raises a note
        # that pymysql turns into a Warning.
        n = await conn.fetchval(
            "SELECT COUNT(*) FROM information_schema.tables "
            "WHERE table_schema = DATABASE() AND table_name = 'schema_migrations'"
        )
        return bool(n)

    async def status(self) -> Status:
        async with self.db.connection() as conn:
            applied = await self._applied(conn)
        return Status(sorted(applied), self._check(applied))

    async def pending(self) -> list[Migration]:
        """Pending migrations without creating anything (for /readyz)."""
        async with self.db.connection() as conn:
            if not await self._table_exists(conn):
                return list(self.migrations)
            rows = await conn.fetchall("SELECT version, checksum FROM schema_migrations")
        return self._check({int(r["version"]): str(r["checksum"]) for r in rows})

    async def migrate(self) -> list[Migration]:
        """Apply every pending migration under a named lock; returns those this call applied."""
        done: list[Migration] = []
        async with self.db.connection() as conn:
            lock = f"wardrobe_migrate_{await conn.fetchval('SELECT DATABASE()')}"[:64]
            got = await conn.fetchval("SELECT GET_LOCK(%s, %s)", lock, LOCK_TIMEOUT_S)
            if got != 1:
                raise MigrationError(f"another process held the migration lock for {LOCK_TIMEOUT_S}s")
            try:
                for mig in self._check(await self._applied(conn)):
                    logger.info("applying migration {}", mig.path.name)
                    try:
                        for stmt in split_statements(mig.sql):
                            await conn.execute(stmt)
                    except Exception as exc:
                        raise MigrationError(f"{mig.path.name} failed: {exc}") from exc
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                        mig.version,
                        mig.name,
                        mig.checksum,
                    )
                    done.append(mig)
            finally:
                await conn.fetchval("SELECT RELEASE_LOCK(%s)", lock)
        return done
