"""VendorActor: one per AI vendor; at most `concurrency` calls in flight, a bounded
backlog, retries, timeouts, a QPS limit and a circuit breaker. See docs/vendors.md.

A call is two steps, because an actor answers one message per turn and a vendor call
takes seconds: the actor's turn must not be the call.

1. `ask(Call(...))` queues the call in the mailbox (full: MailboxFull, a BUSY, at once).
   The actor takes calls in order; when all `concurrency` slots are busy its turn waits
   for one to free, so waiting calls stay in the mailbox and the mailbox is the ONLY
   queue. With a slot, the actor starts the call as a task it owns, and the ask answers.
2. The task runs the attempts and answers on the Call's own future, `Call.result`.

Limits come from a `Permits` object passed in (server/vendors/permits.py): the local
bound on calls in flight, a permit per call (cluster-wide through Redis for remote
vendors, taken in the turn after a local slot and given back when the call ends), and
the pacing of each attempt (qps).

`call(ref, ...)` does both and returns the VendorResult. If its caller is cancelled, the
future is cancelled, which cancels the call's task (no orphan work) and frees the slot;
a call still queued is skipped when its turn comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, ClassVar

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram as PromHistogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from actors.errors import ActorStopped
from actors.runtime import Actor, ActorRef, Message
from server.timing import backoff_delay
from server.vendors import OperationSpec
from server.vendors.adapters import Adapter, Inputs, VendorError, VendorResult, classify
from server.vendors.config import VendorLimits
from server.vendors.permits import LocalPermits, Permits
from server.vendors.resilience import STATE_NAMES, Breaker, Clock

CALL_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


def _new_result() -> asyncio.Future[VendorResult]:
    return asyncio.get_running_loop().create_future()


@dataclass(frozen=True, slots=True, eq=False)
class Call(Message[None]):
    """Run `operation` on the vendor. Ask it; the ask answers None once the call has a
    slot and has started, then `result` answers the VendorResult or a VendorError.
    Use `call()`, which does both and cancels what its caller abandons.

    `timeout` bounds each attempt (None: the vendor's `timeout`)."""

    operation: str
    inputs: Inputs
    params: Mapping[str, Any] = field(default_factory=dict)
    timeout: float | None = None
    result: asyncio.Future[VendorResult] = field(default_factory=_new_result, repr=False)


async def call(
    ref: ActorRef[Call],
    operation: str,
    inputs: Inputs,
    params: Mapping[str, Any] | None = None,
    *,
    timeout: float | None = None,  # noqa: ASYNC109 - per attempt, enforced by the actor
    queue_timeout: float | None = None,
) -> VendorResult:
    """One vendor call through its actor.

    Raises MailboxFull (BUSY) at once when the backlog is full; AskTimeout (BUSY) when no
    slot freed within `queue_timeout`; ActorStopped (BUSY) when the vendor is shutting
    down; VendorError (UPSTREAM_FAILED, or VALIDATION_FAILED for bad inputs) when the
    call failed after its retries or the breaker is open.
    """
    msg = Call(operation, inputs, params or {}, timeout)
    reply = msg.result
    try:
        await ref.ask(msg, queue_timeout)
        return await reply
    finally:
        if not reply.done():
            reply.cancel()  # still queued or running: the actor skips or cancels it
        elif not reply.cancelled():
            reply.exception()  # mark it seen, even when we leave by cancellation


class VendorMetrics(Collector):
    """The wardrobe_vendor_* metrics on one registry, shared by every VendorActor of an app.

    wardrobe_vendor_call_seconds{vendor,operation} (one observation per attempt, any
    outcome), wardrobe_vendor_errors_total{vendor,kind} (per failed attempt, plus
    breaker_open and busy), and, read from the actors at scrape time,
    wardrobe_vendor_in_flight{vendor}, wardrobe_vendor_concurrency_limit{vendor},
    wardrobe_vendor_queue_depth{vendor}, wardrobe_vendor_breaker_state{vendor}
    (0 closed, 1 half-open, 2 open),
    wardrobe_vendor_cluster_limit_fallback{vendor} (1 while Redis is unreachable and the
    cluster-wide limits are replaced by this process's share).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.actors: dict[str, VendorActor] = {}
        self.call_seconds = PromHistogram(
            "wardrobe_vendor_call_seconds",
            "Time of one vendor attempt, whatever its outcome",
            ["vendor", "operation"],
            buckets=CALL_BUCKETS,
            registry=registry,
        )
        self.errors = PromCounter(
            "wardrobe_vendor_errors",
            "Failed vendor attempts and refused calls, by kind",
            ["vendor", "kind"],
            registry=registry,
        )
        registry.register(self)

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        in_flight, limit, depth, breaker, fallback = families
        for name, actor in list(self.actors.items()):
            in_flight.add_metric([name], actor.in_flight)
            limit.add_metric([name], actor.limits.concurrency)
            depth.add_metric([name], actor.queue_depth)
            breaker.add_metric([name], actor.breaker.state)
            fallback.add_metric([name], int(actor.permits.fallback))
        return families

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("wardrobe_vendor_in_flight", "Vendor calls running now", labels=["vendor"]),
            GaugeMetricFamily(
                "wardrobe_vendor_concurrency_limit", "Calls a vendor may run at once", labels=["vendor"]
            ),
            GaugeMetricFamily(
                "wardrobe_vendor_queue_depth", "Vendor calls waiting for a slot", labels=["vendor"]
            ),
            GaugeMetricFamily(
                "wardrobe_vendor_breaker_state",
                "Circuit breaker: 0 closed, 1 half-open, 2 open",
                labels=["vendor"],
            ),
            GaugeMetricFamily(
                "wardrobe_vendor_cluster_limit_fallback",
                "1 while Redis is unreachable and the vendor's limits are this process's share",
                labels=["vendor"],
            ),
        ]

    def close(self) -> None:
        for collector in (self, self.call_seconds, self.errors):
            self.registry.unregister(collector)


class VendorActor(Actor[Call]):
    """Throttles and guards the calls to one vendor; see the module docstring.

    Spawn `VendorActor.kind_for(vendor, mailbox)(...)`: the runtime sizes mailboxes per
    actor class, so each vendor gets its own subclass (named `VendorActor[<vendor>]`,
    which is also its `kind` in the actor metrics).
    """

    mailbox_size: ClassVar[int] = 100
    passivate_after: ClassVar[float | None] = None
    #: On stop, calls in flight may finish for this long; then they are cancelled.
    drain_timeout: ClassVar[float] = 5.0

    @staticmethod
    @cache
    def kind_for(vendor: str, mailbox: int) -> type[VendorActor]:
        return type(f"VendorActor[{vendor}]", (VendorActor,), {"mailbox_size": mailbox})

    def __init__(
        self,
        vendor: str,
        adapter: Adapter,
        limits: VendorLimits,
        metrics: VendorMetrics,
        *,
        clock: Clock = time.monotonic,
        permits: Permits | None = None,
    ) -> None:
        self.vendor = vendor
        self.adapter = adapter
        self.limits = limits
        self.metrics = metrics
        self.clock = clock
        self.breaker = Breaker(limits.breaker_threshold, limits.breaker_cooldown, clock)
        self.permits: Permits = permits or LocalPermits(limits.concurrency, limits.qps, clock)
        self._calls: set[asyncio.Task[None]] = set()
        self._slot_freed: asyncio.Future[None] | None = None
        self._held = False  # a call taken from the mailbox is waiting for a slot
        self._closing = False
        self._drain = self.drain_timeout
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.attempt_seconds = 0.0  # summed over successful attempts
        self.last_error: dict[str, Any] | None = None

    # ------------------------------------------------------------------ observation

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    @property
    def queue_depth(self) -> int:
        """Calls waiting for a slot: the mailbox, plus the one the actor holds."""
        return self.mailbox_depth + self._held

    def stats(self) -> dict[str, Any]:
        """Plain figures for the ops dashboard and GET /admin/vendors."""
        ok = self.counts["ok"]
        return {
            "vendor": self.vendor,
            "kind": self.adapter.kind,
            "operations": sorted(self.adapter.operations),
            "concurrency": self.limits.concurrency,
            "in_flight": self.in_flight,
            "queue_depth": self.queue_depth,
            "mailbox": self.limits.mailbox,
            "qps": self.limits.qps,
            "limits": self.permits.stats(),
            "breaker": {
                "state": STATE_NAMES[self.breaker.state],
                "failures": self.breaker.failures,
                "opens": self.breaker.opens,
                "retry_in": round(self.breaker.retry_in(), 3),
            },
            "calls": {
                key: self.counts[key]
                for key in ("started", "ok", "failed", "cancelled", "abandoned", "refused", "retries")
            },
            "errors": dict(self.errors),
            "avg_attempt_seconds": round(self.attempt_seconds / ok, 4) if ok else None,
            "last_error": self.last_error,
        }

    # ------------------------------------------------------------------ lifecycle

    def shutdown(self, drain: float | None = None) -> None:
        """Refuse new calls (queued ones fail with ActorStopped, a BUSY), let the calls in
        flight finish for `drain` seconds (default `drain_timeout`), cancel the rest, stop."""
        self._closing = True
        if drain is not None:
            self._drain = drain
        waiter = self._slot_freed
        if waiter is not None and not waiter.done():
            waiter.set_result(None)  # the call held for a slot fails now, not when one frees
        self.stop()

    async def on_start(self) -> None:
        self.metrics.actors[self.vendor] = self  # scraped from now on

    async def on_stop(self) -> None:
        self.metrics.actors.pop(self.vendor, None)
        calls = set(self._calls)
        try:
            if calls:
                await asyncio.wait(calls, timeout=self._drain)
        finally:
            # Also when the system cancels us mid-drain: nothing outlives the actor.
            self._cancel_calls()
            if self._calls:  # let them answer their askers (ActorStopped) before we end
                await asyncio.wait(set(self._calls), timeout=1.0)

    def _cancel_calls(self) -> None:
        for task in self._calls:
            task.cancel()

    # ------------------------------------------------------------------ turns

    async def receive(self, msg: Call) -> None:
        reply = msg.result
        if reply.done():  # its asker gave up while it was queued
            self.counts["abandoned"] += 1
            return
        if self._closing or self.system.closed:
            raise ActorStopped(self.id, f"Vendor {self.vendor} is shutting down")
        inputs, params = self._check(msg)
        if self.breaker.refuses():
            raise self._refused()
        self._held = True
        try:
            while True:
                while len(self._calls) >= self.permits.local_limit:
                    await self._slot_or_gone(reply)
                    if self._gone(reply):
                        return
                lease = await self._permit_or_gone(reply)
                if self._gone(reply):
                    self.permits.release(lease)
                    return
                if lease is not None or len(self._calls) < self.permits.local_limit:
                    break  # a cluster permit, or a local-share slot (the limit may have just shrunk)
        except asyncio.CancelledError:
            self._cancel_calls()  # the system cancels us: on_stop will not run
            raise
        finally:
            self._held = False
        timeout = msg.timeout or self.limits.timeout
        task = asyncio.get_running_loop().create_task(
            self._call_task(msg.operation, inputs, params, timeout, reply, lease),
            name=f"{self.id}:{msg.operation}",
        )
        self._calls.add(task)
        task.add_done_callback(self._call_done)
        reply.add_done_callback(lambda fut: task.cancel() if fut.cancelled() else None)
        self.counts["started"] += 1

    def _check(self, msg: Call) -> tuple[dict[str, bytes | list[bytes]], dict[str, Any]]:
        spec: OperationSpec | None = self.adapter.operations.get(msg.operation)
        try:
            if spec is None:
                known = ", ".join(sorted(self.adapter.operations))
                raise ValueError(f"{self.vendor} has no operation {msg.operation!r} (known: {known})")
            return spec.validate_inputs(msg.inputs), spec.validate_params(msg.params)
        except ValueError as exc:
            self._error("invalid")
            raise VendorError("invalid", str(exc)) from None

    def _gone(self, reply: asyncio.Future[VendorResult]) -> bool:
        """Its asker left (counted abandoned), or the actor is closing (ActorStopped)."""
        if reply.done():
            self.counts["abandoned"] += 1
            return True
        if self._closing:
            raise ActorStopped(self.id, f"Vendor {self.vendor} is shutting down")
        return False

    @contextlib.contextmanager
    def _woken(self, reply: asyncio.Future[VendorResult]) -> Iterator[Callable[[], asyncio.Future[None]]]:
        """While inside: `renew()` makes `_slot_freed` a fresh future, which a call ending
        (`_call_done`) or `reply` being done (its asker left) completes."""
        loop = asyncio.get_running_loop()

        def renew() -> asyncio.Future[None]:
            self._slot_freed = loop.create_future()
            return self._slot_freed

        def wake(_: object) -> None:
            waiter = self._slot_freed
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

        reply.add_done_callback(wake)
        try:
            yield renew
        finally:
            reply.remove_done_callback(wake)
            self._slot_freed = None

    async def _permit_or_gone(self, reply: asyncio.Future[VendorResult]) -> str | None:
        """A permit from `permits.acquire()`, unless `reply` is done or shutdown comes first
        (then the acquire is cancelled and None answered)."""
        acquire = asyncio.ensure_future(self.permits.acquire())
        with self._woken(reply) as renew:
            waiter = renew()
            try:
                while not acquire.done() and not reply.done() and not self._closing:
                    either: set[asyncio.Future[Any]] = {acquire, waiter}
                    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                    if waiter.done() and not acquire.done():  # a local call ended: not our business
                        waiter = renew()
            finally:
                if not acquire.done():
                    acquire.cancel()
                    await asyncio.gather(acquire, return_exceptions=True)
        return acquire.result() if not acquire.cancelled() else None

    async def _slot_or_gone(self, reply: asyncio.Future[VendorResult]) -> None:
        """Wait until a call ends or `reply` is done (its asker left)."""
        with self._woken(reply) as renew:
            await renew()

    def _call_done(self, task: asyncio.Task[None]) -> None:
        self._calls.discard(task)
        waiter = self._slot_freed
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.log.opt(exception=exc).error("{}: call task died: {!r}", self.id, exc)

    # ------------------------------------------------------------------ one call

    async def _call_task(
        self,
        operation: str,
        inputs: Inputs,
        params: Mapping[str, Any],
        timeout: float,  # noqa: ASYNC109
        reply: asyncio.Future[VendorResult],
        lease: str | None,
    ) -> None:
        """The call's task: attempts until success or a final error, answered on `reply`;
        its permit goes back when it ends, however it ends."""
        try:
            result = await self._attempts(operation, inputs, params, timeout)
        except asyncio.CancelledError:
            self.counts["cancelled"] += 1
            if not reply.done():  # cancelled by shutdown, not by its asker
                reply.set_exception(ActorStopped(self.id, f"Vendor {self.vendor} stopped during the call"))
            raise
        except VendorError as exc:
            self.counts["failed"] += 1
            self.last_error = {"kind": exc.kind, "message": exc.message, "at": time.time()}
            self.log.warning("{} {} failed ({}): {}", self.vendor, operation, exc.kind, exc.message)
            if not reply.done():
                reply.set_exception(exc)
        else:
            self.counts["ok"] += 1
            if not reply.done():
                reply.set_result(result)
        finally:
            self.permits.release(lease)

    async def _attempts(
        self,
        operation: str,
        inputs: Inputs,
        params: Mapping[str, Any],
        timeout: float,  # noqa: ASYNC109
    ) -> VendorResult:
        limits = self.limits
        hint: float | None = None
        attempt = 0
        while True:
            attempt += 1
            if attempt > 1:
                self.counts["retries"] += 1
                await asyncio.sleep(backoff_delay(attempt - 1, limits.backoff, limits.backoff_max, hint))
            if not self.breaker.allow():
                raise self._refused()
            started = time.perf_counter()
            try:
                await self.permits.pace()
                started = time.perf_counter()
                async with asyncio.timeout(timeout):
                    result = await self.adapter.call(operation, inputs, params, timeout)
            except asyncio.CancelledError:
                self.breaker.abandoned()
                raise
            except Exception as exc:
                error = classify(exc)
                if error.kind == "internal":
                    self.log.opt(exception=exc).error("{} {}: unexpected error", self.vendor, operation)
                self._observe(operation, started)
                self._error(error.kind)
                if error.unhealthy:
                    self.breaker.unhealthy()
                elif error.neutral:
                    self.breaker.abandoned()
                else:
                    self.breaker.healthy()
                if not error.retryable or attempt > limits.retries:
                    if error is exc:
                        raise
                    raise error from exc
                hint = error.wait_hint
                continue
            self.attempt_seconds += self._observe(operation, started)
            self.breaker.healthy()
            return result

    # ------------------------------------------------------------------ helpers

    def _refused(self) -> VendorError:
        self.counts["refused"] += 1
        self._error("breaker_open")
        retry_in = self.breaker.retry_in()
        return VendorError(
            "breaker_open",
            f"Vendor {self.vendor} is failing; calls fail fast for {retry_in:.0f} s more",
            details={"vendor": self.vendor, "retry_in": round(retry_in, 1)},
        )

    def _error(self, kind: str) -> None:
        self.errors[kind] += 1
        self.metrics.errors.labels(self.vendor, kind).inc()

    def _observe(self, operation: str, started: float) -> float:
        elapsed = time.perf_counter() - started
        self.metrics.call_seconds.labels(self.vendor, operation).observe(elapsed)
        return elapsed


__all__ = ["Call", "VendorActor", "VendorMetrics", "call"]
