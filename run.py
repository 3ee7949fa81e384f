"""Wardrobe Server command line.

    python run.py [serve] [--host H] [--port P]   serve the API (default)
    python run.py migrate [--status]               apply (or list) database migrations
    python run.py create-admin --phone P --password W
    python run.py check-quota                      verify balances against the ledger
    python run.py check-orders                     verify paid orders against their grants
    python run.py clean-files [--dry-run]          delete storage objects nothing refers to

With no DATABASE_URL / REDIS_URL, private MariaDB and Redis servers are started
under ./var for the life of the command.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from loguru import logger
from pydantic import ValidationError

from server.config import ConfigError, Settings, load_settings
from server.errors import AppError
from server.logging import setup_logging
from server.migrations import MigrationError

DB_NAME = "wardrobe"


@contextmanager
def embedded_services(settings: Settings) -> Iterator[Settings]:
    """Start what DATABASE_URL / REDIS_URL do not name; stop it on the way out."""
    from server.embedded import EmbeddedMariaDB, EmbeddedRedis, ensure_database

    started: list[EmbeddedMariaDB | EmbeddedRedis] = []
    updates: dict[str, Any] = {}
    try:
        if settings.embedded_db:
            mariadb = EmbeddedMariaDB(settings.var_dir)
            mariadb.start()
            started.append(mariadb)
            ensure_database(mariadb, DB_NAME)
            updates["database_url"] = mariadb.url(DB_NAME)
        if settings.embedded_redis:
            redis = EmbeddedRedis(settings.var_dir)
            redis.start()
            started.append(redis)
            updates["redis_url"] = redis.url()
        yield settings.model_copy(update=updates)
    finally:
        for server in reversed(started):
            server.stop()


def _run_db_command(
    settings: Settings, fn: Callable[[Any], Awaitable[int]], *, migrated: bool = False
) -> int:
    """Run `fn(db)`; with `migrated`, first refuse a database that has migrations pending."""
    from server.db import Database
    from server.metrics import Metrics
    from server.migrations import Migrator

    async def main() -> int:
        db = await Database.connect(settings.db(), settings, Metrics())
        try:
            if migrated and (pending := await Migrator(db).pending()):
                raise MigrationError(
                    f"the database has {len(pending)} migration(s) pending; run `python run.py migrate` first"
                )
            return await fn(db)
        finally:
            await db.close()

    return asyncio.run(main())


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from aiohttp import web

    from server.app import create_app

    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown}:{port}"

    async def announce(app: web.Application) -> None:
        logger.info(
            "serving on {}  (API docs {}/api/docs · dashboard {}/ops · metrics {}/metrics)",
            base,
            base,
            base,
            base,
        )

    app = create_app(settings)
    app.on_startup.append(announce)
    web.run_app(
        app,
        host=host,
        port=port,
        access_log=None,
        shutdown_timeout=settings.shutdown_timeout,
        print=None,
    )
    logger.info("stopped")
    return 0


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from server.migrations import Migrator

    async def go(db: Any) -> int:
        migrator = Migrator(db)
        if args.status:
            status = await migrator.status()
            for m in migrator.migrations:
                mark = "applied" if m.version in status.applied else "PENDING"
                print(f"{m.path.name:40} {mark}")
            return 0
        applied = await migrator.migrate()
        print(f"applied {len(applied)} migration(s)" + "".join(f"\n  {m.path.name}" for m in applied))
        return 0

    return _run_db_command(settings, go)


def cmd_create_admin(settings: Settings, args: argparse.Namespace) -> int:
    from server.accounts import ensure_admin
    from server.migrations import Migrator

    async def go(db: Any) -> int:
        await Migrator(db).migrate()
        user_id, created = await ensure_admin(db, args.phone, args.password)
        print(f"{'created' if created else 'promoted'} admin user {user_id}")
        return 0

    return _run_db_command(settings, go)


def cmd_check_quota(settings: Settings, args: argparse.Namespace) -> int:
    """Every account against its ledger and open reservations; non-zero exit on a difference."""
    from server.quota import check_all

    async def go(db: Any) -> int:
        checked, problems = await check_all(db)
        for p in problems:
            print(f"user {p.user_id}: {p.what}: recorded {p.recorded}, expected {p.expected}")
        print(f"checked {checked} account(s): {len(problems)} difference(s)")
        return 1 if problems else 0

    return _run_db_command(settings, go, migrated=True)


def cmd_check_orders(settings: Settings, args: argparse.Namespace) -> int:
    """Every paid order has exactly one grant and every order grant a paid order; exit 1 if not."""
    from server.payments.checks import check_orders

    async def go(db: Any) -> int:
        checked, problems = await check_orders(db)
        for p in problems:
            print(p)
        print(f"checked {checked} paid order(s): {len(problems)} problem(s)")
        return 1 if problems else 0

    return _run_db_command(settings, go, migrated=True)


def cmd_clean_files(settings: Settings, args: argparse.Namespace) -> int:
    """The nightly orphan-file cleanup, now; `--dry-run` lists what it would delete."""
    from server.orphans import clean_orphans
    from server.storage import create_storage

    async def go(db: Any) -> int:
        storage = create_storage(settings)
        try:
            report = await clean_orphans(db, storage, settings, dry_run=args.dry_run)
        finally:
            await storage.close()
        for keys in report.orphans.values():
            for key in keys:
                print(key)
        verb = "would delete" if args.dry_run else "deleted"
        counts = ", ".join(f"{len(keys)} under {prefix}" for prefix, keys in report.orphans.items())
        print(f"scanned {report.scanned} object(s); {verb} {counts}; {report.unknown} unknown left alone")
        return 0

    return _run_db_command(settings, go, migrated=True)


COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "serve": cmd_serve,
    "migrate": cmd_migrate,
    "create-admin": cmd_create_admin,
    "check-quota": cmd_check_quota,
    "check-orders": cmd_check_orders,
    "clean-files": cmd_clean_files,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run.py", description="Wardrobe Server")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="serve the API (default)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    migrate = sub.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("--status", action="store_true", help="list migrations and whether they are applied")
    admin = sub.add_parser("create-admin", help="create an admin user (or promote an existing one)")
    admin.add_argument("--phone", required=True)
    admin.add_argument("--password", required=True)
    sub.add_parser("check-quota", help="verify every balance against the ledger; exit 1 on a difference")
    sub.add_parser("check-orders", help="verify paid orders against their ledger grants; exit 1 on a problem")
    clean = sub.add_parser("clean-files", help="delete storage objects nothing refers to (the 03:00 job)")
    clean.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["serve", *argv])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = load_settings()
        setup_logging(settings.log_level, json=settings.is_prod)
        settings.check_for_start()
        with embedded_services(settings) as ready:
            return COMMANDS[args.command](ready, args)
    except (ConfigError, MigrationError, AppError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"error: invalid configuration: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
