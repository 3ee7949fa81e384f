"""Every piece of application state, as typed keys (STYLE.md rule 1)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from server.config import Settings
    from server.db import Database
    from server.metrics import Metrics
    from server.migrations import Migrator
    from server.routing import RouteSpec

settings_key: web.AppKey[Settings] = web.AppKey("settings")
metrics_key: web.AppKey[Metrics] = web.AppKey("metrics")
db_key: web.AppKey[Database] = web.AppKey("db")
redis_key: web.AppKey[Redis] = web.AppKey("redis")
migrator_key: web.AppKey[Migrator] = web.AppKey("migrator")
route_specs_key: web.AppKey[list[RouteSpec]] = web.AppKey("route_specs")
openapi_key: web.AppKey[dict[str, Any]] = web.AppKey("openapi")

# Per-request state.
request_id_key: web.RequestKey[str] = web.RequestKey("request_id", str)
