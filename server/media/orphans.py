"""The nightly storage cleanup: expired outputs, orphan files and temporary objects.

Runs at 03:00 Asia/Shanghai (aiocron, once per cluster) and from
`python run.py clean-files [--dry-run]`. In order:

1. **Expired outputs.** `assets` rows of kind `output` that nobody kept and that are
   older than OUTPUT_RETENTION_DAYS are deleted (by kind, so outputs stored under `u/`
   before the `o/` prefix existed expire too). Their objects become orphans for step 2.
2. **Orphan files** under `u/` and `o/` (`{prefix}{user}/{asset id}.{ext}`): a file is
   deleted when its last write and the time in its asset id are both older than
   ORPHAN_FILE_MIN_AGE and no `assets` row has that id with that key. Keys under these
   prefixes that do not have this shape are left alone and counted as `unknown`.
3. **Temporary objects** (`vendor-inputs/…`, `tmp/…`): deleted once their last write is
   older than their lifecycle rule's days (server/media/retention.py). On COS the bucket's
   lifecycle rules do the same; on the local backend this is what applies them.
4. **Partial writes.** A local write goes to a hidden temporary file that is then renamed
   into place; a crash in between leaves that file, which no listing shows. Those older
   than ORPHAN_FILE_MIN_AGE are deleted (`Storage.clear_partial_writes`; COS has none).
   One that cannot be (a PermissionError, say) is reported among the failed keys.

Deleting: candidates go to the backend `delete_batch` (≤ 1000 keys per call: one COS
multi-delete request); keys it reports as failed are retried up to DELETE_ATTEMPTS times
in all, then left for the next night. Before an asset file is deleted, its candidates are
read again with SELECT … FOR UPDATE in a transaction that lasts until the delete call has
returned: a writer holds its row's lock from before it writes the object until after
(server/media/assets.py), so an upload landing during the sweep is either seen here (the
sweep waits for the writer's commit) or written after the delete. A lock wait that times
out skips that batch. The job is idempotent: a run cut short is made good by the next.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from loguru import logger

from server.config import Settings
from server.db import Database, is_retryable
from server.media.retention import (
    OUTPUT,
    OUTPUT_PREFIX,
    TEMPORARY_PREFIXES,
    UPLOAD_PREFIX,
    class_of_key,
    lifecycle_rules,
)
from server.media.storage import Storage, StoredObject
from server.media.storage.base import DELETE_BATCH

ASSET_PREFIXES = (UPLOAD_PREFIX, OUTPUT_PREFIX)
DELETE_ATTEMPTS = 3
_ASSET_KEY = re.compile(r"[uo]/[0-9]+/([0-9a-f]{24})\.[a-z0-9]+")

# (class, objects, bytes) after each delete call
OnDelete = Callable[[str, int, int], None]


@dataclass
class OrphanReport:
    scanned: int = 0
    unknown: int = 0  # keys under u/ or o/ that are not an asset's; left alone
    expired: int = 0  # output rows past their retention (deleted unless dry run)
    orphans: dict[str, list[str]] = field(default_factory=dict)  # prefix → keys deleted, every prefix listed
    partial: list[str] = field(default_factory=list)  # what writes cut short left (paths), deleted
    failed: list[str] = field(default_factory=list)  # keys (and partial writes) left after every attempt
    skipped: int = 0  # candidates left because a writer held their row too long
    deleted: dict[str, list[int]] = field(default_factory=dict)  # class → [objects, bytes]

    @property
    def found(self) -> int:
        return sum(len(keys) for keys in self.orphans.values()) + len(self.partial)


def _id_time(asset_id: str) -> float:
    """Unix seconds from the first 12 hex digits of an asset id (assets.new_id)."""
    return int(asset_id[:12], 16) / 1000


async def expire_outputs(db: Database, settings: Settings, now: float, *, dry_run: bool) -> dict[str, str]:
    """Delete the rows of outputs past OUTPUT_RETENTION_DAYS that nobody kept; answers
    their storage keys (→ class), whose objects the orphan step then deletes."""
    cutoff = time.strftime(
        "%Y-%m-%d %H:%M:%S", time.gmtime(now - settings.storage.output_retention_days * 86_400)
    )
    expired: dict[str, str] = {}
    after = ""
    while True:
        rows = await db.fetchall(
            "SELECT id, storage_key FROM assets WHERE kind = 'output' AND kept_at IS NULL "
            "AND created_at < %s AND id > %s ORDER BY id LIMIT %s",
            cutoff,
            after,
            DELETE_BATCH,
        )
        if not rows:
            return expired
        ids = [str(r["id"]) for r in rows]
        after = ids[-1]
        if not dry_run:
            marks = ",".join(["%s"] * len(ids))
            # kept_at re-checked: a `keep` that committed meanwhile wins
            await db.execute(
                f"DELETE FROM assets WHERE id IN ({marks}) AND kind = 'output' AND kept_at IS NULL", *ids
            )
        expired.update({str(r["storage_key"]): OUTPUT for r in rows})


def _candidates(page: list[StoredObject], before: float) -> tuple[dict[str, StoredObject], int]:
    """Asset files of `page` old enough to go (by asset id → object), and how many keys
    were not an asset's."""
    found: dict[str, StoredObject] = {}
    unknown = 0
    for obj in page:
        match = _ASSET_KEY.fullmatch(obj.key)
        if match is None:
            unknown += 1
        elif obj.modified < before and _id_time(match[1]) < before:
            found[match[1]] = obj
    return found, unknown


