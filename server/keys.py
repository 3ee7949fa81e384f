"""Every piece of application state, as typed keys (STYLE.md rule 1)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from actors.runtime import ActorSystem
    from server.auth.facade import Auth
    from server.auth.tokens import Principal
    from server.config import Settings
    from server.credits.facade import Credits
    from server.cron import CronRunner
    from server.db import Database
    from server.distributors import Distributors
    from server.hub import RedisEventHub
    from server.media.costs import StorageMeter
    from server.media.facade import Media
    from server.media.storage import Storage
    from server.metrics import Metrics
    from server.migrations import Migrator
    from server.payments.facade import Payments
    from server.pii.kms import Kms
    from server.tasks.facade import Tasks
    from server.vendors.facade import Vendors

settings_key: web.AppKey[Settings] = web.AppKey("settings")
metrics_key: web.AppKey[Metrics] = web.AppKey("metrics")
db_key: web.AppKey[Database] = web.AppKey("db")
redis_key: web.AppKey[Redis] = web.AppKey("redis")
redis_pool_key: web.AppKey[Callable[[], dict[str, int]]] = web.AppKey("redis_pool")  # its pool's figures
migrator_key: web.AppKey[Migrator] = web.AppKey("migrator")
actor_system_key: web.AppKey[ActorSystem] = web.AppKey("actor_system")
hub_key: web.AppKey[RedisEventHub] = web.AppKey("event_hub")  # publish, and the sockets' side
cron_key: web.AppKey[CronRunner] = web.AppKey("cron")
instance_id_key: web.AppKey[str] = web.AppKey("instance_id")
tasks_key: web.AppKey[Tasks] = web.AppKey("tasks")
openapi_key: web.AppKey[dict[str, Any]] = web.AppKey("openapi")

# Per-request state.
request_id_key: web.RequestKey[str] = web.RequestKey("request_id", str)
error_code_key: web.RequestKey[str] = web.RequestKey("error_code", str)  # wardrobe_http_errors_total

# Auth (issue 4): the services, and who is calling (set by server/auth/middleware.py).
auth_key: web.AppKey[Auth] = web.AppKey("auth")
principal_key: web.RequestKey[Principal] = web.RequestKey("principal")

# Storage (issue 6): the backend STORAGE_BACKEND picks (server/storage).
storage_key: web.AppKey[Storage] = web.AppKey("storage")
storage_meter_key: web.AppKey[StorageMeter] = web.AppKey("storage_meter")  # cost figures (issue 14)
media_key: web.AppKey[Media] = web.AppKey("media")  # assets and their files, for handlers (issue 11)

# Vendors (issue 6): one VendorActor per configured AI vendor (server/vendors/setup.py).
vendors_key: web.AppKey[Vendors] = web.AppKey("vendors")

# Credits (issue 11): the one entry point to every user's credits (server/credits/facade.py).
credits_key: web.AppKey[Credits] = web.AppKey("credits")

# Ops dashboard: when this process started serving (time.monotonic()), for its uptime.
ops_started_key: web.AppKey[float] = web.AppKey("ops_started", float)

# Payments (issue 12): products, orders, providers, settlement (server/payments).
payments_key: web.AppKey[Payments] = web.AppKey("payments")

# Personal data (issue 13): the KMS (server/pii) and the distributors (server/distributors).
kms_key: web.AppKey[Kms] = web.AppKey("kms")
distributors_key: web.AppKey[Distributors] = web.AppKey("distributors")
