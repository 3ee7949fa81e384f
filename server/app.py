"""The application factory. Long-lived parts start in `cleanup_ctx`, in dependency
order (MySQL → Redis → actors → …), and stop in reverse (STYLE.md rule 2)."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import AsyncIterator

from aiohttp import web
from loguru import logger

from actors.runtime import ActorSystem
from actors.user import UserActor
from handlers import setup_routes
from server.auth import auth_ctx
from server.auth.middleware import auth_middleware
from server.config import ConfigError, Settings
from server.cron import CronJob, cron_ctx
from server.db import Database
from server.hub import close_websockets, hub_ctx
from server.keys import (
    actor_system_key,
    db_key,
    hub_key,
    instance_id_key,
    metrics_key,
    migrator_key,
    redis_key,
    settings_key,
)
from server.metrics import Metrics
from server.middleware import add_request_id_header, envelope_middleware
from server.migrations import Migrator
from server.orphans import clean_orphan_files
from server.payments import close_stale_orders, payments_ctx
from server.redis import connect_redis
from server.storage import storage_ctx
from server.sweeper import sweep_expired_reservations
from server.tasks.manager import recover_tasks, tasks_ctx
from server.vendors.setup import vendors_ctx


async def db_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[settings_key]
    url = settings.db()
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
        if settings.admin_phone and settings.admin_password:
            from server.accounts import ensure_admin

            await ensure_admin(db, settings.admin_phone, settings.admin_password.get_secret_value())
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
        default_ask_timeout=settings.actor_ask_timeout,
        passivate_after={"UserActor": settings.actor_idle_seconds},
    )
    system.register(UserActor, lambda: UserActor(app[db_key], app[hub_key]))
    await system.start()
    app[actor_system_key] = system
    try:
        yield
    finally:
        await system.stop(settings.actor_stop_timeout)


CRON_JOBS = [
    CronJob("reservation-sweeper", "* * * * *", sweep_expired_reservations),
    CronJob("task-recovery", "* * * * *", recover_tasks),
    CronJob("orphan-files", "0 3 * * *", clean_orphan_files, lock_ms=3_600_000),
    CronJob("pending-orders", "* * * * *", close_stale_orders),
]


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[envelope_middleware, auth_middleware],
        client_max_size=settings.client_max_size,
    )
    app[settings_key] = settings
    app[metrics_key] = Metrics()
    setup_routes(app)
    app.on_response_prepare.append(add_request_id_header)
    app.on_shutdown.append(close_websockets)  # GOING_AWAY to every socket (issue 7)
    app.cleanup_ctx.append(db_ctx)
    app.cleanup_ctx.append(redis_ctx)
    app.cleanup_ctx.append(hub_ctx)  # before the actors, which publish through it
    app.cleanup_ctx.append(auth_ctx)
    app.cleanup_ctx.append(storage_ctx)
    app.cleanup_ctx.append(actors_ctx)
    app.cleanup_ctx.append(vendors_ctx)  # needs the actor system
    app.cleanup_ctx.append(tasks_ctx)  # features and task runs: need the vendors
    app.cleanup_ctx.append(payments_ctx)  # needs the actor system, the hub and auth's profiles
    if settings.cron_enabled:
        app.cleanup_ctx.append(cron_ctx(CRON_JOBS))
    return app
