"""aiocron jobs, started in cleanup_ctx (never at import) and run once per cluster.

Each run first takes `SET job:{name}:{slot} NX PX` in Redis, where the slot is the
scheduled minute: of several instances firing the same minute, one runs the job.
Jobs are idempotent anyway, so a run lost to a crash is made good by the next.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from zoneinfo import ZoneInfo

import aiocron
from aiohttp import web
from loguru import logger
from redis.asyncio import Redis

from server.metrics import Metrics

TZ = ZoneInfo("Asia/Shanghai")
JobFunc = Callable[[web.Application], Awaitable[int]]


@dataclass(frozen=True, slots=True)
class CronJob:
    name: str
    spec: str  # 5-field cron, minute first (a 6-field spec would put SECONDS first)
    func: JobFunc
    lock_ms: int = 50_000


class CronRunner:
    """Fires `jobs` on their schedule; each job gets `app` and runs in a slot it wins."""

    def __init__(self, app: web.Application, jobs: list[CronJob], redis: Redis, metrics: Metrics) -> None:
        self.app = app
        self.jobs = jobs
        self.redis = redis
        self.metrics = metrics
        self._crons: list[aiocron.Cron] = []
        self._running: set[asyncio.Task[None]] = set()

    async def run(self, job: CronJob, slot: int | None = None) -> int | None:
        """Run `job` now if this instance wins its slot; returns what it did, or None."""
        slot = int(time.time() // 60) if slot is None else slot
        redis, metrics = self.redis, self.metrics
        if not await redis.set(f"job:{job.name}:{slot}", b"1", nx=True, px=job.lock_ms):
            metrics.cron_runs.labels(job.name, "skipped").inc()
            return None
        started = time.perf_counter()
        try:
            done = await job.func(self.app)
        except Exception:
            metrics.cron_runs.labels(job.name, "error").inc()
            logger.opt(exception=True).error("cron job {} failed", job.name)
            return None
        metrics.cron_runs.labels(job.name, "ok").inc()
        logger.info("cron job {} did {} in {:.0f}ms", job.name, done, (time.perf_counter() - started) * 1000)
        return done

    def _fire(self, job: CronJob) -> None:
        task = asyncio.get_running_loop().create_task(self._run_quietly(job), name=f"cron:{job.name}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run_quietly(self, job: CronJob) -> None:
        await self.run(job)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for job in self.jobs:
            cron = aiocron.crontab(job.spec, func=self._fire, args=(job,), start=True, loop=loop, tz=TZ)
            self._crons.append(cron)

    async def stop(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - a drain bound
        for cron in self._crons:
            cron.stop()
        if self._running:
            _, pending = await asyncio.wait(set(self._running), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
