"""Wardrobe Server command line.

    python run.py [serve] [--host H] [--port P]   serve the API (default)
    python run.py serve --path /run/wardrobe/1.sock  serve on a unix socket (behind nginx)
    python run.py migrate [--status]               apply (or list) database migrations
    python run.py create-admin --phone P --password W
    python run.py grant-credits --phone P --amount N --reason R
    python run.py check-quota                      verify balances against the ledger
    python run.py check-orders                     verify paid orders against their grants
    python run.py clean-files [--dry-run]          delete storage objects nothing refers to
    python run.py storage lifecycle --apply|--check   set or compare the bucket's lifecycle rules
    python run.py storage report                   bytes, objects and monthly cost per class
    python run.py grant|revoke --phone P --permission pii:read   an admin's permissions
    python run.py rotate-keys [--batch N]          re-wrap every data key under the newest KEK
    python run.py check-pii [--sample N]           decrypt a sample; rows under retired KEKs
    python run.py kms encrypt [--value V]          print a kms:<ciphertext> secret (stdin if no --value)
    python run.py kms add-version | retire N       the local key ring's KEK versions

With no DATABASE_URL / REDIS_URL, private MariaDB and Redis servers are started
under VAR_DIR (./var) for the life of the command; while `serve` runs, the other
commands use its servers (see embedded_services).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loguru import logger
from pydantic import ValidationError

from server.config import ConfigError, Settings, load_settings
from server.errors import AppError
from server.logging import setup_logging
from server.migrations import MigrationError

DB_NAME = "wardrobe"
OWNER_WAIT = 120.0  # seconds a command waits for another command (or a starting server) to be done


@contextmanager
def embedded_services(settings: Settings, command: str = "serve") -> Iterator[Settings]:
    """Start what DATABASE_URL / REDIS_URL do not name; stop it on the way out.

    The process that starts the embedded instances owns VAR_DIR (server/embedded.py
    VarDirLock) until it has stopped them. While a server owns it, a command uses that
    server's instances through their sockets and starts or stops nothing; a second
    `serve` refuses. While another command owns it, this one waits for it to finish."""
    from server.embedded import EmbeddedMariaDB, EmbeddedRedis, VarDirLock, ensure_database

    if not (settings.embedded_db or settings.embedded_redis):
        yield settings
        return
    mariadb, redis = EmbeddedMariaDB(settings.var_dir), EmbeddedRedis(settings.var_dir)
    wanted = {"mysqld"} if settings.embedded_db else set()
    wanted |= {"redis"} if settings.embedded_redis else set()
    updates: dict[str, Any] = {}
    if settings.embedded_db:
        updates["database_url"] = mariadb.url(DB_NAME)
    if settings.embedded_redis:
        updates["redis_url"] = redis.url()
    lock = VarDirLock.of(settings.var_dir)
    deadline = time.monotonic() + OWNER_WAIT
    said = ""
    while not lock.acquire(command):
        owner = lock.owner()
        if owner is not None and owner.command == "serve":
            if command == "serve":
                raise ConfigError(
                    f"{lock.base} is in use by the server with pid {owner.pid}: stop it first, "
                    "or give this one its own VAR_DIR"
                )
            if owner.ready:  # it has started everything it runs
                if missing := wanted - set(owner.ready):
                    raise ConfigError(
                        f"the server with pid {owner.pid} on {lock.base} runs no embedded "
                        + " and ".join(sorted(missing))
                        + ": set DATABASE_URL / REDIS_URL as it does"
                    )
                logger.info(
                    "using the embedded {} of the server with pid {}", " and ".join(sorted(wanted)), owner.pid
                )
                yield settings.model_copy(update=updates)
                return
        if time.monotonic() > deadline:
            who = f"`run.py {owner.command}` (pid {owner.pid})" if owner else "another process"
            raise ConfigError(f"{lock.base} stayed in use by {who} for {OWNER_WAIT:.0f}s")
        if owner is not None and said != f"{owner.pid}":
            said = f"{owner.pid}"
            logger.info(
                "waiting for `run.py {}` (pid {}) to finish with {}", owner.command, owner.pid, lock.base
            )
        time.sleep(0.1)
    started: list[EmbeddedMariaDB | EmbeddedRedis] = []
    try:
        if settings.embedded_db:
            mariadb.start()
            started.append(mariadb)
            ensure_database(mariadb, DB_NAME)
        if settings.embedded_redis:
            redis.start()
            started.append(redis)
        lock.mark_ready(sorted(wanted))
        yield settings.model_copy(update=updates)
    finally:
        for server in reversed(started):
            server.stop()
        lock.release()


def _run_db_command(
    settings: Settings, fn: Callable[[Any], Awaitable[int]], *, migrated: bool = False
) -> int:
    """Run `fn(db)`; with `migrated`, first refuse a database that has migrations pending."""
    from server.db import Database
    from server.metrics import Metrics
    from server.migrations import Migrator

    async def main() -> int:
        db = await Database.connect(settings.database(), settings, Metrics())
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

    from server.app import create_app, freeze_heap
    from server.auth.accounts import mask_phone

    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown}:{port}"
    if args.path:  # a unix socket, one per instance behind nginx (docs/deploy.md)
        base = f"http://unix:{args.path}:"

    async def announce(app: web.Application) -> None:
        logger.info(
            "serving on {}  (API docs {}/api/docs · dashboard {}/ops · metrics {}/metrics{})",
            base,
            base,
            base,
            base,
            "" if settings.is_prod else f" · try it in the browser {base}/demo",
        )
        if settings.admin_phone and settings.admin_password:
            logger.info(
                "admin {} (ADMIN_PHONE) logs in at {}/ops/login", mask_phone(settings.admin_phone), base
            )
        else:
            logger.info(
                "no admin is configured: set ADMIN_PHONE and ADMIN_PASSWORD, or run "
                "`.venv/bin/python run.py create-admin --phone 13800138000 --password …` beside this server"
            )
        if settings.signup_credits:
            logger.info("new accounts start with {} credits (SIGNUP_CREDITS)", settings.signup_credits)

    app = create_app(settings)
    app.on_startup.append(announce)
    app.on_startup.append(freeze_heap)  # after every cleanup_ctx: the heap startup built
    if args.path:
        Path(args.path).unlink(missing_ok=True)  # left by an instance that did not stop cleanly
    web.run_app(
        app,
        host=None if args.path else host,
        port=None if args.path else port,
        path=args.path,
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
    from server.auth.accounts import ensure_admin
    from server.auth.passwords import Passwords
    from server.migrations import Migrator

    async def go(db: Any) -> int:
        await Migrator(db).migrate()
        passwords = Passwords(settings)
        try:
            user_id, created = await ensure_admin(db, passwords, args.phone, args.password)
        finally:
            passwords.close()
        print(f"{'created' if created else 'promoted'} admin user {user_id}")
        return 0

    return _run_db_command(settings, go)


def cmd_grant_credits(settings: Settings, args: argparse.Namespace) -> int:
    """Add (or with a negative amount remove) credits: the same `adjust` Grant, through the
    same UserActor, as the admin endpoint POST /api/v1/admin/users/{id}/quota."""
    from functools import partial

    from prometheus_client import CollectorRegistry

    from actors.runtime import ActorSystem
    from handlers.credits import QuotaAdjust
    from server.auth.accounts import mask_phone, normalize_phone
    from server.credits.facade import Credits
    from server.errors import NotFound
    from server.hub.hub import RedisEventHub
    from server.metrics import Metrics
    from server.redis import connect_redis
    from server.tasks import leases

    try:
        body = QuotaAdjust(amount=args.amount, reason=args.reason)
    except ValidationError as exc:
        raise ConfigError(
            "; ".join(f"--{e['loc'][0]} {e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
        ) from None

    async def go(db: Any) -> int:
        phone = normalize_phone(args.phone)
        row = await db.fetchone("SELECT id FROM users WHERE phone = %s", phone)
        if row is None:
            raise NotFound(f"no user has the phone {mask_phone(phone)}")
        user_id = int(row["id"])
        redis = connect_redis(str(settings.redis_url), settings)
        system = ActorSystem(CollectorRegistry(), default_ask_timeout=settings.actors.ask_timeout)
        hub = RedisEventHub(redis, settings)
        credits = Credits(system, db, hub, Metrics(), partial(leases.held, redis))
        await system.start()
        try:
            reason = f"{body.reason} (by run.py grant-credits)"[:200]
            state = await credits.adjust(user_id, body.amount, reason)
        finally:
            await system.stop(settings.actors.stop_timeout)
            await redis.aclose()
        print(
            f"user {user_id}: balance {state.balance}, reserved {state.reserved}, available {state.available}"
        )
        return 0

    return _run_db_command(settings, go, migrated=True)


def cmd_check_quota(settings: Settings, args: argparse.Namespace) -> int:
    """Every user's credits against the ledger and open reservations; exit 1 on a difference."""
    from server.credits.ledger import check_all

    async def go(db: Any) -> int:
        checked, problems = await check_all(db)
        for p in problems:
            print(f"user {p.user_id}: {p.what}: recorded {p.recorded}, expected {p.expected}")
        print(f"checked {checked} user(s): {len(problems)} difference(s)")
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
    from server.media.orphans import clean_orphans
    from server.media.storage import create_storage

    async def go(db: Any) -> int:
        storage = create_storage(settings)
        try:
            report = await clean_orphans(db, storage, settings, dry_run=args.dry_run)
        finally:
            await storage.close()
        for keys in [*report.orphans.values(), report.partial]:
            for key in keys:
                print(key)
        verb = "would delete" if args.dry_run else "deleted"
        counts = ", ".join(f"{len(keys)} under {prefix}" for prefix, keys in report.orphans.items())
        print(
            f"{report.expired} expired output(s); scanned {report.scanned} object(s); {verb} {counts}, "
            f"{len(report.partial)} partial write(s); {report.unknown} unknown left alone"
        )
        if report.failed:
            print(f"{len(report.failed)} key(s) could not be deleted: {' '.join(report.failed[:20])}")
            return 1
        return 0

    return _run_db_command(settings, go, migrated=True)