async def _unreferenced(db: Database, candidates: dict[str, StoredObject]) -> dict[str, StoredObject]:
    """The candidates no row refers to (a plain read: the locked re-check comes later)."""
    if not candidates:
        return {}
    marks = ",".join(["%s"] * len(candidates))
    rows = await db.fetchall(f"SELECT id, storage_key FROM assets WHERE id IN ({marks})", *candidates)
    referenced = {(str(r["id"]), str(r["storage_key"])) for r in rows}
    return {i: o for i, o in candidates.items() if (i, o.key) not in referenced}


class Sweeper:
    """Deletes in batches, retries failed keys, counts what went per class."""

    def __init__(
        self, db: Database, storage: Storage, report: OrphanReport, classes: dict[str, str],
        on_delete: OnDelete | None, *, dry_run: bool,
    ) -> None:  # fmt: skip
        self.db, self.storage, self.report = db, storage, report
        self.classes = classes  # key → class, for keys whose class is not their prefix's
        self.on_delete = on_delete
        self.dry_run = dry_run

    async def delete(self, objects: Sequence[StoredObject]) -> list[StoredObject]:
        """Delete `objects` (≤ DELETE_BATCH); answers those that are gone."""
        if self.dry_run or not objects:
            return list(objects)
        pending = {o.key: o for o in objects}
        for attempt in range(DELETE_ATTEMPTS):
            failed = set(await self.storage.delete_batch(list(pending)))
            if failed and attempt + 1 < DELETE_ATTEMPTS:
                logger.warning("storage cleanup: {} key(s) not deleted; retrying", len(failed))
            pending = {k: o for k, o in pending.items() if k in failed}
            if not pending:
                break
        self.report.failed.extend(pending)
        gone = [o for o in objects if o.key not in pending]
        self.count(gone)
        return gone

    async def delete_assets(self, candidates: dict[str, StoredObject]) -> list[StoredObject]:
        """Delete asset files after re-reading their rows under lock (see the module doc)."""
        if self.dry_run or not candidates:
            return list(candidates.values())
        marks = ",".join(["%s"] * len(candidates))
        try:
            async with self.db.transaction("READ COMMITTED") as conn:
                rows = await conn.fetchall(
                    f"SELECT id, storage_key FROM assets WHERE id IN ({marks}) FOR UPDATE", *candidates
                )
                referenced = {(str(r["id"]), str(r["storage_key"])) for r in rows}
                go = [o for i, o in candidates.items() if (i, o.key) not in referenced]
                return await self.delete(go)
        except Exception as exc:
            if not is_retryable(exc):  # a lock wait timeout (or a deadlock): leave them to the next run
                raise
            logger.warning("storage cleanup: a writer held {} candidate row(s); next run", len(candidates))
            self.report.skipped += len(candidates)
            return []

    def count(self, gone: Sequence[StoredObject]) -> None:
        """Add objects deleted to the report and `on_delete`, per class."""
        per_class: dict[str, list[int]] = {}
        for obj in gone:
            tally = per_class.setdefault(self.classes.get(obj.key) or class_of_key(obj.key), [0, 0])
            tally[0] += 1
            tally[1] += obj.size
        for cls, (count, size) in per_class.items():
            total = self.report.deleted.setdefault(cls, [0, 0])
            total[0] += count
            total[1] += size
            if self.on_delete is not None:
                self.on_delete(cls, count, size)


async def clean_orphans(
    db: Database,
    storage: Storage,
    settings: Settings,
    *,
    now: float | None = None,
    dry_run: bool = False,
    on_delete: OnDelete | None = None,
) -> OrphanReport:
    """Expire outputs, then find (and unless `dry_run`, delete page by page) the orphans,
    the temporary objects past their days and what interrupted writes left."""
    now = time.time() if now is None else now
    report = OrphanReport()
    expired = await expire_outputs(db, settings, now, dry_run=dry_run)
    report.expired = len(expired)
    sweeper = Sweeper(db, storage, report, expired, on_delete, dry_run=dry_run)
    before = now - settings.storage.orphan_file_min_age
    for prefix in ASSET_PREFIXES:
        found = report.orphans[prefix] = []
        async for page in storage.objects(prefix):
            report.scanned += len(page)
            candidates, unknown = _candidates(page, before)
            report.unknown += unknown
            orphans = await _unreferenced(db, candidates)
            if dry_run:  # rows about to expire count as gone
                orphans.update({i: o for i, o in candidates.items() if o.key in expired})
            found.extend(o.key for o in await sweeper.delete_assets(orphans))
    days = {rule.prefix: rule.days for rule in lifecycle_rules(settings)}
    for prefix in TEMPORARY_PREFIXES:
        found = report.orphans[prefix] = []
        bar = now - days[prefix] * 86_400
        async for page in storage.objects(prefix):
            report.scanned += len(page)
            found.extend(o.key for o in await sweeper.delete([o for o in page if o.modified < bar]))
    partial, stuck = await storage.clear_partial_writes(before, dry_run=dry_run)
    report.partial = [o.key for o in partial]
    report.failed.extend(stuck)
    if not dry_run:
        sweeper.count(partial)
    return report


async def clean_orphan_files(
    db: Database, storage: Storage, settings: Settings, on_delete: OnDelete | None = None
) -> int:
    """The cron job: returns how many objects it deleted; `on_delete` counts them per class."""
    report = await clean_orphans(db, storage, settings, on_delete=on_delete)
    if report.unknown:
        logger.warning(
            "storage cleanup: {} key(s) under u/ or o/ are not asset files; left alone", report.unknown
        )
    if report.failed:
        logger.error(
            "storage cleanup: {} key(s) could not be deleted, e.g. {}", len(report.failed), report.failed[0]
        )
    logger.info(
        "storage cleanup: {} output(s) expired, scanned {} object(s), deleted {} and {} partial write(s)",
        report.expired,
        report.scanned,
        {prefix: len(keys) for prefix, keys in report.orphans.items()},
        len(report.partial),
    )
    return report.found
