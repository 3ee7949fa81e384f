"""Files under `<VAR_DIR>/storage`, for development and single-machine deployments.

Layout: the object `a/b.png` is the file `<root>/a/b.png`; its content type, unless it
is the one the extension says (image/png here), is kept in `<root>/.types/a/b.png` (keys
never start a segment with `.`, so the two cannot clash).
Every write goes to a hidden temporary file in the target directory and is renamed
into place, so a reader sees the old object or the new one, never half of one.

URLs are `/files/<key>?exp=<unix seconds>&sig=<hex>` (prefixed with PUBLIC_BASE_URL
when set), where sig = HMAC-SHA256(secret, "<key>\\n<exp>"). The secret is
STORAGE_URL_SECRET, or, when that is empty, one derived from JWT_SECRET with HKDF so
development needs no configuration and the two secrets are never the same bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import mimetypes
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Final, TypeVar

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from server.config import Settings
from server.errors import AppError, ErrorCode, NotFound
from server.media.storage.base import LIST_PAGE, StoredObject, validate_key

TYPES_DIR: Final = ".types"
DEFAULT_CONTENT_TYPE: Final = "application/octet-stream"
_HKDF_INFO: Final = b"wardrobe-server storage url signing v1"
_T = TypeVar("_T")
_PARTIAL: Final = ".tmp-"  # a write in progress, or one a crash cut short
_EXP = re.compile(r"[0-9]{1,12}")
_SIG = re.compile(r"[0-9a-fA-F]{64}")


def derive_url_secret(jwt_secret: str) -> bytes:
    """A 32-byte URL-signing key derived from JWT_SECRET (HKDF-SHA256, fixed info)."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO)
    return hkdf.derive(jwt_secret.encode())


def url_secret(settings: Settings) -> bytes:
    configured = settings.storage.url_secret.get_secret_value() if settings.storage.url_secret else ""
    if configured:
        return configured.encode()
    return derive_url_secret(settings.auth.jwt_secret.get_secret_value())


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_PARTIAL}{uuid.uuid4().hex}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


