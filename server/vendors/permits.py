"""Vendor permits: what a VendorActor takes before a call (`acquire`) and before each
attempt (`pace`), so a vendor's `concurrency` and `qps` hold for the whole cluster.

`LocalPermits` bounds one process only (no Redis: unit tests, the built-in `local`
vendor, whose limit is CPU threads of this process). `ClusterPermits` keeps the permits
in Redis, under `wardrobe:vendor:{vendor}:…`:

- in flight: a sorted set of leases scored by their expiry (Redis `TIME`, so the
  instances' clocks do not matter). `ACQUIRE` drops expired leases and adds one when
  fewer than `concurrency` remain; `RELEASE` removes it and pushes a wake token on a
  list; a waiting instance blocks on that list (`BLPOP`, bounded by the earliest lease
  expiry), so a freed permit is taken within a round trip and nothing polls hot.
  Permits freed while a release is in flight go back together in the next round trip
  (server/redis.py `ScriptBatch`). A live
  process renews its leases every `lease_ttl / 3`; a crashed one's expire after
  `lease_ttl`.
- rate: one key holding the next free start time (a token bucket of one token, as the
  local `TokenBucket`). `PACE` books the next start and answers how long to sleep, so
  attempts are evenly spaced cluster-wide with one round trip and no retry loop.

When Redis fails, the permits fall back to this process's share, `concurrency //
expected_instances` calls and `qps / expected_instances` (at least 1 call), say so in
`fallback` (metrics, stats), and try Redis again after `RETRY_AFTER` seconds.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Final, Protocol

from loguru import logger
from redis.asyncio import Redis
from redis.exceptions import RedisError

from server.errors import Busy
from server.redis import ScriptBatch
from server.vendors.resilience import Clock, TokenBucket

#: After a Redis failure, the permits stay on the local share this long before retrying.
RETRY_AFTER: Final = 5.0
#: Longest BLPOP of a waiting acquire (it also re-checks for expired leases then).
MAX_WAIT: Final = 1.0

ACQUIRE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], 2 * ttl)
  return -1
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return tonumber(first[2]) - now
"""
RENEW: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local kept = 0
for i = 2, #ARGV do
  kept = kept + redis.call('ZADD', KEYS[1], 'XX', 'CH', now + ttl, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], 2 * ttl)
return kept
"""
RELEASE: Final = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], '1')
  redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[2]) - 1)
  redis.call('PEXPIRE', KEYS[2], 60000)
  return 1
end
return 0
"""
PACE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local start = math.max(now, tonumber(redis.call('GET', KEYS[1]) or '0'))
redis.call('SET', KEYS[1], string.format('%.0f', start + interval), 'PX',
           math.floor((start + interval - now) / 1000) + 1000)
return start - now
"""

_PROCESS: Final = f"{socket.gethostname()}:{os.getpid()}"


class Permits(Protocol):
    """What the VendorActor needs: a local bound, a permit per call, pacing per attempt."""

    @property
    def local_limit(self) -> int:
        """Calls this process may have in flight now."""
        ...

    @property
    def fallback(self) -> bool:
        """True while a cluster limit is replaced by this process's share."""
        ...

    async def acquire(self) -> str | None:
        """Wait for a permit; its lease id (None: nothing to give back)."""
        ...

    def release(self, lease: str | None) -> None:
        """Give the permit back (returns at once; the work may finish in the background)."""
        ...

    async def pace(self) -> None:
        """Wait until an attempt may start under the rate limit."""
        ...

    def stats(self) -> dict[str, object]: ...

    async def close(self) -> None: ...


