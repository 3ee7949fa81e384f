"""Media: the one entry point to assets (uploads and task outputs) and their files.

`upload`, `keep` and `delete` (the caller's assets, answered in their API shape with a
signed URL), `local_file` (what `GET /files/{key}` serves with the local backend) and
`lifecycle_check` (the ops dashboard). The parts behind it: assets.py (rows and the
writers' lock), images.py (validation), retention.py (prefixes and lifecycle rules),
storage/ (the backends). server/app.py builds it from plain dependencies.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.config import Settings
from server.db import Database
from server.errors import NotFound
from server.media import assets, retention
from server.media.images import MAX_BYTES
from server.media.storage import InvalidKey, Storage
from server.media.storage.local import LocalStorage

# MAX_BYTES, the largest image an upload may be, is part of the contract (413 beyond it).
__all__ = ["MAX_BYTES", "LocalFile", "Media"]


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A stored object the local backend serves: where it is, its type, and how many
    seconds its signed link has left."""

    path: Path
    content_type: str
    remaining: int


class Media:
    def __init__(
        self, db: Database, storage: Storage, settings: Settings, executor: Executor | None = None
    ) -> None:
        self._db = db
        self._storage = storage
        self._url_ttl = settings.storage.url_ttl
        self._settings = settings
        self._executor = executor  # where images are validated (None: the loop's default)

    def _public(self, asset: assets.Asset) -> dict[str, Any]:
        return asset.public(self._storage, self._url_ttl)

    async def upload(self, user_id: int, data: bytes) -> dict[str, Any]:
        """Validate the image (type from its bytes, EXIF orientation applied, metadata
        removed) and store it as one of the caller's uploads."""
        return self._public(await assets.upload(self._db, self._storage, self._executor, user_id, data))

    async def keep(self, user_id: int, asset_id: str) -> dict[str, Any]:
        """Save one of the caller's outputs from expiry; NotFound for someone else's."""
        return self._public(await assets.keep(self._db, self._storage, user_id, asset_id))

    async def delete(self, user_id: int, asset_id: str) -> None:
        """The row at once, the bytes with the nightly sweep; CONFLICT while an unfinished
        task of the caller uses it."""
        await assets.delete(self._db, user_id, asset_id)

    async def local_file(self, key: str, exp: str, sig: str) -> LocalFile:
        """The file behind a signed link of the local backend. NotFound with another
        backend (its URLs point elsewhere), FORBIDDEN for a bad or expired link whether
        or not the object exists, NotFound for a valid link to an object that is gone."""
        storage = self._storage
        if not isinstance(storage, LocalStorage):
            raise NotFound("Files are served by the object storage, not by this server")
        remaining = storage.check_signature(key, exp, sig)
        try:
            path = storage.path_for(key)
        except InvalidKey:
            raise NotFound("No such file") from None
        if not await asyncio.to_thread(path.is_file):
            raise NotFound("No such file")
        return LocalFile(path, await storage.content_type(key), remaining)

    async def lifecycle_check(self) -> list[str] | None:
        """The bucket's lifecycle rules against ours ([] when they match), or None for a
        backend with no bucket rules (local: the nightly job applies them)."""
        return await retention.lifecycle_check(self._storage, self._settings)
