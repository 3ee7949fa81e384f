"""The KMS interface and its `local` provider (a versioned key ring file).

A KMS holds key-encryption keys (KEKs) that never leave it: it makes a fresh data key
(the plaintext for our use, the wrapped form to store), unwraps a stored one, re-wraps
one under its newest KEK version, and encrypts / decrypts small secrets (`kms:` values).
A KEK version is a string such as "local:2" stored beside every wrapped data key.

The local key ring is a JSON file: every KEK version (256 random bits), whether it is
retired, and the blind index key. In dev and test it is created on first start under
VAR_DIR, atomically (written to a temporary file, then hard-linked to its name, which
fails when another process got there first: both then use the one that won). In prod it
must exist with mode 0600. A process that meets a version it does not know re-reads the
file (another process added it), so reads keep working while keys rotate.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import json
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE = 12
KEY_BYTES = 32
_WRAP_AAD = b"wardrobe/data-key"
_SECRET_AAD = b"wardrobe/secret"


class KmsError(RuntimeError):
    """The KMS cannot do what was asked (unknown or retired version, bad ciphertext, down)."""


@dataclass(frozen=True, slots=True)
class DataKey:
    plaintext: bytes  # 32 bytes, kept only in memory while one record is sealed or opened
    wrapped: bytes  # what is stored
    version: str  # the KEK version that wrapped it


class Kms(Protocol):
    name: str

    async def current_version(self) -> str: ...

    async def generate_data_key(self) -> DataKey: ...

    async def unwrap(self, wrapped: bytes, version: str) -> bytes: ...

    async def rewrap(self, wrapped: bytes, version: str) -> tuple[bytes, str]:
        """The data key wrapped under the newest KEK version (unchanged when already)."""
        ...

    async def encrypt_secret(self, plaintext: str) -> str: ...

    async def decrypt_secret(self, ciphertext: str) -> str: ...

    async def retired_versions(self) -> set[str]: ...

    def blind_index_key(self) -> bytes | None:
        """The provider's own blind index key (the local ring keeps one), else None."""
        ...

    async def close(self) -> None: ...


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def new_ring() -> dict[str, Any]:
    return {
        "format": 1,
        "versions": [{"version": 1, "key": _b64(secrets.token_bytes(KEY_BYTES)), "created_at": _now()}],
        "blind_index_key": _b64(secrets.token_bytes(KEY_BYTES)),
    }