def cmd_storage(settings: Settings, args: argparse.Namespace) -> int:
    """`storage lifecycle --apply/--check` (COS only) and `storage report`."""
    from server.media import retention
    from server.media.costs import StorageMeter
    from server.media.storage import create_storage
    from server.media.storage.cos import CosStorage

    async def lifecycle() -> int:
        storage = create_storage(settings)
        try:
            wanted = retention.lifecycle_rules(settings)
            for rule in wanted:
                print(f"rule {rule.id}: {rule.prefix} expires after {rule.days} day(s)")
            differences = await retention.lifecycle_check(storage, settings)
            if differences is None or not isinstance(storage, CosStorage):
                print(
                    "local backend: the nightly cleanup applies these rules; there is no bucket to configure"
                )
                return 0
            current = await storage.get_lifecycle()
            for line in differences:
                print(line)
            if args.apply:
                if differences:
                    await storage.put_lifecycle(retention.merged_configuration(wanted, current))
                    if retention.lifecycle_differences(wanted, await storage.get_lifecycle()):
                        print("the bucket still differs after the update")
                        return 1
                print(f"bucket {storage.bucket}: lifecycle rules applied")
                return 0
            print(f"bucket {storage.bucket}: " + ("lifecycle rules differ" if differences else "rules match"))
            return 1 if differences else 0
        finally:
            await storage.close()

    if args.storage_command == "lifecycle":
        return asyncio.run(lifecycle())

    async def report(db: Any) -> int:
        storage = create_storage(settings)
        try:
            figures = await StorageMeter(db, storage, settings, None).measure(list_bucket=True)
        finally:
            await storage.close()
        for line in figures.lines():
            print(line)
        return 0

    return _run_db_command(settings, report, migrated=True)


