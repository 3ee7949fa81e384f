"""The event hub (issue 7): per-user numbered events over Redis, live to WebSocket sessions.

    stream.py   the Lua script, retention, replay reads
    pubsub.py   the process's one pub/sub connection (redis-py's PubSub)
    session.py  one socket's cursor, catch-up and bounded queue
    hub.py      RedisEventHub: publish, the dispatcher, attach/detach, housekeeping

docs/websocket.md describes the protocol and the design.
"""

from __future__ import annotations

from server.hub.hub import RedisEventHub
from server.hub.session import AUTH_TIMEOUT, GOING_AWAY, TOO_MANY, UNAUTHENTICATED, UNAVAILABLE, Session

# The close codes are part of the protocol (docs/websocket.md).
__all__ = [
    "AUTH_TIMEOUT",
    "GOING_AWAY",
    "TOO_MANY",
    "UNAUTHENTICATED",
    "UNAVAILABLE",
    "RedisEventHub",
    "Session",
]
