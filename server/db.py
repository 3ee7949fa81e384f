"""MySQL access: one aiomysql pool per process, explicit SQL, explicit transactions.

    row = await db.fetchone("SELECT id FROM users WHERE phone = %s", phone)
    async with db.transaction() as tx:
        await tx.execute("UPDATE ...", ...)

Acquiring a connection waits at most `DB_ACQUIRE_TIMEOUT` seconds, then answers
BUSY (503) instead of queueing without bound. A server that cannot be reached, or
that drops the connection, is UNAVAILABLE (503); the pool drops the dead connections
and opens new ones once the server is back.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import Any, Literal

import aiomysql
import pymysql
from loguru import logger

from server.config import DatabaseURL, Settings
from server.errors import Busy, Unavailable
from server.metrics import Metrics

Row = dict[str, Any]
Isolation = Literal["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"]

SQL_MODE = (
    "STRICT_TRANS_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION"
)
INIT_COMMAND = f"SET time_zone = '+00:00', sql_mode = '{SQL_MODE}', innodb_lock_wait_timeout = 5"

# Error numbers that mean "try the whole transaction again".
DEADLOCK = 1213
LOCK_WAIT_TIMEOUT = 1205
DUPLICATE_KEY = 1062

# Error numbers that mean "the server is not there": cannot connect (2002, 2003, also
# a connect timeout), gone away or lost mid-query (2006, 2013, 2055), shutting down
# (1053), the connection killed (1927) or timed out by the server (4031).
UNREACHABLE = frozenset({2002, 2003, 2006, 2013, 2055, 1053, 1927, 4031})


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, pymysql.err.OperationalError) and exc.args[:1] in (
        (DEADLOCK,),
        (LOCK_WAIT_TIMEOUT,),
    )


def is_duplicate(exc: BaseException) -> bool:
    return isinstance(exc, pymysql.err.IntegrityError) and exc.args[:1] == (DUPLICATE_KEY,)


def is_unreachable(exc: BaseException) -> bool:
    """The server could not be reached or the connection broke (not a bad statement)."""
    if isinstance(exc, pymysql.err.InterfaceError):  # a connection already closed
        return True
    return isinstance(exc, pymysql.err.OperationalError) and bool(exc.args) and exc.args[0] in UNREACHABLE


class Conn:
    """A connection (inside or outside a transaction) with the three query shapes."""

    def __init__(self, conn: aiomysql.Connection) -> None:
        self.raw = conn

    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; returns the affected row count (`lastrowid` via `insert`)."""
        async with self.raw.cursor() as cur:
            return int(await cur.execute(sql, args or None))

    async def insert(self, sql: str, *args: Any) -> int:
        """Run an INSERT; returns the new AUTO_INCREMENT id."""
        async with self.raw.cursor() as cur:
            await cur.execute(sql, args or None)
            return int(cur.lastrowid)

    def format(self, sql: str, *args: Any) -> str:
        """`sql` with `args` escaped into it exactly as `execute` would send it, for
        `execute_all`."""
        return sql % tuple(self.raw.escape(a) for a in args) if args else sql

    async def execute_all(self, statements: Sequence[str]) -> list[int]:
        """Run statements (already `format`ted) in ONE round trip, in order (the
        connection allows multi-statements); returns each one's affected row count.
        The first failing statement raises, and those after it do not run."""
        return [count async for count in self.execute_each(statements)]

    async def execute_each(self, statements: Sequence[str]) -> AsyncGenerator[int, None]:
        """`execute_all`, each statement's affected row count as it is read: a caller
        learns which statements ran before the one that raised (GroupExecute)."""
        async with self.raw.cursor() as cur:
            yield int(await cur.execute("; ".join(statements)))
            while await cur.nextset():
                yield int(cur.rowcount)

    async def fetch_sets(self, statements: Sequence[str]) -> list[list[Row]]:
        """Like `execute_all`, but returns each statement's rows ([] for one without)."""
        async with self.raw.cursor(aiomysql.DictCursor) as cur:
            await cur.execute("; ".join(statements))
            sets: list[list[Row]] = [list(await cur.fetchall())]
            while await cur.nextset():
                sets.append(list(await cur.fetchall()))
            return sets

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        async with self.raw.cursor() as cur:
            return int(await cur.executemany(sql, rows))

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        async with self.raw.cursor(aiomysql.DictCursor) as cur:
            await cur.execute(sql, args or None)
            row: Row | None = await cur.fetchone()
            return row

    async def fetchall(self, sql: str, *args: Any) -> list[Row]:
        async with self.raw.cursor(aiomysql.DictCursor) as cur:
            await cur.execute(sql, args or None)
            rows: list[Row] = list(await cur.fetchall())
            return rows

    async def fetchval(self, sql: str, *args: Any) -> Any:
        async with self.raw.cursor() as cur:
            await cur.execute(sql, args or None)
            row = await cur.fetchone()
            return None if row is None else row[0]


