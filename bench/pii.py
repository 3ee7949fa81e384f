"""Personal data: records sealed and opened per second with the local KMS (a fresh data
key per record, wrapped by the KEK: the envelope) against bare AES-256-GCM with one
fixed key on the same data, in the same run; then `rotate-keys`' rate (data keys
re-wrapped per second) on a table of --rows rows in a private MariaDB.

    .venv/bin/python bench/pii.py [--records 20000] [--rows 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from loguru import logger

from server.config import Settings
from server.db import Database
from server.distributors import Distributors
from server.embedded import EmbeddedMariaDB, ensure_database
from server.metrics import Metrics
from server.migrations import Migrator
from server.pii.envelope import aad, seal, unseal
from server.pii.identity import blind_index, make_id, mask_id, mask_name
from server.pii.kms import KeyRing, LocalKms

NAME = "张三丰"


async def envelope(kms: LocalKms, n: int, number: str) -> tuple[float, float]:
    values = {"real_name": NAME, "id_card": number}
    started = time.perf_counter()
    sealed = [await seal(kms, "distributors", i, values) for i in range(n)]
    sealing = n / (time.perf_counter() - started)
    started = time.perf_counter()
    for i, s in enumerate(sealed):
        cols: dict[str, bytes | None] = dict(s.columns)
        await unseal(kms, "distributors", i, cols, s.wrapped_key, s.kek_version)
    return sealing, n / (time.perf_counter() - started)


def bare(n: int, number: str) -> tuple[float, float]:
    """The same two columns under one fixed key: no data key, no wrap."""
    aes = AESGCM(AESGCM.generate_key(bit_length=256))
    started = time.perf_counter()
    sealed = []
    for i in range(n):
        row = []
        for column, value in (("real_name", NAME), ("id_card", number)):
            nonce = secrets.token_bytes(12)
            row.append((nonce, aes.encrypt(nonce, value.encode(), aad("distributors", column, i))))
        sealed.append(row)
    sealing = n / (time.perf_counter() - started)
    started = time.perf_counter()
    for i, row in enumerate(sealed):
        for (nonce, ct), column in zip(row, ("real_name", "id_card"), strict=True):
            aes.decrypt(nonce, ct, aad("distributors", column, i))
    return sealing, n / (time.perf_counter() - started)


async def rotation(ring: KeyRing, rows: int, tmp: Path) -> float:
    mariadb = EmbeddedMariaDB(tmp)
    mariadb.start()
    try:
        ensure_database(mariadb, "bench")
        settings = Settings(_env_file=None, database_url=mariadb.url("bench"), app_env="test")  # type: ignore[call-arg]
        db = await Database.connect(settings.database(), settings, Metrics())
        try:
            await Migrator(db).migrate()
            kms = LocalKms(ring)
            blind = kms.blind_index_key() or b""
            born = dt.date(1980, 1, 1)
            for start in range(0, rows, 1000):
                batch = []
                for user_id in range(start + 1, min(rows, start + 1000) + 1):
                    number = make_id(
                        born + dt.timedelta(days=user_id // 1000), serial=f"{user_id % 1000:03d}"
                    )
                    s = await seal(kms, "distributors", user_id, {"real_name": NAME, "id_card": number})
                    cols = s.columns
                    batch.append(
                        (user_id, cols["real_name"].hex(), cols["id_card"].hex(), s.wrapped_key.hex(),
                         s.kek_version, blind_index(blind, number).hex(), mask_name(NAME), mask_id(number))
                    )  # fmt: skip
                async with db.transaction() as tx:
                    await tx.executemany(
                        "INSERT INTO distributors (user_id, status, real_name_ct, id_card_ct, data_key, "
                        "kek_version, id_card_bidx, real_name_masked, id_card_masked) VALUES "
                        "(%s, 'pending', UNHEX(%s), UNHEX(%s), UNHEX(%s), %s, UNHEX(%s), %s, %s)",
                        batch,
                    )
            ring.add_version()
            kms.reload()
            distributors = Distributors(db, kms, blind, settings.distributors)
            started = time.perf_counter()
            report = await distributors.rotate(1000)
            elapsed = time.perf_counter() - started
            assert report.rewrapped == rows and report.failed == 0, report
            check = await distributors.check(200)
            assert not check["failures"], check["failures"][:3]
            return rows / elapsed
        finally:
            await db.close()
    finally:
        mariadb.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    number = make_id(dt.date(1990, 3, 7))
    with tempfile.TemporaryDirectory() as tmp:
        ring = KeyRing(Path(tmp) / "keyring.json")
        ring.create_if_missing()
        kms = LocalKms(ring)
        bare_seal, bare_open = bare(args.records, number)
        env_seal, env_open = await envelope(kms, args.records, number)
        print(f"records of 2 columns (real name, ID number), {args.records} each way")
        print(f"  bare AES-256-GCM, one key : seal {bare_seal:10,.0f}/s  open {bare_open:10,.0f}/s")
        print(f"  envelope, local KMS       : seal {env_seal:10,.0f}/s  open {env_open:10,.0f}/s")
        print(
            f"  envelope / bare           : seal {env_seal / bare_seal:.2f}x"
            f"  open {env_open / bare_open:.2f}x"
            f"  (overhead per record: seal {1e6 / env_seal - 1e6 / bare_seal:.1f} µs,"
            f" open {1e6 / env_open - 1e6 / bare_open:.1f} µs)"
        )
        rate = await rotation(ring, args.rows, Path(tmp) / "db")
        print(f"rotate-keys on {args.rows:,} rows: {rate:,.0f} data keys re-wrapped/s")


if __name__ == "__main__":
    asyncio.run(main())
