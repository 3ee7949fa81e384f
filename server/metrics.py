"""Prometheus metrics: one registry per application, so tests can build many apps."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class PoolCollector(Collector):
    """Reads the pool's gauges at scrape time, so they are never stale."""

    def __init__(self, read: Callable[[], dict[str, int]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        values = self._read()
        for name, doc in (
            ("size", "Connections open in the MySQL pool"),
            ("free", "Idle connections in the MySQL pool"),
            ("in_use", "Connections lent out by the MySQL pool"),
            ("waiting", "Callers waiting to acquire a MySQL connection"),
            ("max", "Upper bound of the MySQL pool"),
        ):
            yield GaugeMetricFamily(f"db_pool_{name}", doc, value=values.get(name, 0))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.http_requests = Counter(
            "http_requests_total",
            "HTTP requests answered, by route template",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "http_request_duration_seconds",
            "Time to answer an HTTP request, by route template",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.db_acquire = Histogram(
            "db_pool_acquire_seconds",
            "Time to acquire a MySQL connection from the pool",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.db_acquire_timeouts = Counter(
            "db_pool_acquire_timeouts_total",
            "Acquires that gave up and answered BUSY",
            registry=self.registry,
        )

        self.cron_runs = Counter(
            "cron_runs_total",
            "Cron job runs by outcome (skipped: another instance had the slot)",
            ["job", "outcome"],
            registry=self.registry,
        )
        self.quota_swept = Counter(
            "quota_sweeper_cancelled_total",
            "Expired reservations the sweeper cancelled",
            registry=self.registry,
        )

        # storage and cost (issue 14, docs/storage.md "Cost figures"); class: upload, output, temporary, other
        self.storage_bytes = Gauge(
            "wardrobe_storage_bytes", "Bytes of the assets on record, by retention class", ["class"],
            registry=self.registry,
        )  # fmt: skip
        self.storage_objects = Gauge(
            "wardrobe_storage_objects",
            "Assets on record, by retention class",
            ["class"],
            registry=self.registry,
        )
        self.storage_bucket_bytes = Gauge(
            "wardrobe_storage_bucket_bytes", "Bytes in the bucket by class (daily listing)", ["class"],
            registry=self.registry,
        )  # fmt: skip
        self.storage_bucket_objects = Gauge(
            "wardrobe_storage_bucket_objects", "Objects in the bucket by class (daily listing)", ["class"],
            registry=self.registry,
        )  # fmt: skip
        self.storage_measured = Gauge(
            "wardrobe_storage_measured_timestamp_seconds",
            "When this instance last measured storage, by source (database, bucket)",
            ["source"],
            registry=self.registry,
        )
        self.storage_monthly_cost = Gauge(
            "wardrobe_storage_monthly_cost_cny",
            "Estimated storage bill per month in CNY (bucket bytes once listed, else the database's)",
            registry=self.registry,
        )
        self.storage_deleted_objects = Counter(
            "wardrobe_storage_deleted_objects", "Objects the cleanup deleted, by class", ["class"],
            registry=self.registry,
        )  # fmt: skip
        self.storage_deleted_bytes = Counter(
            "wardrobe_storage_deleted_bytes", "Bytes the cleanup deleted, by class", ["class"],
            registry=self.registry,
        )  # fmt: skip
        self.storage_avoided_cost = Counter(
            "wardrobe_storage_avoided_cost_cny",
            "Monthly storage cost in CNY no longer billed thanks to deletions (summed over deletions)",
            registry=self.registry,
        )

        # Payments (issue 12).
        self.orders = Counter(
            "payment_orders_total",
            "Order status changes by channel and the status reached (pending: created)",
            ["channel", "status"],
            registry=self.registry,
        )
        self.paid_fen = Counter(
            "payment_paid_fen_total",
            "Money received on paid orders, in fen",
            ["channel"],
            registry=self.registry,
        )
        self.notifications = Counter(
            "payment_notifications_total",
            "Payment notifications received, by provider and outcome (applied, duplicate, refused, error)",
            ["provider", "outcome"],
            registry=self.registry,
        )
        self.payment_provider_calls = Counter(
            "payment_provider_calls_total",
            "Calls to a payment provider by operation and outcome (ok, error, timeout)",
            ["provider", "op", "outcome"],
            registry=self.registry,
        )
        self.payment_provider_seconds = Histogram(
            "payment_provider_call_seconds",
            "Time a payment provider call took",
            ["provider", "op"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.refunds = Counter(
            "payment_refunds_total",
            "Refund status changes by channel and status reached (processing: asked, succeeded, failed)",
            ["channel", "status"],
            registry=self.registry,
        )
        self.refunded_fen = Counter(
            "payment_refunded_fen_total",
            "Money refunded (succeeded refunds), in fen",
            ["channel"],
            registry=self.registry,
        )
        self.clawback_credits = Counter(
            "payment_clawback_credits_total",
            "Credits taken back by refunds (taken), and those that could not be (shortfall)",
            ["result"],
            registry=self.registry,
        )

    def watch_pool(self, read: Callable[[], dict[str, int]]) -> None:
        self.registry.register(PoolCollector(read))