class _Connection:
    """What `Database.connection()` answers: acquire (bounded by DB_ACQUIRE_TIMEOUT when the
    pool is empty), map a lost server to Unavailable, always release. A class rather
    than a generator-based context manager: it is on every statement's path."""

    __slots__ = ("db", "raw")

    def __init__(self, db: Database) -> None:
        self.db = db

    async def __aenter__(self) -> Conn:
        self.raw = await self.db._acquire()
        return Conn(self.raw)

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        # aiomysql closes a connection released in the middle of a transaction, and the
        # pool drops one whose server went away.
        self.db.pool.release(self.raw)
        if exc is not None and isinstance(exc, Exception) and is_unreachable(exc):
            raise Unavailable("The database", exc) from exc


class Database:
    def __init__(self, pool: aiomysql.Pool, settings: Settings, metrics: Metrics) -> None:
        self.pool = pool
        self._acquire_timeout = settings.db.acquire_timeout
        self._metrics = metrics
        self._waiting = 0
        metrics.watch_pool(self.pool_stats)

    @classmethod
    async def connect(cls, url: DatabaseURL, settings: Settings, metrics: Metrics) -> Database:
        where: dict[str, Any] = (
            {"unix_socket": url.unix_socket} if url.unix_socket else {"host": url.host, "port": url.port}
        )
        pool = await aiomysql.create_pool(
            minsize=settings.db.pool_min,
            maxsize=settings.db.pool_max,
            pool_recycle=settings.db.pool_recycle,
            connect_timeout=settings.db.connect_timeout,
            user=url.user,
            password=url.password,
            db=url.database,
            charset="utf8mb4",
            autocommit=True,
            init_command=INIT_COMMAND,
            **where,
        )
        return cls(pool, settings, metrics)

    def pool_stats(self) -> dict[str, int]:
        size = int(self.pool.size)
        free = int(self.pool.freesize)
        return {
            "size": size,
            "free": free,
            "in_use": size - free,
            "waiting": self._waiting,
            "max": int(self.pool.maxsize),
        }

    async def close(self) -> None:
        self.pool.close()
        await self.pool.wait_closed()

    def connection(self) -> _Connection:
        """`async with db.connection() as conn:` a pooled connection for a few statements."""
        return _Connection(self)

    async def _acquire(self) -> aiomysql.Connection:
        started = time.perf_counter()
        try:
            if self.pool.freesize:  # one is free: acquire takes it without waiting
                return await self.pool.acquire()
            self._waiting += 1
            try:
                async with asyncio.timeout(self._acquire_timeout):
                    return await self.pool.acquire()
            except TimeoutError:
                self._metrics.db_acquire_timeouts.inc()
                raise Busy("Database pool exhausted, retry shortly") from None
            finally:
                self._waiting -= 1
        except Exception as exc:
            if is_unreachable(exc):
                raise Unavailable("The database", exc) from exc
            raise
        finally:
            self._metrics.db_acquire.observe(time.perf_counter() - started)

    @asynccontextmanager
    async def transaction(self, isolation: Isolation | None = None) -> AsyncIterator[Conn]:
        """BEGIN … COMMIT, or ROLLBACK on any exception (cancellation included).

        `isolation="READ COMMITTED"` suits transactions that serialise on one locked
        row: no gap locks, so concurrent inserts of other keys cannot deadlock them."""
        async with self.connection() as conn:
            if isolation is not None:
                # One round trip for both (the connection allows multi-statements): the
                # level applies to the transaction this BEGIN starts, and to it alone.
                await conn.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}; BEGIN")
            else:
                await conn.raw.begin()
            try:
                yield conn
            except BaseException:
                try:
                    await asyncio.shield(conn.raw.rollback())
                except Exception:  # the connection is broken; release() closes it
                    conn.raw.close()
                raise
            await conn.raw.commit()

    async def execute(self, sql: str, *args: Any) -> int:
        async with self.connection() as c:
            return await c.execute(sql, *args)

    async def insert(self, sql: str, *args: Any) -> int:
        async with self.connection() as c:
            return await c.insert(sql, *args)

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        async with self.connection() as c:
            return await c.fetchone(sql, *args)

    async def fetchall(self, sql: str, *args: Any) -> list[Row]:
        async with self.connection() as c:
            return await c.fetchall(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        async with self.connection() as c:
            return await c.fetchval(sql, *args)

    async def ping(self) -> None:
        await self.fetchval("SELECT 1")


class GroupExecute:
    """One statement, run for many callers: the calls made while a round trip is out
    go together in the next one (multi-statement, as `Conn.execute_all`), at most
    `most` a round trip. A group commit for INSERTs of independent rows (orders): at 50
    concurrent buyers a round carried 7 on average, and the event loop spent 0.10 ms
    less an order (bench/RESULTS.md, "Ninth sitting").

    Each caller gets what `Database.execute` would have given it: its statement's
    affected row count, or the error its own statement (or its arguments, which cannot
    be escaped) raised. Each statement still commits on its own (autocommit), so sharing
    a round trip changes no outcome. The
    server stops a multi-statement at the first statement that fails; the ones after it
    go into the next round. An error that is not a statement's (the pool is exhausted,
    the server went away) reaches every caller of that round, as it would each of them
    alone. A caller cancelled before its round is sent is left out of it; one cancelled
    after may still have its row written, as with `execute`.

    One round trip is out at a time, as in any group commit: a statement that waits for
    a lock holds up the calls behind it. Use it for statements that take no lock another
    transaction holds for long (an order's INSERT: its keys are new, and every other
    write of `orders` is a short transaction)."""

    def __init__(self, db: Database, sql: str, *, most: int = 50) -> None:
        self._db = db
        self._sql = sql
        self._most = most
        self._waiting: deque[tuple[tuple[Any, ...], asyncio.Future[int]]] = deque()
        self._runner: asyncio.Task[None] | None = None
        self.rounds = 0  # rounds tried, and statements sent in them (tests)
        self.statements = 0

    async def __call__(self, *args: Any) -> int:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._waiting.append((args, future))
        if self._runner is None:
            # Its own context: its log lines are not the first caller's request's.
            self._runner = loop.create_task(self._run(), context=contextvars.Context())
        return await future

    async def _run(self) -> None:
        batch: list[tuple[tuple[Any, ...], asyncio.Future[int]]] = []
        try:
            while self._waiting:
                batch = []
                while self._waiting and len(batch) < self._most:
                    args, future = self._waiting.popleft()
                    if not future.done():  # a caller cancelled before its round
                        batch.append((args, future))
                if batch:
                    await self._round(batch)
        except BaseException:  # cancelled with the loop: nobody may wait for ever
            for _, future in [*batch, *self._waiting]:
                future.cancel()
            self._waiting.clear()
            raise
        finally:
            self._runner = None

    async def _round(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[int]]]) -> None:
        self.rounds += 1
        sent: list[tuple[tuple[Any, ...], asyncio.Future[int]]] = []
        done = 0  # statements answered so far, in order
        try:
            async with self._db.connection() as conn:
                statements = []
                for args, future in batch:
                    try:
                        statements.append(conn.format(self._sql, *args))
                    except Exception as exc:  # arguments that cannot be escaped: that caller's error
                        _fail(future, exc)
                        continue
                    sent.append((args, future))
                if not sent:
                    return
                self.statements += len(sent)
                async with aclosing(conn.execute_each(statements)) as counts:
                    async for count in counts:
                        _answer(sent[done][1], count)
                        done += 1
        except Exception as exc:
            if not sent:  # no connection: the whole round's error
                sent = batch
            if done == len(sent):  # every caller has its answer: the error is the connection's
                logger.warning("after a round of {} statements: {!r}", done, exc)
            elif isinstance(exc, pymysql.err.MySQLError) and not is_unreachable(exc):
                # Statement `done` failed: its caller gets the error; those after it did
                # not run, and go first into the next round.
                _fail(sent[done][1], exc)
                self._waiting.extendleft(reversed(sent[done + 1 :]))
            else:
                for _, future in sent[done:]:
                    _fail(future, exc)


def _answer(future: asyncio.Future[int], count: int) -> None:
    if not future.done():
        future.set_result(count)


def _fail(future: asyncio.Future[int], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
