"""The composition root: the application factory and every `cleanup_ctx` step.

Long-lived parts start in dependency order (MySQL → Redis → hub → auth → storage →
actors → credits → vendors → tasks → cron) and stop in reverse (STYLE.md rule 2).
Each capability's entry point is built here from what it needs and stored under its
AppKey (server/keys.py); nothing below this module reaches into `app` for another
capability's parts.
"""

from __future__ import annotations

import gc
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from functools import partial

from aiohttp import web
from loguru import logger
from prometheus_client import disable_created_metrics

from actors.runtime import ActorSystem
from handlers import setup_routes
from server import figures
from server.auth import open_auth
from server.auth.middleware import auth_middleware
from server.config import ConfigError, Settings
from server.cors import allowed_origins, setup_cors
from server.credits.facade import Credits
from server.cron import CronJob, CronRunner
from server.db import Database
from server.distributors import Distributors
from server.hub import GOING_AWAY, RedisEventHub
from server.keys import (
    actor_system_key,
    auth_key,
    credits_key,
    cron_key,
    db_key,
    distributors_key,
    hub_key,
    instance_id_key,
    kms_key,
    media_key,
    metrics_key,
    migrator_key,
    payments_key,
    redis_key,
    redis_pool_key,
    settings_key,
    storage_key,
    storage_meter_key,
    tasks_key,
    vendors_key,
)
from server.media.costs import DeletionCounter, StorageMeter
from server.media.facade import Media
from server.media.orphans import clean_orphan_files
from server.media.storage import open_storage
from server.metrics import Metrics
from server.middleware import add_request_id_header, envelope_middleware
from server.migrations import Migrator
from server.payments.facade import open_payments
from server.pii import blind_key, open_kms, resolve_secrets
from server.redis import connect_redis, pool_stats
from server.sentry import close_sentry, init_sentry
from server.tasks import leases
from server.tasks.facade import open_tasks
from server.vendors.facade import open_vendors


async def sentry_ctx(app: web.Application) -> AsyncIterator[None]:
    """First of all: Sentry (only with SENTRY_DSN), flushed and closed last."""
    init_sentry(app[settings_key])
    try:
        yield
    finally:
        await close_sentry()


async def db_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[settings_key]
    url = settings.database()
    try:
        db = await Database.connect(url, settings, app[metrics_key])
    except Exception as exc:
        raise ConfigError(f"cannot connect to MySQL at {url!r}: {exc}") from exc
    app[db_key] = db
    migrator = Migrator(db)
    app[migrator_key] = migrator
    try:
        if settings.migrate_on_start:
            applied = await migrator.migrate()
            if applied:
                logger.info("applied {} migration(s)", len(applied))
        yield
    finally:
        await db.close()


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[settings_key]
    if not settings.redis_url:
        raise ConfigError("REDIS_URL is not set and no embedded Redis was started")
    client = connect_redis(settings.redis_url, settings)
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        raise ConfigError(f"cannot reach Redis at {settings.redis_url}: {exc}") from exc
    app[redis_key] = client
    pool: Callable[[], dict[str, int]] = partial(pool_stats, client)
    app[redis_pool_key] = pool  # for the ops dashboard
    app[metrics_key].watch_redis_pool(pool)
    try:
        yield
    finally:
        await client.aclose()


async def actors_ctx(app: web.Application) -> AsyncIterator[None]:
    """The actor system; stopping drains every mailbox within a bound. The event hub
    (`app[hub_key]`) was started before it by `hub_ctx` (server/hub)."""
    settings = app[settings_key]
    app[instance_id_key] = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    system = ActorSystem(
        app[metrics_key].registry,
        default_ask_timeout=settings.actors.ask_timeout,
        passivate_after={"UserActor": settings.actors.idle_seconds},
    )
    await system.start()
    app[actor_system_key] = system
    try:
        yield
    finally:
        await system.stop(settings.actors.stop_timeout)


async def hub_ctx(app: web.Application) -> AsyncIterator[None]:
    """Right after Redis: actors publish through the hub from their start."""
    hub = RedisEventHub(app[redis_key], app[settings_key], app[metrics_key].registry)
    await hub.start()
    app[hub_key] = hub
    try:
        yield
    finally:
        await hub.stop()


