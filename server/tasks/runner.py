"""Running a task's pipeline: steps on vendor actors, FORK/JOIN, progress, settlement.

Each task runs as an aiojobs job (bounded: TASK_CONCURRENCY running, TASK_PENDING
waiting, beyond that BUSY). The job holds the task's lease in Redis and renews it;
every step's state is written to `task_steps`; progress goes out as events (at
most 5 a second per task); the output becomes an asset. Then the credits settle —
confirm on success, cancel on failure — and only then the task's final status.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

from loguru import logger
from PIL import Image

from actors.errors import AskTimeout, MailboxFull
from server.errors import AppError, ErrorCode
from server.media import assets
from server.media.images import ValidatedImage
from server.tasks import leases, states, store
from server.tasks.deps import TaskDeps
from server.tasks.features import Feature
from server.tasks.leases import cancel_key
from server.tasks.pipeline import CallStep, Combiner, ForkStep, JoinStep
from server.tasks.slots import Run
from server.timing import backoff_delay
from server.vendors.adapters import VendorResult


class VendorCalls(Protocol):
    """What a run needs of the vendors (`server.vendors.facade.Vendors` is one)."""

    async def call(
        self,
        vendor: str,
        operation: str,
        inputs: Mapping[str, bytes | list[bytes]],
        params: Mapping[str, Any] | None = None,
    ) -> VendorResult: ...

    def queue_timeout(self, vendor: str) -> float: ...


PROGRESS_INTERVAL_S = 0.2


class PipelineRun:
    def __init__(
        self,
        deps: TaskDeps,
        task: Mapping[str, Any],
        feature: Feature,
        inputs: dict[str, bytes],
        vendors: VendorCalls,
    ) -> None:
        self.deps = deps
        self.task_id = str(task["id"])
        self.user_id = int(task["user_id"])
        self.attempt = int(task["attempts"])
        self.feature = feature
        self.inputs = inputs
        self.vendors = vendors
        self.total = max(1, feature.pipeline.call_count())
        self.done = 0
        self._last_progress = 0.0
        self.join_mode = {s.fork: s.mode for s in feature.pipeline.steps if isinstance(s, JoinStep)}

    # -------------------------------------------------------------- persistence

    async def _start_step(
        self,
        step_id: str,
        *,
        parent: str | None = None,
        vendor: str | None = None,
        operation: str | None = None,
    ) -> None:
        await states.start_step(
            self.deps.db,
            self.task_id,
            step_id,
            self.attempt,
            parent=parent,
            vendor=vendor,
            operation=operation,
        )

    async def _finish_step(
        self, step_id: str, status: Literal["succeeded", "failed", "cancelled"], error: str | None = None
    ) -> None:
        await states.finish_step(self.deps.db, self.task_id, step_id, status, error)

    async def _progress(self) -> None:
        """Write, then announce (≤ 5 a second) the share of calls done. The last call's 1.0
        is written with the final status and announced with it (run_task)."""
        self.done += 1
        if self.done >= self.total:
            return
        progress = self.done / self.total
        await self.deps.db.execute("UPDATE tasks SET progress = %s WHERE id = %s", progress, self.task_id)
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_INTERVAL_S:
            self._last_progress = now
            await self.deps.hub.publish(
                self.user_id, "task.progress", {"task_id": self.task_id, "progress": round(progress, 4)}
            )

    # -------------------------------------------------------------- execution

    def _resolve(self, ref: str, outputs: dict[str, VendorResult]) -> bytes:
        kind, _, name = ref.partition(".")
        return self.inputs[name] if kind == "$input" else outputs[name].data

    async def _vendor(
        self, vendor: str, operation: str, inputs: Mapping[str, Any], params: Mapping[str, Any]
    ) -> VendorResult:
        """One vendor call. A full mailbox (refused at once, nothing queued) is tried again
        with backoff (50 ms doubling to 1 s) for as long as a queued call may wait for a
        slot, the vendor's queue timeout; a call that waited that long in the queue, or
        was refused for that long, fails the step: retrying would only wait again."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        attempt = 0
        while True:
            try:
                return await self.vendors.call(vendor, operation, inputs, params)
            except MailboxFull as exc:
                wait = self.vendors.queue_timeout(vendor)
                deadline = deadline if deadline is not None else loop.time() + wait
                if loop.time() >= deadline:
                    raise AppError(
                        ErrorCode.UPSTREAM_FAILED, f"Vendor {vendor} had no free slot within {wait:g}s"
                    ) from exc
                attempt += 1
                await asyncio.sleep(min(backoff_delay(attempt, 0.05, 1.0), max(0.0, deadline - loop.time())))
            except AskTimeout as exc:
                raise AppError(
                    ErrorCode.UPSTREAM_FAILED,
                    f"Vendor {vendor} had no free slot within {exc.timeout:g}s",
                ) from exc

    async def _vendor_step(
        self,
        step_id: str,
        vendor: str,
        operation: str,
        inputs: Callable[[], Mapping[str, Any]],
        params: Mapping[str, Any],
        parent: str | None,
    ) -> VendorResult:
        """One vendor call as a step: running, then succeeded (with progress), failed or cancelled.
        `inputs` is resolved inside, so a step whose inputs cannot be built is recorded as failed."""
        await self._start_step(step_id, parent=parent, vendor=vendor, operation=operation)
        try:
            out = await self._vendor(vendor, operation, inputs(), params)
        except asyncio.CancelledError:
            await asyncio.shield(self._finish_step(step_id, "cancelled"))
            raise
        except Exception as exc:
            await self._finish_step(step_id, "failed", _describe(exc))
            raise
        await self._finish_step(step_id, "succeeded")
        await self._progress()
        return out

    async def _call(
        self, step: CallStep, outputs: dict[str, VendorResult], parent: str | None = None
    ) -> VendorResult:
        def inputs() -> dict[str, Any]:
            return {
                name: self._resolve(v, outputs)
                if isinstance(v, str)
                else [self._resolve(r, outputs) for r in v]
                for name, v in step.inputs.items()
            }

        return await self._vendor_step(step.id, step.vendor, step.operation, inputs, step.params, parent)

    async def _fork(self, step: ForkStep, outputs: dict[str, VendorResult]) -> list[VendorResult]:
        """Run the branches; what counts as done depends on the join's mode."""
        mode = self.join_mode[step.id]
        await self._start_step(step.id)
        jobs = [asyncio.ensure_future(self._call(b, outputs, parent=step.id)) for b in step.branches]
        try:
            if mode == "all":
                results: list[VendorResult] = list(await asyncio.gather(*jobs))
            elif mode == "any":
                done = await asyncio.gather(*jobs, return_exceptions=True)
                results = [r for r in done if isinstance(r, VendorResult)]
                if not results:
                    raise next(e for e in done if isinstance(e, BaseException))
            else:  # first_success
                results = []
                pending: set[asyncio.Future[VendorResult]] = set(jobs)
                error: BaseException | None = None
                while pending and not results:
                    finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for f in finished:
                        if f.exception() is None:
                            results.append(f.result())
                        else:
                            error = error or f.exception()
                if not results:
                    assert error is not None
                    raise error
        except BaseException as exc:
            await _cancel_all(jobs)
            failed = isinstance(exc, Exception)
            if failed:
                await asyncio.shield(self._finish_step(step.id, "failed", _describe(exc)))
            else:
                await asyncio.shield(self._finish_step(step.id, "cancelled"))
            raise
        await _cancel_all(jobs)  # first_success: the losers stop here
        await self._finish_step(step.id, "succeeded")
        return results

    async def _join(self, step: JoinStep, branch_outputs: list[VendorResult]) -> VendorResult:
        c: Combiner | None = step.combiner
        if c is None:
            return branch_outputs[0]
        return await self._vendor_step(
            step.id,
            c.vendor,
            c.operation,
            lambda: {c.input: [o.data for o in branch_outputs]},
            c.params,
            step.fork,
        )

    async def execute(self) -> VendorResult:
        outputs: dict[str, VendorResult] = {}
        forks: dict[str, list[VendorResult]] = {}
        for step in self.feature.pipeline.steps:
            if isinstance(step, CallStep):
                outputs[step.id] = await self._call(step, outputs)
            elif isinstance(step, ForkStep):
                forks[step.id] = await self._fork(step, outputs)
            else:
                outputs[step.id] = await self._join(step, forks[step.fork])
        return outputs[self.feature.pipeline.output]


