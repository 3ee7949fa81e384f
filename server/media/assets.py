"""Assets: uploaded photos and task outputs, bytes in storage, metadata in MySQL."""

from __future__ import annotations

import os
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from server.db import Conn, Database, Row
from server.media.images import ValidatedImage, validate_image_async
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
    conn: Conn | Database,
    storage: Storage,
    user_id: int,
    image: ValidatedImage,
    *,
    kind: str,
    task_id: str | None = None,
) -> Asset:
    """Write the bytes first, then the row: a crash in between leaves an orphan file
    (removed by the nightly cleanup), never a row without its bytes."""
    asset_id = new_id()
    key = f"u/{user_id}/{asset_id}.{_EXT.get(image.content_type, 'bin')}"
    await storage.put(key, image.data, image.content_type)
    await conn.execute(
        "INSERT INTO assets (id, user_id, kind, task_id, storage_key, content_type, width, height, bytes) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        asset_id,
        user_id,
        kind,
        task_id,
        key,
        image.content_type,
        image.width,
        image.height,
        image.bytes,
    )
    return Asset(asset_id, user_id, kind, key, image.content_type, image.width, image.height, image.bytes)


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