PERMISSIONS = ("pii:read",)  # what `grant` knows (docs/pii.md)


def cmd_permission(settings: Settings, args: argparse.Namespace) -> int:
    """grant / revoke: add or remove a permission of an admin. It travels in the access
    token (`perms`), so it takes effect at the admin's next login or token refresh."""
    from server.auth.accounts import mask_phone, normalize_phone
    from server.auth.nearcache import NearCache
    from server.auth.schemas import permissions_of
    from server.auth.users import Profiles
    from server.errors import NotFound
    from server.redis import connect_redis

    if args.permission not in PERMISSIONS:
        raise ConfigError(f"--permission must be one of {', '.join(PERMISSIONS)}")

    async def go(db: Any) -> int:
        phone = normalize_phone(args.phone)
        async with db.transaction() as tx:
            row = await tx.fetchone(
                "SELECT id, role, permissions FROM users WHERE phone = %s FOR UPDATE", phone
            )
            if row is None:
                raise NotFound(f"no user has the phone {mask_phone(phone)}")
            if args.command == "grant" and row["role"] != "admin":
                raise ConfigError(f"user {row['id']} is not an admin: make them one first (create-admin)")
            perms = set(permissions_of(row["permissions"]))
            perms = perms | {args.permission} if args.command == "grant" else perms - {args.permission}
            await tx.execute(
                "UPDATE users SET permissions = %s WHERE id = %s", ",".join(sorted(perms)), row["id"]
            )
        redis = connect_redis(str(settings.redis_url), settings)
        try:
            near = NearCache(redis, 1, 1.0)  # size > 0: it tells the servers to drop their copies
            await Profiles(db, redis, settings.auth.profile_cache_ttl, near).invalidate(int(row["id"]))
        finally:
            await redis.aclose()
        print(f"user {row['id']}: permissions {','.join(sorted(perms)) or '(none)'}")
        return 0

    return _run_db_command(settings, go, migrated=True)


