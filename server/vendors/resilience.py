"""The VendorActor's guards, kept apart so they are plain and testable: a circuit
breaker, a token bucket, and exponential backoff with full jitter.

All of them read time from an injected `clock` (the loop's monotonic clock by default),
so tests move time forward instead of sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

Clock = Callable[[], float]

CLOSED: Final = 0
HALF_OPEN: Final = 1
OPEN: Final = 2
STATE_NAMES: Final = {CLOSED: "closed", HALF_OPEN: "half_open", OPEN: "open"}


class Breaker:
    """Consecutive-failure circuit breaker with a single half-open probe.

    closed --`threshold` unhealthy attempts in a row--> open
    open --`cooldown` seconds later, the next attempt is let through as the probe--> half-open
    half-open --probe succeeds--> closed;  --probe fails--> open (cooldown again)

    While open, and while a probe is out, `allow()` answers False: the call fails fast.
    Any healthy answer (a success, or the vendor refusing one request) resets the count.
    `threshold` 0 disables the breaker.
    """

    __slots__ = ("_clock", "cooldown", "failures", "opened_at", "opens", "probing", "state", "threshold")

    def __init__(self, threshold: int, cooldown: float, clock: Clock) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self.state = CLOSED
        self.failures = 0  # unhealthy attempts in a row
        self.opened_at = 0.0
        self.probing = False
        self.opens = 0  # times it opened, for stats

    def refuses(self) -> bool:
        """True when an attempt started now would be refused (no state change)."""
        if self.state == CLOSED:
            return False
        if self.state == OPEN:
            return self._clock() - self.opened_at < self.cooldown
        return self.probing

    def allow(self) -> bool:
        """May an attempt start now? Once the cooldown has passed, the first caller gets
        True and becomes the probe; others get False until the probe has an answer."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if self._clock() - self.opened_at < self.cooldown:
                return False
            self.state = HALF_OPEN
            self.probing = False
        if self.probing:
            return False
        self.probing = True
        return True

    def healthy(self) -> None:
        self.state = CLOSED
        self.failures = 0
        self.probing = False

    def unhealthy(self) -> None:
        if self.threshold <= 0:
            return
        if self.state == HALF_OPEN:
            self._open()
        elif self.state == CLOSED:
            self.failures += 1
            if self.failures >= self.threshold:
                self._open()
        # OPEN: a late answer of an attempt started before it opened changes nothing.

    def abandoned(self) -> None:
        """An attempt ended without an answer (cancelled): a probe frees its place."""
        if self.state == HALF_OPEN:
            self.probing = False

    def retry_in(self) -> float:
        """Seconds until a probe may go (0 when not open)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self.cooldown - (self._clock() - self.opened_at))

    def _open(self) -> None:
        self.state = OPEN
        self.opened_at = self._clock()
        self.probing = False
        self.opens += 1


class TokenBucket:
    """At most `rate` attempts started per second, evenly spaced (a bucket of one token).

    `take()` books the next free start time and sleeps until it, so waiters are served
    in order and nothing queues here but the callers themselves, each holding a call slot
    (so at most `concurrency` of them). rate 0: no limit.
    """

    __slots__ = ("_clock", "_next", "interval")

    def __init__(self, rate: float, clock: Clock) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._clock = clock
        self._next = 0.0

    async def take(self) -> None:
        if not self.interval:
            return
        now = self._clock()
        start = max(now, self._next)
        self._next = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)
