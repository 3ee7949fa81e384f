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

import aiojobs
from loguru import logger

from server.errors import AppError, Busy, ErrorCode
from server.tasks import leases, states, store
from server.tasks.deps import TaskDeps
from server.tasks.runner import VendorCalls, fail, hold_lease, run_task
from server.tasks.slots import Run, RunSlot

_HALF_SUBMITTED = "The server taking this task stopped before scheduling it"
_TASK_ROW = "SELECT id, user_id, feature, inputs, attempts, status FROM tasks WHERE id = %s"


class TaskManager:
    def __init__(self, deps: TaskDeps, vendors: VendorCalls) -> None:
        settings = deps.settings
        self.deps = deps
        self.vendors = vendors
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
        self._waiting: set[str] = set()  # spawned, not yet running: their leases renewed here
        self._renewer: asyncio.Task[None] | None = None

    def start_renewing(self) -> None:
        """Keep the leases of runs waiting in the queue alive (a running one renews its own
        in hold_lease), so a long queue never lets recovery hand a waiting task to another
        instance."""
        self._renewer = asyncio.get_running_loop().create_task(self._renew_waiting(), name="tasks:renew")

    async def _renew_waiting(self) -> None:
        ttl = self.deps.settings.tasks.lease_ttl
        while True:
            await asyncio.sleep(leases.renew_interval(ttl))
            waiting = list(self._waiting)
            try:
                kept = await asyncio.gather(
                    *(leases.renew(self.deps.redis, t, self.deps.owner, int(ttl * 1000)) for t in waiting)
                )
            except Exception as exc:  # Redis away: the runs check their lease when they start
                logger.warning("could not renew the leases of {} waiting task(s): {}", len(waiting), exc)
                continue
            for task_id, ok in zip(waiting, kept, strict=True):
                if not ok:
                    logger.warning("waiting task {} lost its lease", task_id)

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

    async def _spawn(self, run: Run) -> None:
        # Room was counted for this job, so the scheduler starts or queues it without waiting.
        job = self._job(run)
        task_id = str(run.row["id"])
        self._waiting.add(task_id)
        try:
            self.jobs[task_id] = await self.scheduler.spawn(job, name=f"task:{task_id}")
        except BaseException:
            self._waiting.discard(task_id)
            job.close()  # the scheduler is closing: recovery runs the task elsewhere
            raise

    async def start(self, task_id: str) -> None:
        """Run a task whose lease this process holds; BUSY when the runner is full."""
        with self.claim() as slot:
            db = self.deps.db
            await db.execute("UPDATE tasks SET attempts = attempts + 1 WHERE id = %s", task_id)
            row = await db.fetchone(_TASK_ROW, task_id)
            if row is not None:
                await slot.spawn(Run(row, leased_at=0.0))  # renewed when it starts

    async def _job(self, run: Run) -> None:
        task_id = str(run.row["id"])
        self._waiting.discard(task_id)
        redis, owner = self.deps.redis, self.deps.owner
        ttl = self.deps.settings.tasks.lease_ttl
        ttl_ms = int(ttl * 1000)
        try:
            # A run that starts within one renewal interval of taking its lease still has
            # at least two thirds of it (hold_lease renews from here on). One that waited in
            # the queue longer may have lost it; if recovery gave the task to another
            # instance meanwhile, that one runs it.
            fresh = asyncio.get_running_loop().time() - run.leased_at < leases.renew_interval(ttl)
            if not fresh and not (
                await leases.renew(redis, task_id, owner, ttl_ms)
                or await leases.acquire(redis, task_id, owner, ttl_ms)
            ):
                logger.warning("task {} waited past its lease and another instance took it", task_id)
                return
            await hold_lease(self.deps, task_id, run_task(self.deps, run, self.vendors))
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.opt(exception=True).error("task job {} failed outside its run", task_id)
        finally:
            self.jobs.pop(task_id, None)

    def stats(self) -> dict[str, int]:
        return {
            "running": self.scheduler.active_count,
            "pending": self.scheduler.pending_count,
            "jobs": len(self.jobs),
        }

    def cancel_local(self, task_id: str) -> None:
        self._waiting.discard(task_id)  # a run closed before it began renews nothing
        job = self.jobs.get(task_id)
        if job is not None and not job.closed:
            logger.info("stopping task {}: cancelled", task_id)
            closing = asyncio.get_running_loop().create_task(job.close(), name=f"close:{task_id}")
            self._closing.add(closing)  # owned until done: no orphan task
            closing.add_done_callback(self._closing.discard)

    # ------------------------------------------------------------ recovery

    async def recover(self) -> int:
        """Take over active tasks nobody holds; returns how many this call took."""
        settings = self.deps.settings
        db, redis, owner = self.deps.db, self.deps.redis, self.deps.owner
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
                    await fail(self.deps, row, AppError(ErrorCode.INTERNAL, _HALF_SUBMITTED))
                finally:
                    await leases.release(redis, task_id, owner)
            elif phase == "confirmed":  # died between the charge and the status: it succeeded
                await store.finish(self.deps, task_id, "succeeded", None)
                await leases.release(redis, task_id, owner)
            elif phase == "reserved" and int(row["attempts"]) < settings.tasks.max_attempts:
                logger.warning("recovering task {} (attempt {})", task_id, int(row["attempts"]) + 1)
                await states.requeue(db, task_id, owner)
                try:
                    await self.start(task_id)
                except Busy:
                    await leases.release(redis, task_id, owner)  # a later run takes it
            else:
                logger.warning("task {} cannot run again; failing it with its credits returned", task_id)
                try:
                    await fail(
                        self.deps, row, AppError(ErrorCode.INTERNAL, "The server running this task stopped")
                    )
                finally:
                    await leases.release(redis, task_id, owner)
        return taken

    # ------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
        await self.scheduler.close()
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=2.0)
