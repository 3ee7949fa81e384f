"""Every piece of application state, as typed keys (STYLE.md rule 1)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from actors.runtime import ActorSystem
    from server.auth import Auth
    from server.auth.tokens import Principal
    from server.config import Settings
    from server.cron import CronRunner
    from server.db import Database
    from server.events import EventHub
    from server.features import FeatureStore
    from server.hub import RedisEventHub
    from server.metrics import Metrics
    from server.migrations import Migrator
    from server.payments import Payments
    from server.routing import RouteSpec
    from server.storage import Storage
    from server.tasks.manager import TaskManager
    from server.vendors.setup import Vendors

settings_key: web.AppKey[Settings] = web.AppKey("settings")
metrics_key: web.AppKey[Metrics] = web.AppKey("metrics")
db_key: web.AppKey[Database] = web.AppKey("db")
redis_key: web.AppKey[Redis] = web.AppKey("redis")
migrator_key: web.AppKey[Migrator] = web.AppKey("migrator")
route_specs_key: web.AppKey[list[RouteSpec]] = web.AppKey("route_specs")
actor_system_key: web.AppKey[ActorSystem] = web.AppKey("actor_system")
hub_key: web.AppKey[EventHub] = web.AppKey("event_hub")
cron_key: web.AppKey[CronRunner] = web.AppKey("cron")
instance_id_key: web.AppKey[str] = web.AppKey("instance_id")
features_key: web.AppKey[FeatureStore] = web.AppKey("features")
tasks_key: web.AppKey[TaskManager] = web.AppKey("tasks")
openapi_key: web.AppKey[dict[str, Any]] = web.AppKey("openapi")

# Per-request state.
request_id_key: web.RequestKey[str] = web.RequestKey("request_id", str)

# Auth (issue 4): the services, and who is calling (set by server/auth/middleware.py).
auth_key: web.AppKey[Auth] = web.AppKey("auth")
principal_key: web.RequestKey[Principal] = web.RequestKey("principal")

# Storage (issue 6): the backend STORAGE_BACKEND picks (server/storage).
storage_key: web.AppKey[Storage] = web.AppKey("storage")

# Live events (issue 7): the hub's socket side (hub_key above is its publishing side).
live_hub_key: web.AppKey[RedisEventHub] = web.AppKey("live_hub")

# Vendors (issue 6): one VendorActor per configured AI vendor (server/vendors/setup.py).
vendors_key: web.AppKey[Vendors] = web.AppKey("vendors")

# Ops dashboard: when this process started serving (time.monotonic()), for its uptime.
ops_started_key: web.AppKey[float] = web.AppKey("ops_started", float)

# Payments (issue 12): products, orders, providers, settlement (server/payments).
payments_key: web.AppKey[Payments] = web.AppKey("payments")
