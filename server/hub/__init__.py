"""The event hub (issue 7): per-user numbered events over Redis, live to WebSocket sessions.

    stream.py   the Lua script, retention, replay reads
    pubsub.py   the process's one pub/sub connection (redis-py's PubSub)
    session.py  one socket's cursor, catch-up and bounded queue
    hub.py      RedisEventHub: publish, the dispatcher, attach/detach, housekeeping

docs/websocket.md describes the protocol and the design.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from server.hub.hub import RedisEventHub
from server.hub.session import GOING_AWAY, Session
from server.keys import hub_key, metrics_key, redis_key, settings_key

__all__ = ["RedisEventHub", "Session", "close_websockets", "hub_ctx"]


async def hub_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx, right after Redis: actors publish through the hub from their start."""
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