def _with_distributors(
    settings: Settings, fn: Callable[[Any], Awaitable[int]]
) -> Callable[[Any], Awaitable[int]]:
    """`fn(distributors)` on the command's database, with the configured KMS."""
    from server.distributors import Distributors
    from server.pii import blind_key, open_kms, resolve_secrets

    async def go(db: Any) -> int:
        async with open_kms(settings) as kms:
            resolved = await resolve_secrets(settings, kms)
            return await fn(Distributors(db, kms, blind_key(resolved, kms), resolved.distributors))

    return go


def cmd_rotate_keys(settings: Settings, args: argparse.Namespace) -> int:
    """Re-wrap every data key under the newest KEK version; online, resumable, idempotent."""
    started = time.monotonic()

    def progress(done: int, total: int) -> None:
        logger.info("rotate-keys: {}/{} row(s) ({:.0f} s)", done, total, time.monotonic() - started)

    async def go(distributors: Any) -> int:
        newest = await distributors.kms.current_version()
        report = await distributors.rotate(args.batch, progress)
        print(
            f"rotate-keys: newest KEK {newest}: {report.rewrapped} re-wrapped, "
            f"{report.already} done by another run, {report.failed} failed"
        )
        return 1 if report.failed else 0

    return _run_db_command(settings, _with_distributors(settings, go), migrated=True)


def cmd_check_pii(settings: Settings, args: argparse.Namespace) -> int:
    """Decrypt a sample of identities; report rows per KEK version and under retired ones."""

    async def go(distributors: Any) -> int:
        report = await distributors.check(args.sample)
        for version, n in sorted(report["versions"].items()):
            retired = " (retired)" if version in report["under_retired"] else ""
            print(f"KEK {version}: {n} row(s){retired}")
        for failure in report["failures"]:
            print(f"does not decrypt: {failure}")
        print(
            f"check-pii: {report['sampled']} sampled, {len(report['failures'])} failed, "
            f"{sum(report['under_retired'].values())} row(s) under retired versions"
        )
        return 1 if report["failures"] or report["under_retired"] else 0

    return _run_db_command(settings, _with_distributors(settings, go), migrated=True)


def cmd_kms(settings: Settings, args: argparse.Namespace) -> int:
    """kms encrypt: a `kms:<ciphertext>` value for any secret setting; add-version / retire:
    the local key ring's KEK versions (retire refuses while a row still uses it)."""
    from server.pii import keyring_path, open_kms
    from server.pii.kms import KeyRing, KmsError

    if args.kms_command == "encrypt":
        value = args.value if args.value is not None else sys.stdin.read().rstrip("\n")
        if not value:
            raise ConfigError("give the secret with --value or on standard input")

        async def encrypt() -> int:
            async with open_kms(settings) as kms:
                print("kms:" + await kms.encrypt_secret(value))
            return 0

        return asyncio.run(encrypt())
    if settings.pii.provider != "local":
        raise ConfigError("KEK versions of KMS_PROVIDER=tencent are managed in Tencent Cloud KMS")
    ring = KeyRing(keyring_path(settings))
    try:
        if args.kms_command == "add-version":
            print(f"key ring {ring.path}: version {ring.add_version()} is now the newest")
            return 0
    except KmsError as exc:
        raise ConfigError(str(exc)) from None

    async def retire(db: Any) -> int:
        version = f"local:{args.version}"
        left = await db.fetchval("SELECT COUNT(*) FROM distributors WHERE kek_version = %s", version)
        if left:
            raise ConfigError(f"{left} row(s) still use {version}: run rotate-keys first")
        try:
            ring.retire(args.version)
        except KmsError as exc:
            raise ConfigError(str(exc)) from None
        print(f"key ring {ring.path}: version {args.version} retired")
        return 0

    return _run_db_command(settings, retire, migrated=True)


COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "serve": cmd_serve,
    "migrate": cmd_migrate,
    "create-admin": cmd_create_admin,
    "grant-credits": cmd_grant_credits,
    "check-quota": cmd_check_quota,
    "check-orders": cmd_check_orders,
    "clean-files": cmd_clean_files,
    "storage": cmd_storage,
    "grant": cmd_permission,
    "revoke": cmd_permission,
    "rotate-keys": cmd_rotate_keys,
    "check-pii": cmd_check_pii,
    "kms": cmd_kms,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run.py", description="Wardrobe Server")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="serve the API (default)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument(
        "--path", help="listen on this unix socket instead of HOST:PORT (its mode follows the umask)"
    )
    migrate = sub.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("--status", action="store_true", help="list migrations and whether they are applied")
    admin = sub.add_parser("create-admin", help="create an admin user (or promote an existing one)")
    admin.add_argument("--phone", required=True)
    admin.add_argument("--password", required=True)
    grant = sub.add_parser(
        "grant-credits", help="add credits to a user (ledger kind adjust), as the admin API does"
    )
    grant.add_argument("--phone", required=True)
    grant.add_argument("--amount", type=int, required=True, help="credits to add (negative: remove)")
    grant.add_argument("--reason", required=True, help="kept in the ledger row")
    sub.add_parser("check-quota", help="verify every balance against the ledger; exit 1 on a difference")
    sub.add_parser("check-orders", help="verify paid orders against their ledger grants; exit 1 on a problem")
    clean = sub.add_parser("clean-files", help="delete storage objects nothing refers to (the 03:00 job)")
    clean.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")
    storage = sub.add_parser("storage", help="retention rules and cost figures (docs/storage.md)")
    storage_sub = storage.add_subparsers(dest="storage_command", required=True)
    lifecycle = storage_sub.add_parser("lifecycle", help="the bucket's lifecycle rules (COS)")
    mode = lifecycle.add_mutually_exclusive_group(required=True)
    mode.add_argument("--apply", action="store_true", help="put the configured rules on the bucket")
    mode.add_argument("--check", action="store_true", help="exit 1 when the bucket's rules differ")
    storage_sub.add_parser("report", help="bytes, objects and estimated monthly cost per retention class")
    for name in ("grant", "revoke"):
        perm = sub.add_parser(name, help=f"{name} an admin's permission (docs/pii.md)")
        perm.add_argument("--phone", required=True)
        perm.add_argument("--permission", required=True, help="pii:read")
    rotate = sub.add_parser("rotate-keys", help="re-wrap every data key under the newest KEK version")
    rotate.add_argument("--batch", type=int, default=500, help="rows per batch (progress after each)")
    check = sub.add_parser(
        "check-pii", help="decrypt a sample; exit 1 on a failure or rows under retired KEKs"
    )
    check.add_argument("--sample", type=int, default=100)
    kms = sub.add_parser("kms", help="kms: secrets and the local key ring (docs/pii.md)")
    kms_sub = kms.add_subparsers(dest="kms_command", required=True)
    enc = kms_sub.add_parser("encrypt", help="print kms:<ciphertext> of a secret")
    enc.add_argument("--value", help="the secret (default: read from standard input)")
    kms_sub.add_parser("add-version", help="a new newest KEK version in the local key ring")
    ret = kms_sub.add_parser("retire", help="retire a KEK version no row uses any more")
    ret.add_argument("version", type=int)
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
        with embedded_services(settings, args.command) as ready:
            return COMMANDS[args.command](ready, args)
    except (ConfigError, MigrationError, AppError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