async def _cancel_all(jobs: Sequence[asyncio.Future[Any]]) -> None:
    for j in jobs:
        j.cancel()
    await asyncio.gather(*jobs, return_exceptions=True)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, AppError):
        return f"{exc.code.value}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------ one task


async def _publish_status(deps: TaskDeps, user_id: int, task_id: str, status: str) -> None:
    await deps.hub.publish(user_id, "task.updated", {"task_id": task_id, "status": status})


async def fail(deps: TaskDeps, task: Mapping[str, Any], error: AppError) -> None:
    """Return the credits, then mark the task failed (unless it was cancelled meanwhile)."""
    task_id, user_id = str(task["id"]), int(task["user_id"])
    try:
        await deps.credits.cancel(user_id, task_id, f"failed: {error.message}")
    except AppError as exc:
        # CONFLICT: settled meanwhile; NOT_FOUND: a half-submitted task never reserved any.
        if exc.code not in (ErrorCode.CONFLICT, ErrorCode.NOT_FOUND):
            raise
    if await store.finish(deps, task_id, "failed", error):
        await _publish_status(deps, user_id, task_id, "failed")


async def run_task(deps: TaskDeps, run: Run, vendors: VendorCalls) -> bool:
    """The whole life of one task run; the caller holds its lease. True when the task has
    its final status (whoever gave it). Timed by feature in wardrobe_task_run_seconds,
    whatever the outcome."""
    began = time.perf_counter()
    try:
        return await _run_task(deps, run, vendors)
    finally:
        deps.metrics.task_run_seconds.labels(str(run.row["feature"])).observe(time.perf_counter() - began)


