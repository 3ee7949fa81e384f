"""Objects deleted per second by the nightly cleanup against the fake COS with 20 ms per
request: batched (one multi-delete of up to 1000 keys, as the job does) versus one
request per object (sequential, and COS_THREADS requests in parallel), in the same run.

    .venv/bin/python bench/storage.py [--batched 5000] [--single 300] [--latency 0.02]

The job is the real one (server/media/orphans.clean_orphans on a private MariaDB); the
objects are expired temporary objects (`vendor-inputs/…`) planted in the fake bucket.
Only how `delete_batch` reaches COS differs between the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import web
from loguru import logger

from bench._support import free_port
from server.config import Settings
from server.db import Database
from server.embedded import EmbeddedMariaDB, ensure_database
from server.media.orphans import clean_orphans
from server.media.storage import create_storage
from server.media.storage.cos import CosStorage
from server.metrics import Metrics
from server.migrations import Migrator
from tests.fakes.cos import FakeCos

SECRET_ID, SECRET_KEY = "AKIDbenchStorage0001", "bench-secret-key"


class OneByOne(CosStorage):
    """The baseline: `delete_batch` as one COS request per object, `parallel` at a time."""

    parallel = 1

    async def delete_batch(self, keys: Sequence[str]) -> list[str]:
        gate = asyncio.Semaphore(self.parallel)
        failed: list[str] = []

        async def one(key: str) -> None:
            async with gate:
                failed.extend(await super(OneByOne, self).delete_batch([key]))

        await asyncio.gather(*(one(k) for k in keys))
        return failed


def plant(fake: FakeCos, count: int) -> None:
    old = time.time() - 3 * 86_400
    for n in range(count):
        key = f"vendor-inputs/20261101/{n:06d}.png"
        fake.objects[key] = (b"x" * 64, "image/png")
        fake.modified[key] = old


async def run(db: Database, settings: Settings, fake: FakeCos, storage: CosStorage, count: int) -> float:
    """Objects per second the cleanup deletes, `count` of them."""
    fake.objects.clear()
    fake.modified.clear()
    plant(fake, count)
    started = time.perf_counter()
    report = await clean_orphans(db, storage, settings)
    elapsed = time.perf_counter() - started
    assert report.found == count and not fake.objects, (report.found, len(fake.objects))
    return count / elapsed


async def main(batched: int, single: int, latency: float) -> None:
    logger.remove()
    fake = FakeCos(SECRET_ID, SECRET_KEY, latency=latency)
    port = free_port()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    with tempfile.TemporaryDirectory() as tmp:
        mariadb = EmbeddedMariaDB(Path(tmp))
        mariadb.start()
        try:
            ensure_database(mariadb, "bench")
            settings = Settings(  # type: ignore[call-arg]
                _env_file=None,
                database_url=mariadb.url("bench"),
                storage_backend="cos",
                cos_bucket="wardrobe-1250000000",
                cos_region="ap-guangzhou",
                cos_domain=f"127.0.0.1:{port}",
                cos_scheme="http",
                cos_secret_id=SECRET_ID,
                cos_secret_key=SECRET_KEY,
                cos_retries=0,
            )
            db = await Database.connect(settings.database(), settings, Metrics())
            await Migrator(db).migrate()
            storage = create_storage(settings)
            assert isinstance(storage, CosStorage)
            base = OneByOne.from_settings(settings)
            try:
                fast = await run(db, settings, fake, storage, batched)
                base.parallel = 1
                slow = await run(db, settings, fake, base, single)
                base.parallel = settings.storage.cos_threads
                wide = await run(db, settings, fake, base, single * settings.storage.cos_threads)
            finally:
                await storage.close()
                await base.close()
                await db.close()
        finally:
            mariadb.stop()
    await runner.cleanup()
    print(f"fake COS latency {latency * 1000:.0f} ms per request")
    print(f"batched (multi-delete, <= 1000 keys)      {fast:10,.0f} objects/s  ({batched} objects)")
    print(f"one request per object, sequential        {slow:10,.0f} objects/s  ({single} objects)  "
          f"batched is {fast / slow:,.0f}x")  # fmt: skip
    print(f"one request per object, {settings.storage.cos_threads} in parallel     {wide:10,.0f} objects/s  "
          f"({single * settings.storage.cos_threads} objects)  batched is {fast / wide:,.1f}x")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batched", type=int, default=5000)
    parser.add_argument("--single", type=int, default=300)
    parser.add_argument("--latency", type=float, default=0.02)
    args = parser.parse_args()
    asyncio.run(main(args.batched, args.single, args.latency))