async def close_websockets(app: web.Application) -> None:
    """on_shutdown: every socket gets GOING_AWAY (1001) before handlers are waited for."""
    hub = app.get(hub_key)
    if hub is not None:
        await hub.close_all(GOING_AWAY, "server shutdown")


async def auth_ctx(app: web.Application) -> AsyncIterator[None]:
    async with open_auth(app[settings_key], app[db_key], app[redis_key]) as auth:
        app[auth_key] = auth
        yield


async def storage_ctx(app: web.Application) -> AsyncIterator[None]:
    async with open_storage(app[settings_key]) as storage:
        app[storage_key] = storage
        settings = app[settings_key]
        app[storage_meter_key] = StorageMeter(app[db_key], storage, settings, app[metrics_key])
        app[media_key] = Media(app[db_key], storage, settings)
        yield


async def credits_ctx(app: web.Application) -> AsyncIterator[None]:
    """After the actor system: the Credits facade (it registers the UserActor kind)."""
    live = partial(leases.held, app[redis_key])
    app[credits_key] = Credits(app[actor_system_key], app[db_key], app[hub_key], app[metrics_key], live)
    yield


async def payments_ctx(app: web.Application) -> AsyncIterator[None]:
    """After credits, the hub and auth (a paid order updates the buyer's cached profile)."""
    async with open_payments(
        app[settings_key],
        app[db_key],
        app[redis_key],
        app[credits_key],
        app[hub_key],
        app[auth_key].profiles,
        app[metrics_key],
    ) as payments:
        app[payments_key] = payments
        yield


async def tasks_ctx(app: web.Application) -> AsyncIterator[None]:
    """After the vendors: features (checked against their catalog) and the task runs."""
    async with open_tasks(
        app[settings_key],
        app[db_key],
        app[redis_key],
        app[credits_key],
        app[hub_key],
        app[storage_key],
        app[auth_key].profiles,
        app[vendors_key],
        app[metrics_key],
        app[instance_id_key],
    ) as tasks:
        app[tasks_key] = tasks
        yield


async def task_metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    """After tasks_ctx: wardrobe_task_jobs{state} from this instance's scheduler."""
    tasks = app[tasks_key]
    app[metrics_key].watch_task_jobs(tasks.local_stats)
    yield


async def vendors_ctx(app: web.Application) -> AsyncIterator[None]:
    async with open_vendors(
        app[settings_key], app[actor_system_key], app.get(storage_key), app[redis_key]
    ) as vendors:
        app[vendors_key] = vendors
        yield


async def kms_ctx(app: web.Application) -> AsyncIterator[None]:
    """First of all (issue 13): the KMS, then every `kms:<ciphertext>` secret setting
    decrypted, so the steps after it read plaintext settings."""
    async with open_kms(app[settings_key]) as kms:
        app[kms_key] = kms
        app[settings_key] = await resolve_secrets(app[settings_key], kms)
        yield


async def distributors_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[settings_key]
    kms = app[kms_key]
    app[distributors_key] = Distributors(app[db_key], kms, blind_key(settings, kms), settings.distributors)
    yield


# ------------------------------------------------------------------ cron (once per cluster)


async def _sweep_reservations(app: web.Application) -> int:
    return await app[credits_key].sweep_expired()


async def _recover_tasks(app: web.Application) -> int:
    return await app[tasks_key].recover()


async def _clean_orphan_files(app: web.Application) -> int:
    counter = DeletionCounter(app[metrics_key], app[settings_key].storage.price_per_gb_month)
    return await clean_orphan_files(app[db_key], app[storage_key], app[settings_key], counter)


async def _measure_storage(app: web.Application) -> int:
    return (await app[storage_meter_key].measure()).billed_bytes


async def _list_bucket(app: web.Application) -> int:
    return (await app[storage_meter_key].measure(list_bucket=True)).billed_bytes


async def _close_stale_orders(app: web.Application) -> int:
    """Lost notifications (query), expired orders (close), refunds still processing (query)."""
    payments = app[payments_key]
    return await payments.check_pending() + await payments.check_refunds()