async def _run_task(deps: TaskDeps, run: Run, vendors: VendorCalls) -> bool:
    task = run.row
    task_id, user_id = str(task["id"]), int(task["user_id"])
    db = deps.db
    settings = deps.settings
    try:
        feature = run.feature or await deps.features.get_any(str(task["feature"]))
        if not await states.start(db, task_id):
            return False  # cancelled before it began (or no longer this run's to start)
        await _publish_status(deps, user_id, task_id, "running")
        storage = deps.storage
        refs = json.loads(task["inputs"])
        mine = run.inputs
        if mine is None:
            mine = await assets.owned(
                db, user_id, [v for k, v in refs.items() if feature.inputs[k].type == "image"]
            )
        images = {k: await storage.get(mine[v].storage_key) for k, v in refs.items() if v in mine}
        pipeline = PipelineRun(deps, task, feature, images, vendors)
        async with asyncio.timeout(settings.tasks.timeout):
            out = await pipeline.execute()
        image = ValidatedImage(out.data, out.content_type, *_size(out.data), len(out.data))
        await assets.store(db, storage, user_id, image, kind="output", task_id=task_id)
    except asyncio.CancelledError:
        raise  # user cancel (already settled) or shutdown (recovery takes it over)
    except TimeoutError:
        await fail(
            deps,
            task,
            AppError(ErrorCode.UPSTREAM_FAILED, f"The task took longer than {settings.tasks.timeout:.0f}s"),
        )
        return True
    except AppError as exc:
        await fail(deps, task, exc)
        return True
    except Exception as exc:
        logger.opt(exception=True).error("task {} crashed", task_id)
        await fail(deps, task, AppError(ErrorCode.INTERNAL, f"The task failed: {type(exc).__name__}"))
        return True
    try:
        await deps.credits.confirm(user_id, task_id)
    except AppError as exc:
        if exc.code == ErrorCode.CONFLICT:
            return True  # cancelled while the last step ran: the credits went back, no charge
        raise
    if await store.finish(deps, task_id, "succeeded", None):  # progress 1 with it
        await asyncio.gather(  # one round trip to the hub, in this order
            deps.hub.publish(user_id, "task.progress", {"task_id": task_id, "progress": 1.0}),
            _publish_status(deps, user_id, task_id, "succeeded"),
        )
    return True


def _size(data: bytes) -> tuple[int, int]:
    """Width and height from the image header (no pixel decoding)."""
    with Image.open(io.BytesIO(data)) as im:
        return im.size


async def hold_lease(deps: TaskDeps, task_id: str, body: Awaitable[bool]) -> None:
    """Run `body` while renewing the task's lease; stop it if the lease is lost. The lease
    is given back unless `body` answers True (the task has its final status): then it
    just expires, as nothing acts on the lease of a finished task (one round trip less)."""
    redis, owner = deps.redis, deps.owner
    ttl = deps.settings.tasks.lease_ttl
    work = asyncio.ensure_future(body)
    finished = False
    try:
        while not work.done():
            await asyncio.wait({work}, timeout=leases.renew_interval(ttl))
            if work.done():
                break
            if await redis.exists(cancel_key(task_id)):
                logger.info("task {} was cancelled through another instance; stopping", task_id)
                work.cancel()
            elif not await leases.renew(redis, task_id, owner, int(ttl * 1000)):
                logger.warning("task {} lost its lease; stopping here", task_id)
                work.cancel()
        finished = await work
    finally:
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
        if not finished:
            await asyncio.shield(leases.release(redis, task_id, owner))
