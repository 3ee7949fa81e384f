"""Object storage for uploads and task outputs: one protocol, two backends.

- `LocalStorage` (server/storage/local.py): files under `<VAR_DIR>/storage`, served by
  `GET /files/{key}` (handlers/files.py) through HMAC-signed, expiring URLs.
- `CosStorage` (server/storage/cos.py): Tencent Cloud COS through cos-python-sdk-v5,
  whose blocking calls run in a bounded thread pool owned by the storage object.

`STORAGE_BACKEND` picks one; `open_storage` (entered by the app's cleanup_ctx) creates it and closes it.
Keys are relative paths chosen by the server, e.g. `u/42/<asset id>.png`; both
backends accept only keys that `validate_key` accepts.

Errors: a missing object is NotFound (404); a backend that fails or is too slow is
AppError(UPSTREAM_FAILED) (502); a full COS queue is Busy (503).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from loguru import logger

from server.config import ConfigError, Settings
from server.media.storage.base import (
    LIST_PAGE,
    MAX_KEY_LENGTH,
    InvalidKey,
    Storage,
    StoredObject,
    validate_key,
)

__all__ = [
    "LIST_PAGE",
    "MAX_KEY_LENGTH",
    "InvalidKey",
    "Storage",
    "StoredObject",
    "create_storage",
    "open_storage",
    "validate_key",
]


def create_storage(settings: Settings) -> Storage:
    """The backend STORAGE_BACKEND names, or ConfigError saying which setting is missing."""
    if settings.storage.backend == "local":
        from server.media.storage.local import LocalStorage

        return LocalStorage.from_settings(settings)
    if settings.storage.backend == "cos":
        from server.media.storage.cos import CosStorage

        return CosStorage.from_settings(settings)
    raise ConfigError(f"STORAGE_BACKEND must be local or cos, got {settings.storage.backend!r}")


@contextlib.asynccontextmanager
async def open_storage(settings: Settings) -> AsyncIterator[Storage]:
    """The backend STORAGE_BACKEND names, closed (thread pool included) on exit."""
    storage = create_storage(settings)
    logger.info("storage backend: {}", storage.name)
    try:
        yield storage
    finally:
        await storage.close()