async def _refresh_gauges(app: web.Application) -> int:
    """Every instance: the cluster figures from MySQL as gauges (aggregate with max())."""
    metrics, db = app[metrics_key], app[db_key]
    counts = await figures.task_counts(db)
    for status, n in counts.items():
        metrics.tasks.labels(status).set(n)
    held = await figures.reservations(db)
    metrics.credits_reservations_open.set(held["count"])
    metrics.credits_reserved.set(held["sum"])
    metrics.credits_reservations_overdue.set(held["overdue"])
    orders = await app[payments_key].order_counts()
    for row in orders:
        metrics.orders_by_status.labels(row["channel"], row["status"]).set(int(row["n"]))
    return len(counts) + 3 + len(orders)


async def _settle_commissions(app: web.Application) -> int:
    return await app[distributors_key].settle_commissions()


CRON_JOBS = [
    CronJob("reservation-sweeper", "* * * * *", _sweep_reservations),
    CronJob("task-recovery", "* * * * *", _recover_tasks),
    CronJob("orphan-files", "0 3 * * *", _clean_orphan_files, lock_ms=3_600_000),
    CronJob("pending-orders", "* * * * *", _close_stale_orders),
    CronJob("storage-figures", "7 * * * *", _measure_storage),
    CronJob("storage-listing", "30 4 * * *", _list_bucket, lock_ms=3_600_000),
    CronJob("ops-gauges", "* * * * *", _refresh_gauges, once_per_cluster=False),
    CronJob("commissions-settle", "17 * * * *", _settle_commissions),  # issue 13
]


def cron_runner(app: web.Application) -> CronRunner:
    """A runner of CRON_JOBS on this app (tests drive jobs by hand with it)."""
    return CronRunner(app, CRON_JOBS, app[redis_key], app[metrics_key])


async def cron_ctx(app: web.Application) -> AsyncIterator[None]:
    runner = cron_runner(app)
    app[cron_key] = runner
    runner.start()
    try:
        yield
    finally:
        await runner.stop()


async def freeze_heap(app: web.Application) -> None:
    """on_startup of a serving process (run.py serve), appended after every cleanup_ctx
    has started: what startup built lives as long as the process, so the cyclic GC stops
    scanning it (`gc.freeze`). Under load a full collection went over that whole heap
    every few seconds, a pause of 70-100 ms for every request; about 3 ms after
    (bench/RESULTS.md "Payments"). Not in create_app: tests make many apps in one process."""
    gc.collect()
    gc.freeze()


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[envelope_middleware, auth_middleware],
        client_max_size=settings.http.client_max_size,
        # A header value up to HTTP_MAX_FIELD_SIZE reaches the app (and its envelope);
        # beyond, aiohttp's parser answers a plain 400 itself (docs/infrastructure.md).
        handler_args={"max_field_size": settings.http.max_field_size},
    )
    app[settings_key] = settings
    disable_created_metrics()  # type: ignore[no-untyped-call]  # process-wide: no `_created` series
    app[metrics_key] = Metrics()
    setup_routes(app)
    setup_cors(app, allowed_origins(settings.http.cors_allowed_origins))  # every route is declared now
    app.on_response_prepare.append(add_request_id_header)
    app.on_shutdown.append(close_websockets)  # GOING_AWAY to every socket (issue 7)
    app.cleanup_ctx.append(kms_ctx)  # first: it decrypts kms: secrets the others read
    if settings.sentry.dsn:
        app.cleanup_ctx.append(sentry_ctx)
    app.cleanup_ctx.append(db_ctx)
    app.cleanup_ctx.append(redis_ctx)
    app.cleanup_ctx.append(hub_ctx)  # before the actors, which publish through it
    app.cleanup_ctx.append(auth_ctx)
    app.cleanup_ctx.append(storage_ctx)
    app.cleanup_ctx.append(actors_ctx)
    app.cleanup_ctx.append(credits_ctx)  # the UserActor kind and the Credits facade
    app.cleanup_ctx.append(vendors_ctx)  # needs the actor system
    app.cleanup_ctx.append(tasks_ctx)  # features and task runs: need the vendors
    app.cleanup_ctx.append(payments_ctx)  # needs the actor system, the hub and auth's profiles
    app.cleanup_ctx.append(task_metrics_ctx)
    app.cleanup_ctx.append(distributors_ctx)  # the KMS and the database (issue 13)
    if settings.cron_enabled:
        app.cleanup_ctx.append(cron_ctx)
    return app
