"""Prometheus metrics: one registry per application, so tests can build many apps.

Every family the app defines is named `wardrobe_<subsystem>_<name>_<unit>` (base units:
seconds, bytes; counters end in `_total`), and labels hold bounded values only (route
templates, job and vendor names, status words; never ids). prometheus-client's own
process_* and python_* collectors are kept under their standard names. No `_created`
series: `create_app` turns them off (`disable_created_metrics`). docs/ops.md lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

_M = TypeVar("_M", bound=MetricWrapperBase)

NAMESPACE = "wardrobe"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
JOB_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
TASK_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

DB_POOL_GAUGES = (
    ("size", "Connections open in the MySQL pool"),
    ("free", "Idle connections in the MySQL pool"),
    ("in_use", "Connections lent out by the MySQL pool"),
    ("waiting", "Callers waiting to acquire a MySQL connection"),
    ("max", "Upper bound of the MySQL pool"),
)
REDIS_POOL_GAUGES = (
    ("in_use", "Connections lent out by the Redis pool"),
    ("idle", "Idle connections in the Redis pool"),
    ("waiting", "Callers waiting for a Redis connection"),
    ("max", "Upper bound of the Redis pool (REDIS_MAX_CONNECTIONS)"),
)


class PoolCollector(Collector):
    """Reads a pool's gauges at scrape time, so they are never stale."""

    def __init__(
        self,
        prefix: str,
        gauges: tuple[tuple[str, str], ...],
        read: Callable[[], Mapping[str, int]],
        counters: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self._prefix = prefix
        self._gauges = gauges
        self._counters = counters
        self._read = read

    def collect(self) -> Iterable[Metric]:
        values = self._read()
        for name, doc in self._gauges:
            yield GaugeMetricFamily(f"{self._prefix}_{name}", doc, value=values.get(name, 0))
        for name, doc in self._counters:
            yield CounterMetricFamily(f"{self._prefix}_{name}", doc, value=values.get(name, 0))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        r = self.registry
        # -- HTTP (server/middleware.py)
        self.http_requests = Counter(
            "wardrobe_http_requests_total",
            "HTTP requests answered, by route template",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "wardrobe_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._children: dict[tuple[int, tuple[str, ...]], MetricWrapperBase] = {}
        self.http_errors = Counter(
            "wardrobe_http_errors_total",
            "Error envelopes answered, by route template and error code (BUSY, UNAVAILABLE, ...)",
            ["route", "code"],
            registry=r,
        )
        # -- MySQL (server/db.py); the pool gauges come from watch_pool
        self.db_acquire = Histogram(
            "wardrobe_db_pool_acquire_seconds",
            "Time to acquire a MySQL connection from the pool",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.db_acquire_timeouts = Counter(
            "wardrobe_db_pool_acquire_timeouts_total",
            "Acquires that gave up and answered BUSY",
            registry=r,
        )
        # -- cron (server/cron.py)
        self.cron_runs = Counter(
            "wardrobe_cron_runs_total",
            "Cron job runs by result: ok, error, skipped (another instance had the slot)",
            ["job", "result"],
            registry=r,
        )
        self.cron_duration = Histogram(
            "wardrobe_cron_duration_seconds",
            "Time of the cron job runs this instance did, whatever their result",
            ["job"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.cron_last_start = Gauge(
            "wardrobe_cron_last_start_timestamp_seconds",
            "Unix time this instance last started the job",
            ["job"],
            registry=r,
        )
        self.cron_last_end = Gauge(
            "wardrobe_cron_last_end_timestamp_seconds",
            "Unix time this instance last finished the job, whatever its result",
            ["job"],
            registry=r,
        )
        self.cron_last_success = Gauge(
            "wardrobe_cron_last_success_timestamp_seconds",
            "Unix time this instance last finished the job without error",
            ["job"],
            registry=r,
        )
        self.cron_next_run = Gauge(
            "wardrobe_cron_next_run_timestamp_seconds",
            "Unix time of the job's next scheduled run",
            ["job"],
            registry=r,
        )
        self.cron_period = Gauge(
            "wardrobe_cron_period_seconds",
            "Seconds between two scheduled runs of the job",
            ["job"],
            registry=r,
        )
        # -- credits (server/credits); the gauges are cluster figures from MySQL, refreshed
        # by every instance's `ops-gauges` job (aggregate them with max())
        self.credits_swept = Counter(
            "wardrobe_credits_sweeper_cancelled_total",
            "Expired reservations the sweeper cancelled",
            registry=r,
        )
        self.credits_reservations_open = Gauge(
            "wardrobe_credits_reservations_open",
            "Reservations not yet confirmed or cancelled (cluster-wide)",
            registry=r,
        )
        self.credits_reserved = Gauge(
            "wardrobe_credits_reserved",
            "Credits held by open reservations (cluster-wide)",
            registry=r,
        )
        self.credits_reservations_overdue = Gauge(
            "wardrobe_credits_reservations_overdue",
            "Open reservations past their expiry (TTL), which the sweeper should have cancelled",
            registry=r,
        )
        # -- tasks (server/tasks)
        self.tasks = Gauge(
            "wardrobe_tasks",
            "Tasks by status (cluster-wide, from MySQL)",
            ["status"],
            registry=r,
        )
        self.tasks_finished = Counter(
            "wardrobe_tasks_finished_total",
            "Task runs this instance brought to a final status",
            ["status"],
            registry=r,
        )
        self.task_run_seconds = Histogram(
            "wardrobe_task_run_seconds",
            "Time of one task run on this instance, by feature, whatever its outcome",
            ["feature"],
            buckets=TASK_BUCKETS,
            registry=r,
        )

        # storage and cost (issue 14, docs/storage.md "Cost figures"); class: upload, output, temporary, other
        self.storage_bytes = Gauge(
            "wardrobe_storage_bytes", "Bytes of the assets on record, by retention class", ["class"],
            registry=r,
        )  # fmt: skip
        self.storage_objects = Gauge(
            "wardrobe_storage_objects",
            "Assets on record, by retention class",
            ["class"],
            registry=r,
        )
        self.storage_bucket_bytes = Gauge(
            "wardrobe_storage_bucket_bytes", "Bytes in the bucket by class (daily listing)", ["class"],
            registry=r,
        )  # fmt: skip
        self.storage_bucket_objects = Gauge(
            "wardrobe_storage_bucket_objects", "Objects in the bucket by class (daily listing)", ["class"],
            registry=r,
        )  # fmt: skip
        self.storage_measured = Gauge(
            "wardrobe_storage_measured_timestamp_seconds",
            "When this instance last measured storage, by source (database, bucket)",
            ["source"],
            registry=r,
        )
        self.storage_monthly_cost = Gauge(
            "wardrobe_storage_monthly_cost_cny",
            "Estimated storage bill per month in CNY (bucket bytes once listed, else the database's)",
            registry=r,
        )
        self.storage_deleted_objects = Counter(
            "wardrobe_storage_deleted_objects", "Objects the cleanup deleted, by class", ["class"],
            registry=r,
        )  # fmt: skip
        self.storage_deleted_bytes = Counter(
            "wardrobe_storage_deleted_bytes", "Bytes the cleanup deleted, by class", ["class"],
            registry=r,
        )  # fmt: skip
        self.storage_avoided_cost = Counter(
            "wardrobe_storage_avoided_cost_cny",
            "Monthly storage cost in CNY no longer billed thanks to deletions (summed over deletions)",
            registry=r,
        )

        # Payments (issue 12).
        self.orders = Counter(
            "wardrobe_payment_orders_total",
            "Order status changes by channel and the status reached (pending: created)",
            ["channel", "status"],
            registry=r,
        )
        self.paid_fen = Counter(
            "wardrobe_payment_paid_fen_total",
            "Money received on paid orders, in fen",
            ["channel"],
            registry=r,
        )
        self.orders_by_status = Gauge(
            "wardrobe_orders",
            "Orders by channel and status (cluster-wide, from MySQL; aggregate with max())",
            ["channel", "status"],
            registry=r,
        )
        self.notifications = Counter(
            "wardrobe_payment_notifications_total",
            "Payment notifications received, by provider and outcome (applied, duplicate, refused, error)",
            ["provider", "outcome"],
            registry=r,
        )
        self.payment_provider_calls = Counter(
            "wardrobe_payment_provider_calls_total",
            "Calls to a payment provider by operation and outcome (ok, error, timeout)",
            ["provider", "op", "outcome"],
            registry=r,
        )
        self.payment_provider_seconds = Histogram(
            "wardrobe_payment_provider_call_seconds",
            "Time a payment provider call took",
            ["provider", "op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.refunds = Counter(
            "wardrobe_payment_refunds_total",
            "Refund status changes by channel and status reached (processing: asked, succeeded, failed)",
            ["channel", "status"],
            registry=r,
        )
        self.refunded_fen = Counter(
            "wardrobe_payment_refunded_fen_total",
            "Money refunded (succeeded refunds), in fen",
            ["channel"],
            registry=r,
        )
        self.clawback_credits = Counter(
            "wardrobe_payment_clawback_credits_total",
            "Credits taken back by refunds (taken), and those that could not be (shortfall)",
            ["result"],
            registry=r,
        )

    def child(self, metric: _M, *values: str) -> _M:
        """`metric.labels(*values)`, kept: `labels()` takes a lock and looks the child up
        on every call (~4 % of a GET /me, for the two children of `http_answered`). For the
        metrics on a hot path; the children kept are as many as the series themselves."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found  # type: ignore[return-value]  # labels() returns the metric's own type

    def http_answered(self, method: str, route: str, status: int, seconds: float) -> None:
        """One answered request (the envelope middleware): its count and its time."""
        self.child(self.http_requests, method, route, str(status)).inc()
        self.child(self.http_duration, method, route).observe(seconds)

    def provider_called(self, provider: str, op: str, outcome: str, seconds: float) -> None:
        """One payment provider call (the SDK pools): its count and its time."""
        self.child(self.payment_provider_calls, provider, op, outcome).inc()
        self.child(self.payment_provider_seconds, provider, op).observe(seconds)

    def watch_pool(self, read: Callable[[], Mapping[str, int]]) -> None:
        """The MySQL pool's gauges, wardrobe_db_pool_{size,free,in_use,waiting,max}."""
        self.registry.register(PoolCollector(f"{NAMESPACE}_db_pool", DB_POOL_GAUGES, read))

    def watch_redis_pool(self, read: Callable[[], Mapping[str, int]]) -> None:
        """wardrobe_redis_pool_{in_use,idle,waiting,max} and _exhausted_total (BUSY)."""
        exhausted = (("exhausted", "Redis calls that found the pool full past REDIS_TIMEOUT (BUSY)"),)
        self.registry.register(PoolCollector(f"{NAMESPACE}_redis_pool", REDIS_POOL_GAUGES, read, exhausted))

    def watch_task_jobs(self, read: Callable[[], Mapping[str, int]]) -> None:
        """wardrobe_task_jobs{state}: task runs on this instance (running, pending)."""
        self.registry.register(_TaskJobsCollector(read))


class _TaskJobsCollector(Collector):
    def __init__(self, read: Callable[[], Mapping[str, int]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "wardrobe_task_jobs", "Task runs on this instance, by state (running, pending)", labels=["state"]
        )
        for state, value in sorted(self._read().items()):
            family.add_metric([state], value)
        yield family
