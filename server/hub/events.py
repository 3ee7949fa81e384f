"""The event hub interface: `publish(user_id, event, data)`.

Actors and services publish per-user events (`quota.changed`, `task.updated`, …)
through this interface. The app's hub is `server.hub.RedisEventHub` (`app[hub_key]`):
it numbers events per user across instances and streams them to sockets. `NullHub`
drops them, for code run without the app's hub.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from loguru import logger

#: An event: (type, data).
Event = tuple[str, dict[str, Any]]


class EventHub(Protocol):
    # Returns the event's per-user seq, or None when it was not numbered (NullHub, or the
    # real hub (server/hub) when Redis failed: publish never raises into business code).
    async def publish(self, user_id: int, event: str, data: dict[str, Any]) -> int | None: ...

    # Several events of one user, in order, numbered consecutively; the last seq (or None).
    async def publish_many(self, user_id: int, events: Sequence[Event]) -> int | None: ...


class NullHub:
    """Drops events (logged at DEBUG): for code run without the app's hub (bench/quota.py)."""

    async def publish(self, user_id: int, event: str, data: dict[str, Any]) -> None:
        logger.debug("event {} for user {}: {}", event, user_id, data)

    async def publish_many(self, user_id: int, events: Sequence[Event]) -> None:
        for event, data in events:
            await self.publish(user_id, event, data)
