"""Assets: uploaded photos and task outputs, bytes in storage, metadata in MySQL.

The writers' lock (docs/storage.md "Cleanup and writers"): every write of an asset's
bytes happens while its row is locked by the writer's open transaction: `store` inserts
the row, writes the object and only then commits; `keep` locks the row (FOR UPDATE),
writes the copy, points the row at it and commits. The nightly sweep re-reads its
candidates with SELECT … FOR UPDATE right before deleting them, so it either waits for
the writer and then sees the row, or it ran before the write began.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from server.db import Conn, Database, Row
from server.errors import AppError, ErrorCode, NotFound
from server.media.images import ValidatedImage, validate_image_async
from server.media.retention import UPLOAD_PREFIX, prefix_for
from server.media.storage import Storage

_EXT = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}


def new_id() -> str:
    """24 hex characters: the time in ms, then 48 random bits; sorts by creation."""
    return f"{int(time.time() * 1000):012x}{os.urandom(6).hex()}"


@dataclass(frozen=True, slots=True)
class Asset:
    id: str
    user_id: int
    kind: str
    storage_key: str
    content_type: str
    width: int
    height: int
    bytes: int

    @classmethod
    def of(cls, row: Row) -> Asset:
        return cls(
            id=str(row["id"]),
            user_id=int(row["user_id"]),
            kind=str(row["kind"]),
            storage_key=str(row["storage_key"]),
            content_type=str(row["content_type"]),
            width=int(row["width"]),
            height=int(row["height"]),
            bytes=int(row["bytes"]),
        )

    def public(self, storage: Storage, url_ttl: int) -> dict[str, Any]:
        """The API's view; its URL lives `url_ttl` seconds (STORAGE_URL_TTL)."""
        return {
            "id": self.id,
            "url": storage.url(self.storage_key, url_ttl),
            "content_type": self.content_type,
            "width": self.width,
            "height": self.height,
            "bytes": self.bytes,
        }


async def store(
    db: Conn | Database,
    storage: Storage,
    user_id: int,
    image: ValidatedImage,
    *,
    kind: str,
    task_id: str | None = None,
) -> Asset:
    """Insert the row and write the bytes in one transaction (a Database opens one, a Conn
    is the caller's): the object is written while the uncommitted row holds its lock, so
    the nightly sweep cannot delete it (see the module doc). A failed write rolls the row
    back; a crash after the write leaves an orphan file, which the sweep removes later."""
    asset_id = new_id()
    key = f"{prefix_for(kind)}{user_id}/{asset_id}.{_EXT.get(image.content_type, 'bin')}"
    asset = Asset(asset_id, user_id, kind, key, image.content_type, image.width, image.height, image.bytes)
    if isinstance(db, Database):
        async with db.transaction() as conn:
            await _insert_and_write(conn, storage, asset, image.data, task_id)
    else:
        await _insert_and_write(db, storage, asset, image.data, task_id)
    return asset


async def _insert_and_write(conn: Conn, storage: Storage, a: Asset, data: bytes, task_id: str | None) -> None:
    await conn.execute(
        "INSERT INTO assets (id, user_id, kind, task_id, storage_key, content_type, width, height, bytes) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        a.id,
        a.user_id,
        a.kind,
        task_id,
        a.storage_key,
        a.content_type,
        a.width,
        a.height,
        a.bytes,
    )
    await storage.put(a.storage_key, data, a.content_type)


async def upload(
    db: Database, storage: Storage, executor: Executor | None, user_id: int, data: bytes
) -> Asset:
    image = await validate_image_async(data, executor)
    return await store(db, storage, user_id, image, kind="upload")


async def owned(db: Database, user_id: int, asset_ids: list[str]) -> dict[str, Asset]:
    """The caller's assets among `asset_ids` (others' and unknown ids are simply absent)."""
    if not asset_ids:
        return {}
    marks = ",".join(["%s"] * len(asset_ids))
    rows = await db.fetchall(
        f"SELECT id, user_id, kind, storage_key, content_type, width, height, bytes FROM assets "
        f"WHERE user_id = %s AND id IN ({marks})",
        user_id,
        *asset_ids,
    )
    return {str(r["id"]): Asset.of(r) for r in rows}


_COLUMNS = "id, user_id, kind, storage_key, content_type, width, height, bytes, kept_at"


async def keep(db: Database, storage: Storage, user_id: int, asset_id: str) -> Asset:
    """Save one of the caller's outputs from expiry: its bytes are copied to `u/…` (outside
    the outputs' lifecycle rule) and the row points there with `kept_at` set; the old
    object is left to the nightly sweep. Uploads and kept outputs are answered unchanged."""
    async with db.transaction() as conn:
        row = await conn.fetchone(
            f"SELECT {_COLUMNS} FROM assets WHERE id = %s AND user_id = %s FOR UPDATE", asset_id, user_id
        )
        if row is None:
            raise NotFound(f"No asset {asset_id}")
        asset = Asset.of(row)
        if asset.kind != "output" or row["kept_at"] is not None:
            return asset
        new_key = f"{UPLOAD_PREFIX}{user_id}/{asset.id}.{asset.storage_key.rpartition('.')[2]}"
        if new_key != asset.storage_key:
            await storage.put(new_key, await storage.get(asset.storage_key), asset.content_type)
        await conn.execute(
            "UPDATE assets SET storage_key = %s, kept_at = UTC_TIMESTAMP(6) WHERE id = %s", new_key, asset.id
        )
        return Asset(asset.id, user_id, asset.kind, new_key, asset.content_type, asset.width, asset.height,
                     asset.bytes)  # fmt: skip


async def delete(db: Database, user_id: int, asset_id: str) -> None:
    """Delete one of the caller's assets: the row at once, the object with the nightly
    sweep. CONFLICT while a queued or running task of the caller uses it as an input."""
    async with db.transaction() as conn:
        row = await conn.fetchone(
            "SELECT id FROM assets WHERE id = %s AND user_id = %s FOR UPDATE", asset_id, user_id
        )
        if row is None:
            raise NotFound(f"No asset {asset_id}")
        busy = await conn.fetchval(
            "SELECT id FROM tasks WHERE user_id = %s AND status IN ('queued', 'running') "
            "AND inputs LIKE %s LIMIT 1",
            user_id,
            f'%"{asset_id}"%',
        )
        if busy is not None:
            raise AppError(
                ErrorCode.CONFLICT,
                f"Asset {asset_id} is an input of task {busy}, which has not finished; "
                "cancel the task or wait for it",
                details={"task_id": str(busy)},
            )
        await conn.execute("DELETE FROM assets WHERE id = %s", asset_id)
