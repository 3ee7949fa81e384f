"""The orphan-file cleanup: storage objects that nothing refers to any more.

Runs at 03:00 Asia/Shanghai (aiocron, once per cluster) and from
`python run.py clean-files [--dry-run]`. It looks at two prefixes only:

- `u/{user}/{asset id}.{ext}`: asset bytes. `assets.store` writes the file before the
  row, so a crash or a failed insert between the two leaves a file with no row. A file
  is deleted when its last write and the time in its asset id are both older than
  ORPHAN_FILE_MIN_AGE (24 h) and no `assets` row has that id with that key. The age
  bar is far above the milliseconds between the write and the insert, so a file whose
  row is about to appear is never touched. Keys under `u/` that do not have this shape
  are left alone and counted as `unknown`.
- `vendor-inputs/…`: copies of task inputs published for remote vendors
  (server/vendors/setup.py). Their signed URLs die after VENDOR_INPUT_URL_TTL, so each
  is deleted once its last write is older than that plus an hour.

Any other key is never listed. The job is idempotent: a run cut short by a crash or a
storage error is made good by the next night's.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from loguru import logger
from prometheus_client import Counter

from server.config import Settings
from server.db import Database
from server.media.storage import Storage, StoredObject
from server.vendors.facade import INPUT_PREFIX

ASSET_PREFIX = "u/"
VENDOR_INPUT_PREFIX = f"{INPUT_PREFIX}/"
VENDOR_INPUT_MARGIN_S = 3600
_ASSET_KEY = re.compile(r"u/[0-9]+/([0-9a-f]{24})\.[a-z0-9]+")


@dataclass
class OrphanReport:
    scanned: int = 0
    unknown: int = 0  # keys under u/ that are not an asset's; left alone
    orphans: dict[str, list[str]] = field(default_factory=dict)  # prefix → keys, every prefix listed

    @property
    def found(self) -> int:
        return sum(len(keys) for keys in self.orphans.values())


def _id_time(asset_id: str) -> float:
    """Unix seconds from the first 12 hex digits of an asset id (server/assets.new_id)."""
    return int(asset_id[:12], 16) / 1000


async def _asset_orphans(db: Database, page: list[StoredObject], before: float) -> tuple[list[str], int]:
    """Keys of `page` that are old asset files with no row, and how many keys were not an asset's."""
    candidates: dict[str, str] = {}
    unknown = 0
    for obj in page:
        match = _ASSET_KEY.fullmatch(obj.key)
        if match is None:
            unknown += 1
        elif obj.modified < before and _id_time(match[1]) < before:
            candidates[match[1]] = obj.key
    if not candidates:
        return [], unknown
    marks = ",".join(["%s"] * len(candidates))
    rows = await db.fetchall(f"SELECT id, storage_key FROM assets WHERE id IN ({marks})", *candidates)
    referenced = {(str(r["id"]), str(r["storage_key"])) for r in rows}
    return [key for asset_id, key in candidates.items() if (asset_id, key) not in referenced], unknown


async def clean_orphans(
    db: Database,
    storage: Storage,
    settings: Settings,
    *,
    now: float | None = None,
    dry_run: bool = False,
    on_delete: Callable[[str, int], None] | None = None,
) -> OrphanReport:
    """Find (and unless `dry_run`, delete page by page) the orphans under both prefixes."""
    now = time.time() if now is None else now
    report = OrphanReport()
    bars = {
        ASSET_PREFIX: now - settings.storage.orphan_file_min_age,
        VENDOR_INPUT_PREFIX: now - settings.vendor_input_url_ttl - VENDOR_INPUT_MARGIN_S,
    }
    for prefix, before in bars.items():
        found = report.orphans[prefix] = []
        async for page in storage.objects(prefix):
            report.scanned += len(page)
            if prefix == ASSET_PREFIX:
                orphans, unknown = await _asset_orphans(db, page, before)
                report.unknown += unknown
            else:
                orphans = [obj.key for obj in page if obj.modified < before]
            if orphans and not dry_run:
                await storage.delete(orphans)
                if on_delete is not None:
                    on_delete(prefix, len(orphans))
            found.extend(orphans)
    return report


async def clean_orphan_files(db: Database, storage: Storage, settings: Settings, counter: Counter) -> int:
    """The cron job: returns how many objects it deleted, counted per prefix in `counter`."""
    report = await clean_orphans(
        db, storage, settings, on_delete=lambda prefix, n: counter.labels(prefix).inc(n)
    )
    if report.unknown:
        logger.warning("orphan cleanup: {} key(s) under u/ are not asset files; left alone", report.unknown)
    logger.info(
        "orphan cleanup: scanned {} object(s), deleted {}",
        report.scanned,
        {prefix: len(keys) for prefix, keys in report.orphans.items()},
    )
    return report.found