class LocalPermits:
    """Limits of this process alone: `concurrency` calls, `qps` attempts a second."""

    def __init__(self, concurrency: int, qps: float, clock: Clock = time.monotonic) -> None:
        self.concurrency = concurrency
        self.bucket = TokenBucket(qps, clock)

    @property
    def local_limit(self) -> int:
        return self.concurrency

    @property
    def fallback(self) -> bool:
        return False

    async def acquire(self) -> str | None:
        return None

    def release(self, lease: str | None) -> None:
        return None

    async def pace(self) -> None:
        await self.bucket.take()

    def stats(self) -> dict[str, object]:
        return {"scope": "process", "fallback": False, "local_limit": self.concurrency}

    async def close(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class ClusterLimits:
    """Builds each remote vendor's ClusterPermits on one Redis (VENDOR_LEASE_TTL,
    VENDOR_EXPECTED_INSTANCES)."""

    redis: Redis
    lease_ttl: float
    expected_instances: int

    def permits(self, vendor: str, concurrency: int, qps: float) -> ClusterPermits:
        return ClusterPermits(
            self.redis,
            vendor,
            concurrency,
            qps,
            lease_ttl=self.lease_ttl,
            expected_instances=self.expected_instances,
        )


class ClusterPermits:
    """One vendor's permits shared by every instance through Redis; see the module doc."""

    def __init__(
        self,
        redis: Redis,
        vendor: str,
        concurrency: int,
        qps: float,
        *,
        lease_ttl: float,
        expected_instances: int,
        clock: Clock = time.monotonic,
    ) -> None:
        self.redis = redis
        self.vendor = vendor
        self.concurrency = concurrency
        self.qps = qps
        self.lease_ttl = lease_ttl
        self.share = max(1, concurrency // max(1, expected_instances))
        self.clock = clock
        self.local = LocalPermits(self.share, qps / max(1, expected_instances), clock)
        prefix = f"wardrobe:vendor:{vendor}"
        self.leases_key, self.wake_key, self.rate_key = f"{prefix}:leases", f"{prefix}:wake", f"{prefix}:rate"
        self._acquire = redis.register_script(ACQUIRE)
        self._renew = redis.register_script(RENEW)
        self._release = redis.register_script(RELEASE)
        self._pace = redis.register_script(PACE)
        self.held: set[str] = set()
        self._down_until = 0.0  # monotonic time before which Redis is not tried again
        self._renewer: asyncio.Task[None] | None = None
        self._jobs: set[asyncio.Task[None]] = set()
        self._releases = ScriptBatch(redis, self._release, f"vendor-permits:{vendor}:release")
        self.counts = {"waits": 0, "wakeups": 0, "renewals": 0, "lost": 0, "redis_errors": 0}

    # ------------------------------------------------------------------ state

    @property
    def fallback(self) -> bool:
        return self.clock() < self._down_until

    @property
    def local_limit(self) -> int:
        return self.share if self.fallback else self.concurrency

    def stats(self) -> dict[str, object]:
        return {
            "scope": "cluster",
            "fallback": self.fallback,
            "local_limit": self.local_limit,
            "share": self.share,
            "lease_ttl": self.lease_ttl,
            "leases_held": len(self.held),
            **self.counts,
        }

    def _failed(self, what: str, exc: BaseException) -> None:
        if not self.fallback:
            logger.warning(
                "vendor {}: Redis failed ({}: {!r}); limits fall back to this process's share "
                "({} in flight) for {:g}s",
                self.vendor,
                what,
                exc,
                self.share,
                RETRY_AFTER,
            )
        self.counts["redis_errors"] += 1
        self._down_until = self.clock() + RETRY_AFTER

    # ------------------------------------------------------------------ in flight

    async def acquire(self) -> str | None:
        """Wait for a cluster permit (cancel to give up). None when on the local share."""
        lease = f"{_PROCESS}:{secrets.token_hex(6)}"
        waited = False
        try:
            while True:
                if self.fallback:
                    return None
                try:
                    wait_ms = int(
                        await self._acquire(
                            keys=[self.leases_key], args=[lease, self.concurrency, int(self.lease_ttl * 1000)]
                        )
                    )
                    if wait_ms < 0:
                        self._hold(lease)
                        return lease
                    if not waited:
                        waited = True
                        self.counts["waits"] += 1
                    timeout = min(MAX_WAIT, max(wait_ms, 1) / 1000)
                    if await self.redis.blpop([self.wake_key], timeout=timeout) is not None:
                        self.counts["wakeups"] += 1
                except (RedisError, OSError, Busy) as exc:
                    self._failed("acquire", exc)
        except asyncio.CancelledError:
            self.release(lease)  # the script may have granted it just before the cancel
            raise

    def release(self, lease: str | None) -> None:
        """Give the permit back in the background. Releases made while one round trip is in
        flight go together in the next (one RELEASE each, in one pipeline)."""
        if lease is None:
            return
        self.held.discard(lease)
        self._spawn(self._give_back(lease), "release")

    async def _give_back(self, lease: str) -> None:
        try:
            await self._releases.run([self.leases_key, self.wake_key], [lease, self.concurrency])
        except (RedisError, OSError, Busy) as exc:
            self._failed("release", exc)  # the lease expires after lease_ttl

    def _hold(self, lease: str) -> None:
        self.held.add(lease)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(
                self._renew_loop(), name=f"vendor-permits:{self.vendor}:renew"
            )
            self._renewer.add_done_callback(self._job_done)

    async def _renew_loop(self) -> None:
        """Every lease_ttl/3 while leases are held: push their expiry forward."""
        while self.held:
            await asyncio.sleep(self.lease_ttl / 3)
            held = list(self.held)
            if not held:
                break
            try:
                kept = int(
                    await self._renew(keys=[self.leases_key], args=[int(self.lease_ttl * 1000), *held])
                )
            except (RedisError, OSError, Busy) as exc:
                self._failed("renew", exc)
                continue
            self.counts["renewals"] += 1
            if kept < len(held):
                lost = len(held) - kept
                self.counts["lost"] += lost
                logger.warning("vendor {}: {} lease(s) had expired before renewal", self.vendor, lost)

    # ------------------------------------------------------------------ rate

    async def pace(self) -> None:
        if self.qps <= 0:
            return
        if not self.fallback:
            try:
                wait_us = int(await self._pace(keys=[self.rate_key], args=[int(1_000_000 / self.qps)]))
            except (RedisError, OSError, Busy) as exc:
                self._failed("pace", exc)
            else:
                if wait_us > 0:
                    await asyncio.sleep(wait_us / 1_000_000)
                return
        await self.local.pace()

    # ------------------------------------------------------------------ lifecycle

    def _spawn(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"vendor-permits:{self.vendor}:{what}")
        self._jobs.add(task)
        task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._jobs.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.opt(exception=exc).error("vendor {}: permit job died: {!r}", self.vendor, exc)

    async def close(self) -> None:
        """Give back what is still held, wait for the releases (bounded), stop renewing."""
        for lease in list(self.held):
            self.release(lease)
        if self._jobs:
            await asyncio.wait(set(self._jobs), timeout=2.0)
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
