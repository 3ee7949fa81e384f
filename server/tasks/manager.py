"""The process's task jobs: spawning under limits, cancellation across instances, recovery.

Recovery (at start and every minute): an active task whose lease no process holds
was left by a process that died. The first instance to take its lease (SET NX)
owns it: if its credits are still reserved and it has run fewer than
TASK_MAX_ATTEMPTS times, it runs again from the first step (vendor outputs are
not kept between runs); otherwise it fails and its credits go back. Either way
the credits settle exactly once: the user actor's phase check decides. A task
still `new` (its submission died between inserting it and scheduling it) fails,
with its credits returned if they had been reserved.

Capacity: a submission claims a place in the scheduler (`claim`) before it writes
anything, so a full runner answers BUSY with nothing created.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiojobs
from aiohttp import web
from loguru import logger

from server.errors import AppError, Busy, ErrorCode
from server.keys import db_key, features_key, instance_id_key, redis_key, settings_key, tasks_key, vendors_key
from server.tasks import leases
from server.tasks.features import FeatureStore
from server.tasks.runner import VendorCall, _fail, hold_lease, run_task
from server.tasks.slots import RunSlot, TaskRow
from server.tasks.store import mark_finished

_HALF_SUBMITTED = "The server taking this task stopped before scheduling it"
_TASK_ROW = "SELECT id, user_id, feature, inputs, attempts, status FROM tasks WHERE id = %s"


class TaskManager:
    def __init__(self, app: web.Application, call: VendorCall) -> None:
        settings = app[settings_key]
        self.app = app
        self.call = call
        self.scheduler = aiojobs.Scheduler(
            limit=settings.tasks.concurrency,
            pending_limit=settings.tasks.pending,
            close_timeout=settings.actors.stop_timeout,
            wait_timeout=settings.actors.stop_timeout,
        )
        self.jobs: dict[str, aiojobs.Job[None]] = {}
        # Running + waiting jobs never exceed this, so spawn never waits for room.
        self._capacity = settings.tasks.concurrency + settings.tasks.pending
        self._claimed = 0  # slots taken by submissions not yet spawned
        self._closing: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ running

    def claim(self) -> RunSlot:
        """A place in the runner (running or waiting), taken before anything is written;
        BUSY when there is none. Use it as a context manager: it is given back on exit
        unless `spawn` used it."""
        if len(self.scheduler) + self._claimed >= self._capacity:
            raise Busy("Too many tasks are waiting to run; retry shortly", retry_after=5)
        self._claimed += 1
        return RunSlot(self._give_back, self._spawn)

    def _give_back(self) -> None:
        self._claimed -= 1

    async def _spawn(self, row: TaskRow) -> None:
        # Room was counted for this job, so the scheduler starts or queues it without waiting.
        run = self._job(row)
        try:
            self.jobs[str(row["id"])] = await self.scheduler.spawn(run, name=f"task:{row['id']}")
        except BaseException:
            run.close()  # the scheduler is closing: recovery runs the task elsewhere
            raise

    async def start(self, task_id: str) -> None:
        """Run a task whose lease this process holds; BUSY when the runner is full."""
        with self.claim() as slot:
            db = self.app[db_key]
            await db.execute("UPDATE tasks SET attempts = attempts + 1 WHERE id = %s", task_id)
            row = await db.fetchone(_TASK_ROW, task_id)
            if row is not None:
                await slot.spawn(row)

    async def _job(self, row: TaskRow) -> None:
        task_id = str(row["id"])
        redis, owner = self.app[redis_key], self.app[instance_id_key]
        ttl_ms = int(self.app[settings_key].tasks.lease_ttl * 1000)
        try:
            # A run that waited in the queue longer than the lease TTL lost its lease; if
            # recovery gave the task to another instance meanwhile, that one runs it.
            if not await leases.renew(redis, task_id, owner, ttl_ms) and not await leases.acquire(
                redis, task_id, owner, ttl_ms
            ):
                logger.warning("task {} waited past its lease and another instance took it", task_id)
                return
            await hold_lease(self.app, task_id, run_task(self.app, row, self.call))
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.opt(exception=True).error("task job {} failed outside its run", task_id)
        finally:
            self.jobs.pop(task_id, None)

    def cancel_local(self, task_id: str) -> None:
        job = self.jobs.get(task_id)
        if job is not None and not job.closed:
            logger.info("stopping task {}: cancelled", task_id)
            closing = asyncio.get_running_loop().create_task(job.close(), name=f"close:{task_id}")
            self._closing.add(closing)  # owned until done: no orphan task
            closing.add_done_callback(self._closing.discard)

    # ------------------------------------------------------------ recovery

    async def recover(self) -> int:
        """Take over active tasks nobody holds; returns how many this call took."""
        settings = self.app[settings_key]
        db, redis, owner = self.app[db_key], self.app[redis_key], self.app[instance_id_key]
        rows = await db.fetchall(
            "SELECT id FROM tasks WHERE status IN ('new', 'queued', 'running') ORDER BY id LIMIT 200"
        )
        ids = [str(r["id"]) for r in rows if str(r["id"]) not in self.jobs]
        held = await leases.held(redis, ids)
        taken = 0
        for task_id in ids:
            if task_id in held:
                continue
            if not await leases.acquire(redis, task_id, owner, int(settings.tasks.lease_ttl * 1000)):
                continue  # another instance took it first
            taken += 1
            row = await db.fetchone(_TASK_ROW, task_id)
            phase = await db.fetchval("SELECT phase FROM quota_transactions WHERE task_id = %s", task_id)
            if row is None or row["status"] not in ("new", "queued", "running"):
                await leases.release(redis, task_id, owner)
            elif row["status"] == "new":  # its submission stopped before answering: never scheduled
                logger.warning("task {} was left half-submitted; failing it", task_id)
                try:
                    await _fail(self.app, row, AppError(ErrorCode.INTERNAL, _HALF_SUBMITTED))
                finally:
                    await leases.release(redis, task_id, owner)
            elif phase == "confirmed":  # died between the charge and the status: it succeeded
                await mark_finished(self.app, task_id, "succeeded", None)
                await leases.release(redis, task_id, owner)
            elif phase == "reserved" and int(row["attempts"]) < settings.tasks.max_attempts:
                logger.warning("recovering task {} (attempt {})", task_id, int(row["attempts"]) + 1)
                await db.execute(
                    "UPDATE tasks SET status = 'queued', progress = 0, runner = %s WHERE id = %s",
                    owner,
                    task_id,
                )
                try:
                    await self.start(task_id)
                except Busy:
                    await leases.release(redis, task_id, owner)  # a later run takes it
            else:
                logger.warning("task {} cannot run again; failing it with its credits returned", task_id)
                try:
                    await _fail(
                        self.app, row, AppError(ErrorCode.INTERNAL, "The server running this task stopped")
                    )
                finally:
                    await leases.release(redis, task_id, owner)
        return taken

    # ------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        await self.scheduler.close()
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=2.0)


async def tasks_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx after the vendors: features (validated against their catalog) and tasks."""
    vendors = app[vendors_key]
    app[features_key] = FeatureStore(app[db_key], app[redis_key], vendors.catalog())
    manager = TaskManager(app, vendors.call)
    app[tasks_key] = manager
    recovery = asyncio.get_running_loop().create_task(manager.recover(), name="tasks:recover-at-start")
    try:
        yield
    finally:
        recovery.cancel()
        await asyncio.gather(recovery, return_exceptions=True)
        await manager.close()
