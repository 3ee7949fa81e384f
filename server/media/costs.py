"""What is stored, per retention class, and what it costs (docs/storage.md "Cost figures").

Two sources: the `assets` table (cheap; every hour) and a listing of the whole bucket
(every object, temporary and orphan ones included; once a day). The estimated monthly
cost is STORAGE_PRICE_PER_GB_MONTH × GB stored (GB = 1024³ bytes, as COS bills), where
the bytes stored are the assets' from the database plus the temporary and other
objects of the last listing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from server.config import Settings
from server.db import Database
from server.media.retention import CLASSES, OTHER, OUTPUT, TEMPORARY, UPLOAD, class_of_key, class_of_row
from server.media.storage import Storage
from server.metrics import Metrics

GB = 1024**3
Figures = dict[str, tuple[int, int]]  # class → (objects, bytes), every class present


def monthly_cost(nbytes: int, price_per_gb_month: float) -> float:
    return nbytes / GB * price_per_gb_month


async def database_figures(db: Database) -> Figures:
    rows = await db.fetchall(
        "SELECT kind, kept_at IS NOT NULL AS kept, COUNT(*) AS n, COALESCE(SUM(bytes), 0) AS b "
        "FROM assets GROUP BY kind, kept_at IS NOT NULL"
    )
    totals = {cls: [0, 0] for cls in CLASSES}
    for r in rows:
        tally = totals[class_of_row(str(r["kind"]), bool(r["kept"]))]
        tally[0] += int(r["n"])
        tally[1] += int(r["b"])
    return {cls: (n, b) for cls, (n, b) in totals.items()}


async def bucket_figures(storage: Storage) -> Figures:
    """Every object of the bucket (or the local root), classed by its key's prefix."""
    totals = {cls: [0, 0] for cls in CLASSES}
    async for page in storage.objects(""):
        for obj in page:
            tally = totals[class_of_key(obj.key)]
            tally[0] += 1
            tally[1] += obj.size
    return {cls: (n, b) for cls, (n, b) in totals.items()}


@dataclass(frozen=True, slots=True)
class StorageReport:
    database: Figures
    bucket: Figures | None  # None: never listed
    price: float

    @property
    def billed_bytes(self) -> int:
        """Asset bytes from the database, plus what only a listing sees (temporary and
        other objects, orphans excluded) from the last listing."""
        assets = sum(b for cls, (_, b) in self.database.items() if cls in (UPLOAD, OUTPUT))
        extra = sum(b for cls, (_, b) in (self.bucket or {}).items() if cls in (TEMPORARY, OTHER))
        return assets + extra

    @property
    def monthly_cost(self) -> float:
        return monthly_cost(self.billed_bytes, self.price)

    def lines(self) -> list[str]:
        """The report `python run.py storage report` prints."""
        out = [
            f"{'class':<10} {'db objects':>11} {'db bytes':>15} {'bucket objects':>15} {'bucket bytes':>15}"
        ]
        for cls in CLASSES:
            n, b = self.database[cls]
            bn, bb = self.bucket[cls] if self.bucket is not None else ("-", "-")
            out.append(f"{cls:<10} {n:>11} {b:>15} {bn:>15} {bb:>15}")
        out.append(
            f"estimated monthly cost: {self.monthly_cost:.4f} CNY for {self.billed_bytes} bytes "
            f"at {self.price:g} CNY per GB-month"
        )
        return out


class StorageMeter:
    """Measures storage and exports the gauges; keeps the last bucket listing between runs.

    `measure()` (hourly) reads the database; `measure(list_bucket=True)` (daily) also
    lists the bucket. Built in the composition root; the cron jobs call it."""

    def __init__(self, db: Database, storage: Storage, settings: Settings, metrics: Metrics | None) -> None:
        self.db, self.storage, self.metrics = db, storage, metrics
        self.price = settings.storage.price_per_gb_month
        self.last_bucket: Figures | None = None

    async def measure(self, *, list_bucket: bool = False) -> StorageReport:
        if list_bucket:
            self.last_bucket = await bucket_figures(self.storage)
        report = StorageReport(await database_figures(self.db), self.last_bucket, self.price)
        if self.metrics is not None:
            self._export(report, listed=list_bucket)
        return report

    def _export(self, report: StorageReport, *, listed: bool) -> None:
        assert self.metrics is not None
        m, now = self.metrics, time.time()
        for cls, (n, b) in report.database.items():
            m.storage_objects.labels(cls).set(n)
            m.storage_bytes.labels(cls).set(b)
        m.storage_measured.labels("database").set(now)
        if listed and report.bucket is not None:
            for cls, (n, b) in report.bucket.items():
                m.storage_bucket_objects.labels(cls).set(n)
                m.storage_bucket_bytes.labels(cls).set(b)
            m.storage_measured.labels("bucket").set(now)
        m.storage_monthly_cost.set(report.monthly_cost)


class DeletionCounter:
    """The cleanup's `on_delete`: counts objects, bytes and the monthly cost they no longer add."""

    def __init__(self, metrics: Metrics, price_per_gb_month: float) -> None:
        self.metrics = metrics
        self.price = price_per_gb_month

    def __call__(self, cls: str, objects: int, nbytes: int) -> None:
        self.metrics.storage_deleted_objects.labels(cls).inc(objects)
        self.metrics.storage_deleted_bytes.labels(cls).inc(nbytes)
        self.metrics.storage_avoided_cost.inc(monthly_cost(nbytes, self.price))
