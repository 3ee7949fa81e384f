"""Time on the wire and between retries: one clock convention, one timestamp format,
one backoff rule for every retry loop of the server."""

from __future__ import annotations

import datetime as dt
import random
from typing import overload


def utcnow() -> dt.datetime:
    """Now in UTC, naive, as the DATETIME(6) columns store it."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


@overload
def rfc3339(value: None) -> None: ...
@overload
def rfc3339(value: dt.datetime | float) -> str: ...
def rfc3339(value: dt.datetime | float | None) -> str | None:
    """RFC 3339 in UTC with microseconds and `Z` (API.md: times are RFC 3339 UTC strings).
    A naive datetime is UTC (as read from MySQL); a float is a Unix time; None stays None."""
    if value is None:
        return None
    if isinstance(value, float | int):
        value = dt.datetime.fromtimestamp(value, dt.UTC)
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    return value.isoformat(timespec="microseconds") + "Z"


def backoff_delay(attempt: int, base: float, cap: float, hint: float | None = None) -> float:
    """Full jitter: uniform(0, min(cap, base * 2**(attempt-1))) before retry number
    `attempt` (1, 2, …); never shorter than a peer's Retry-After `hint` (capped at `cap`)."""
    delay = random.uniform(0.0, min(cap, base * 2 ** max(0, attempt - 1)))
    if hint is not None:
        delay = max(delay, min(hint, cap))
    return delay
