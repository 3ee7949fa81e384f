"""aiocron jobs, started in cleanup_ctx (never at import), most of them once per cluster.

Each run of a cluster job first takes `SET job:{name}:{slot} NX PX` in Redis, where the
slot is the scheduled minute: of several instances firing the same minute, one runs the
job. Jobs are idempotent anyway, so a run lost to a crash is made good by the next. A job
with `once_per_cluster=False` runs on every instance (it refreshes local figures).

Every run is visible (docs/ops.md "Cron jobs"): wardrobe_cron_runs_total{job,result}
(ok, error, skipped), wardrobe_cron_duration_seconds{job}, and per job the Unix times of
the last start, end and success on this instance, the next scheduled run and the period.
`CronRunner.table()` gives the same for the ops dashboard.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import aiocron
from aiohttp import web
from cronsim import CronSim
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
    once_per_cluster: bool = True

    def next_runs(self, after: float, count: int = 2) -> list[float]:
        """The Unix times of the next `count` scheduled runs after `after`."""
        it = CronSim(self.spec, datetime.fromtimestamp(after, TZ))
        return [next(it).timestamp() for _ in range(count)]


@dataclass(slots=True)
class JobState:
    """What this instance saw of one job (for the dashboard's table)."""

    last_start: float | None = None
    last_end: float | None = None
    last_success: float | None = None
    last_result: str | None = None
    last_duration: float | None = None
    last_error: str | None = None
    runs: dict[str, int] = field(default_factory=dict)


class CronRunner:
    """Fires `jobs` on their schedule; each job gets `app` and runs in a slot it wins."""

    def __init__(self, app: web.Application, jobs: list[CronJob], redis: Redis, metrics: Metrics) -> None:
        self.app = app
        self.jobs = jobs
        self.redis = redis
        self.metrics = metrics
        self.state: dict[str, JobState] = {job.name: JobState() for job in jobs}
        self._crons: list[aiocron.Cron] = []
        self._running: set[asyncio.Task[None]] = set()
        now = time.time()
        for job in jobs:
            self._schedule(job, now)
            for result in ("ok", "error", "skipped"):
                metrics.cron_runs.labels(job.name, result)  # every series from the start

    def _schedule(self, job: CronJob, now: float) -> None:
        first, second = job.next_runs(now)
        self.metrics.cron_next_run.labels(job.name).set(first)
        self.metrics.cron_period.labels(job.name).set(second - first)

    def _count(self, job: CronJob, result: str) -> None:
        self.metrics.cron_runs.labels(job.name, result).inc()
        runs = self.state[job.name].runs
        runs[result] = runs.get(result, 0) + 1

    async def run(self, job: CronJob, slot: int | None = None) -> int | None:
        """Run `job` now if this instance wins its slot; returns what it did, or None."""
        slot = int(time.time() // 60) if slot is None else slot
        redis, metrics, state = self.redis, self.metrics, self.state[job.name]
        self._schedule(job, time.time())
        if job.once_per_cluster and not await redis.set(
            f"job:{job.name}:{slot}", b"1", nx=True, px=job.lock_ms
        ):
            self._count(job, "skipped")
            return None
        state.last_start = time.time()
        metrics.cron_last_start.labels(job.name).set(state.last_start)
        started = time.perf_counter()
        result, done = "error", None
        try:
            done = await job.func(self.app)
            result = "ok"
        except Exception as exc:
            state.last_error = f"{type(exc).__name__}: {exc}"[:300]
            logger.opt(exception=True).error("cron job {} failed", job.name)
        finally:
            elapsed = time.perf_counter() - started
            state.last_end = time.time()
            state.last_duration = elapsed
            state.last_result = result
            metrics.cron_duration.labels(job.name).observe(elapsed)
            metrics.cron_last_end.labels(job.name).set(state.last_end)
            if result == "ok":
                state.last_success = state.last_end
                metrics.cron_last_success.labels(job.name).set(state.last_end)
            self._count(job, result)  # a cancelled run counts as an error
        logger.info("cron job {} did {} in {:.0f}ms", job.name, done, elapsed * 1000)
        return done

    def table(self) -> list[dict[str, Any]]:
        """One row per job: schedule, next run, and what this instance saw of it."""
        now = time.time()
        rows = []
        for job in self.jobs:
            s = self.state[job.name]
            rows.append(
                {
                    "name": job.name,
                    "spec": job.spec,
                    "once_per_cluster": job.once_per_cluster,
                    "next_run": job.next_runs(now, 1)[0],
                    "last_start": s.last_start,
                    "last_end": s.last_end,
                    "last_success": s.last_success,
                    "last_result": s.last_result,
                    "last_duration": s.last_duration,
                    "last_error": s.last_error,
                    "runs": dict(s.runs),
                }
            )
        return rows

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
