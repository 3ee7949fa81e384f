"""The storage protocol both backends implement, and the key rules they share."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

MAX_KEY_LENGTH: Final = 512
LIST_PAGE: Final = 1000  # objects per page of `objects()` (COS's maximum per listing request)
DELETE_BATCH: Final = 1000  # keys per `delete_batch` call (COS's limit per multi-delete request)
# Segments start with a letter, digit or underscore, so no `.`/`..`, no hidden files,
# no empty segments and no leading `/`; only URL-safe characters, so keys need no quoting.
_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(?:/[A-Za-z0-9_][A-Za-z0-9._-]*)*")


class InvalidKey(ValueError):
    """A storage key the backends refuse (a programming error, not a client error)."""


def validate_key(key: str) -> str:
    """`key` unchanged, or InvalidKey: relative, `/`-separated, [A-Za-z0-9._-], ≤ 512 chars."""
    if not isinstance(key, str) or not key:
        raise InvalidKey("a storage key must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKey(f"storage key longer than {MAX_KEY_LENGTH} characters")
    if not _KEY.fullmatch(key):
        raise InvalidKey(
            f"invalid storage key {key!r}: use relative /-separated segments of [A-Za-z0-9._-] "
            "that do not start with '.'"
        )
    return key


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str
    size: int
    modified: float  # unix seconds of the last write


@runtime_checkable
class Storage(Protocol):
    """Where bytes live. Every method may raise NotFound, AppError(UPSTREAM_FAILED) or Busy."""

    name: str

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store `data` under `key`, replacing any previous object (atomically)."""
        ...

    async def get(self, key: str) -> bytes:
        """The object's bytes; NotFound if there is none."""
        ...

    async def exists(self, key: str) -> bool: ...

    async def delete(self, keys: Iterable[str]) -> None:
        """Remove the objects; keys that do not exist are ignored."""
        ...

    async def delete_batch(self, keys: Sequence[str]) -> list[str]:
        """Remove up to DELETE_BATCH objects in one call (COS: one multi-delete request);
        answers the keys that could not be deleted (missing keys count as deleted).
        A failure of the whole call raises, as every other method does."""
        ...

    def url(self, key: str, expires_in: int) -> str:
        """A signed URL that lets anyone GET the object for `expires_in` seconds (no I/O)."""
        ...

    def objects(self, prefix: str, page_size: int = LIST_PAGE) -> AsyncIterator[list[StoredObject]]:
        """Every object whose key starts with `prefix`, in pages of at most `page_size`.

        Each object comes once; the order is the backend's. Objects written or deleted
        during the walk may or may not be seen."""
        ...

    async def clear_partial_writes(
        self, before: float, *, dry_run: bool = False
    ) -> tuple[list[StoredObject], list[str]]:
        """Remove what writes cut short (a crash mid-write) left behind, last written before
        `before` (unix seconds); with `dry_run`, only find it. Answers (those removed, or
        found on a dry run; those that could not be removed), keyed by their path under
        the root (not valid keys: they are no object's)."""
        ...

    async def close(self) -> None: ...
