"""The event hub interface: `publish(user_id, event, data)`.

Actors and services publish per-user events (`quota.changed`, `task.updated`, …)
through this interface; the WebSocket issue replaces `NullHub` with a hub that
numbers events per user across instances and streams them to sockets.
"""

from __future__ import annotations

from typing import Any, Protocol

from loguru import logger


class EventHub(Protocol):
    # Returns the event's per-user seq, or None when it was not numbered (NullHub, or the
    # real hub (server/hub) when Redis failed: publish never raises into business code).
    async def publish(self, user_id: int, event: str, data: dict[str, Any]) -> int | None: ...


class NullHub:
    """Drops events (logged at DEBUG) until a real hub is configured."""

    async def publish(self, user_id: int, event: str, data: dict[str, Any]) -> None:
        logger.debug("event {} for user {}: {}", event, user_id, data)


class RecordingHub:
    """Keeps every event in memory, in order; for tests and the dashboard's debug view."""

    def __init__(self) -> None:
        self.events: list[tuple[int, str, dict[str, Any]]] = []

    async def publish(self, user_id: int, event: str, data: dict[str, Any]) -> None:
        self.events.append((user_id, event, data))