class KeyRing:
    """The key ring file: read, created once, changed under a lock by atomic replacement."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def exists(self) -> bool:
        return self.path.exists()

    def check_mode(self) -> None:
        mode = stat.S_IMODE(self.path.stat().st_mode)
        if mode & 0o077:
            raise KmsError(f"the key ring {self.path} must have mode 0600 (it has {mode:04o})")

    def create_if_missing(self) -> bool:
        """Make a new ring unless one exists; True if this call made it. Two processes
        racing both end with the same file: link() does not replace an existing name."""
        if self.path.exists():
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(new_ring(), f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def read(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.path.read_text())
        except FileNotFoundError:
            raise KmsError(f"the key ring {self.path} does not exist") from None
        except ValueError:
            raise KmsError(f"the key ring {self.path} is not valid JSON") from None
        if data.get("format") != 1 or not data.get("versions"):
            raise KmsError(f"the key ring {self.path} is not a key ring of format 1")
        return data

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self.path.with_name(self.path.name + ".lock")
        with open(lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _write(self, data: dict[str, Any]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def add_version(self) -> int:
        """A new newest KEK version; the number."""
        with self._locked():
            data = self.read()
            number = max(int(v["version"]) for v in data["versions"]) + 1
            data["versions"].append(
                {"version": number, "key": _b64(secrets.token_bytes(KEY_BYTES)), "created_at": _now()}
            )
            self._write(data)
            return number

    def retire(self, number: int) -> None:
        """Mark a version retired: it unwraps nothing more (its key is deleted from the file)."""
        with self._locked():
            data = self.read()
            newest = max(int(v["version"]) for v in data["versions"])
            if number == newest:
                raise KmsError(f"version {number} is the newest: add a version and rotate first")
            for v in data["versions"]:
                if int(v["version"]) == number:
                    v["retired_at"] = v.get("retired_at") or _now()
                    v.pop("key", None)
                    break
            else:
                raise KmsError(f"the key ring has no version {number}")
            self._write(data)


class LocalKms:
    """KEKs from the key ring file; AES-256-GCM wraps each data key."""

    name = "local"

    def __init__(self, ring: KeyRing) -> None:
        self.ring = ring
        self._keys: dict[str, AESGCM] = {}
        self._retired: set[str] = set()
        self._newest = ""
        self._blind: bytes | None = None
        self.reload()

    def reload(self) -> None:
        data = self.ring.read()
        keys, retired = {}, set()
        for v in data["versions"]:
            name = f"local:{int(v['version'])}"
            if v.get("retired_at") or not v.get("key"):
                retired.add(name)
            else:
                keys[name] = AESGCM(_unb64(v["key"]))
        if not keys:
            raise KmsError(f"the key ring {self.ring.path} has no usable version")
        self._keys, self._retired = keys, retired
        self._newest = max(keys, key=lambda n: int(n.split(":")[1]))
        self._blind = _unb64(data["blind_index_key"]) if data.get("blind_index_key") else None

    def _kek(self, version: str) -> AESGCM:
        kek = self._keys.get(version)
        if kek is None:
            self.reload()  # another process may have added it
            kek = self._keys.get(version)
        if kek is None:
            state = "retired" if version in self._retired else "unknown"
            raise KmsError(f"KEK version {version!r} is {state}")
        return kek

    async def current_version(self) -> str:
        return self._newest

    def newest_sync(self) -> str:
        return self._newest

    def _wrap(self, key: bytes, version: str, aad: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE)
        return nonce + self._kek(version).encrypt(nonce, key, aad)

    def _unwrap(self, wrapped: bytes, version: str, aad: bytes) -> bytes:
        kek = self._kek(version)
        try:
            return kek.decrypt(wrapped[:NONCE], wrapped[NONCE:], aad)
        except InvalidTag:
            raise KmsError(f"a data key does not unwrap under KEK version {version!r}") from None

    async def generate_data_key(self) -> DataKey:
        key = AESGCM.generate_key(bit_length=256)
        version = self._newest
        return DataKey(key, self._wrap(key, version, _WRAP_AAD), version)

    async def unwrap(self, wrapped: bytes, version: str) -> bytes:
        return self._unwrap(wrapped, version, _WRAP_AAD)

    async def rewrap(self, wrapped: bytes, version: str) -> tuple[bytes, str]:
        if version == self._newest:
            return wrapped, version
        key = self._unwrap(wrapped, version, _WRAP_AAD)
        return self._wrap(key, self._newest, _WRAP_AAD), self._newest

    async def encrypt_secret(self, plaintext: str) -> str:
        version = self._newest
        return f"{version}:{_b64(self._wrap(plaintext.encode(), version, _SECRET_AAD))}"

    async def decrypt_secret(self, ciphertext: str) -> str:
        provider, _, rest = ciphertext.partition(":")
        number, _, blob = rest.partition(":")
        if provider != "local" or not number.isdigit() or not blob:
            raise KmsError("a kms: value of the local KMS looks like kms:local:<version>:<base64>")
        try:
            raw = _unb64(blob)
        except ValueError:
            raise KmsError("the kms: value is not valid base64") from None
        return self._unwrap(raw, f"local:{number}", _SECRET_AAD).decode()

    async def retired_versions(self) -> set[str]:
        self.reload()
        return set(self._retired)

    def blind_index_key(self) -> bytes | None:
        return self._blind

    async def close(self) -> None:
        return None