class LocalStorage:
    """The `Storage` protocol on the local filesystem; file I/O runs in worker threads."""

    name = "local"

    def __init__(
        self, root: Path, secret: bytes, *, base_url: str = "", route_prefix: str = "/files/"
    ) -> None:
        if not secret:
            raise ValueError("LocalStorage needs a non-empty URL-signing secret")
        self.root = root.resolve()
        self._secret = secret
        self._prefix = base_url.rstrip("/") + route_prefix

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalStorage:
        return cls(
            settings.var_dir / "storage",
            url_secret(settings),
            base_url=settings.public_base_url or "",
        )

    # --- paths -------------------------------------------------------------------------

    def path_for(self, key: str) -> Path:
        """The file that holds `key` (InvalidKey for keys that could escape the root)."""
        return self.root / validate_key(key)

    def _key_of(self, path: str) -> str:
        """The `/`-separated path of a file under the root, relative to it (its key)."""
        return path[len(str(self.root)) + 1 :].replace(os.sep, "/")

    def _type_path(self, key: str) -> Path:
        return self.root / TYPES_DIR / validate_key(key)

    # --- Storage -------------------------------------------------------------------------

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        path, type_path = self.path_for(key), self._type_path(key)

        def write() -> None:
            if content_type == mimetypes.guess_type(key)[0]:
                type_path.unlink(missing_ok=True)  # the extension says it (see content_type)
            else:
                _write_atomically(type_path, content_type.encode())
            _write_atomically(path, data)

        await self._io(write)

    async def get(self, key: str) -> bytes:
        path = self.path_for(key)
        try:
            return await self._io(path.read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"No stored object {key!r}") from None

    async def exists(self, key: str) -> bool:
        return await self._io(self.path_for(key).is_file)

    async def delete(self, keys: Iterable[str]) -> None:
        paths = [(self.path_for(k), self._type_path(k)) for k in keys]

        def remove() -> None:
            for path, type_path in paths:
                path.unlink(missing_ok=True)
                type_path.unlink(missing_ok=True)

        await self._io(remove)

    async def delete_batch(self, keys: Sequence[str]) -> list[str]:
        """Unlink the files in one worker-thread call; answers the keys whose unlink failed."""
        paths = [(k, self.path_for(k), self._type_path(k)) for k in keys]

        def remove() -> list[str]:
            failed = []
            for key, path, type_path in paths:
                try:
                    path.unlink(missing_ok=True)
                    type_path.unlink(missing_ok=True)
                except OSError:
                    failed.append(key)
            return failed

        return await self._io(remove)

    def url(self, key: str, expires_in: int) -> str:
        if expires_in <= 0:
            raise ValueError("expires_in must be positive")
        exp = int(time.time()) + int(expires_in)
        return f"{self._prefix}{validate_key(key)}?exp={exp}&sig={self.sign(key, exp)}"

    async def objects(self, prefix: str, page_size: int = LIST_PAGE) -> AsyncIterator[list[StoredObject]]:
        pages = self._walk(prefix, page_size)
        while (page := await self._io(lambda: next(pages, None))) is not None:
            yield page

    def _walk(self, prefix: str, page_size: int) -> Iterator[list[StoredObject]]:
        """Pages of the objects under `prefix`, walking only the directories it can match;
        hidden entries (`.types`, temporary files of writes in progress) are not objects."""
        head = prefix.rpartition("/")[0]
        root = str(self.root)
        stack = [str(self.root / validate_key(head)) if head else root]
        page: list[StoredObject] = []
        while stack:
            try:
                with os.scandir(stack.pop()) as it:
                    entries = list(it)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                key = self._key_of(entry.path)
                if entry.is_dir(follow_symlinks=False):
                    if (key + "/").startswith(prefix) or prefix.startswith(key + "/"):
                        stack.append(entry.path)
                    continue
                if not key.startswith(prefix) or not entry.is_file(follow_symlinks=False):
                    continue
                try:
                    stat = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted while we walked
                page.append(StoredObject(key, stat.st_size, stat.st_mtime))
                if len(page) >= page_size:
                    yield page
                    page = []
        if page:
            yield page

    async def clear_partial_writes(
        self, before: float, *, dry_run: bool = False
    ) -> tuple[list[StoredObject], list[str]]:
        """The temporary files of writes that never reached their rename (the process died
        in between), under the root and `.types`, last written before `before`. One that
        cannot be removed (say, its directory is read-only) is answered among the failed,
        and the sweep goes on."""

        def sweep() -> tuple[list[StoredObject], list[str]]:
            found, failed = [], []
            for directory, _, names in os.walk(self.root):
                for name in names:
                    if not name.startswith(_PARTIAL):
                        continue
                    path = os.path.join(directory, name)
                    try:
                        stat = os.stat(path, follow_symlinks=False)
                        if stat.st_mtime >= before:
                            continue
                        if not dry_run:
                            os.unlink(path)
                    except FileNotFoundError:
                        continue  # renamed into place or removed meanwhile
                    except OSError:
                        failed.append(self._key_of(path))
                        continue
                    found.append(StoredObject(self._key_of(path), stat.st_size, stat.st_mtime))
            return found, failed

        return await self._io(sweep)

    async def close(self) -> None:
        return None

    # --- serving (handlers/files.py) ----------------------------------------------------

    def sign(self, key: str, exp: int) -> str:
        return hmac.new(self._secret, f"{key}\n{exp}".encode(), hashlib.sha256).hexdigest()

    def check_signature(self, key: str, exp: str, sig: str, now: float | None = None) -> int:
        """Seconds the link has left, or AppError(FORBIDDEN) for a bad or expired link.

        The signature is checked before the expiry (constant-time), so nothing about a
        key is revealed to someone who cannot sign for it.
        """
        if not (_EXP.fullmatch(exp) and _SIG.fullmatch(sig)):
            raise AppError(ErrorCode.FORBIDDEN, "This file link is invalid")
        if not hmac.compare_digest(self.sign(key, int(exp)), sig.lower()):
            raise AppError(ErrorCode.FORBIDDEN, "This file link is invalid")
        remaining = int(exp) - int(time.time() if now is None else now)
        if remaining <= 0:
            raise AppError(ErrorCode.FORBIDDEN, "This file link has expired; ask for a new one")
        return remaining

    async def content_type(self, key: str) -> str:
        """The type given to `put`, else a guess from the extension."""
        try:
            stored = await self._io(self._type_path(key).read_text)
        except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
            stored = ""
        return stored.strip() or mimetypes.guess_type(key)[0] or DEFAULT_CONTENT_TYPE

    @staticmethod
    async def _io(fn: Callable[[], _T]) -> _T:
        return await asyncio.to_thread(fn)
