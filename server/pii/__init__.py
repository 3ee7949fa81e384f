"""Personal data (issue 13; docs/pii.md): the KMS, envelope encryption, the blind index,
masked forms and `kms:` secrets.

`open_kms(settings)` opens the configured KMS (creating the local key ring in dev and
test, refusing a missing or loose one in prod); `resolve_secrets` decrypts every secret
setting given as `kms:<ciphertext>`; `blind_key` is the blind index key.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from loguru import logger

from server.config import ConfigError, Settings, kms_secrets
from server.pii.kms import KeyRing, Kms, KmsError, LocalKms

MIN_BLIND_KEY = 32


def keyring_path(settings: Settings) -> Path:
    return settings.pii.local_keyring or settings.var_dir / "keyring.json"


def local_ring(settings: Settings) -> KeyRing:
    """The key ring file: made on first use in dev and test; in prod it must exist, 0600."""
    if settings.is_prod and settings.pii.local_keyring is None:
        raise ConfigError("KMS_PROVIDER=local in prod needs KMS_LOCAL_KEYRING (a key ring file, mode 0600)")
    ring = KeyRing(keyring_path(settings))
    if settings.is_prod:
        if not ring.exists():
            raise ConfigError(f"KMS_LOCAL_KEYRING: {ring.path} does not exist (prod never creates one)")
        try:
            ring.check_mode()
        except KmsError as exc:
            raise ConfigError(f"KMS_LOCAL_KEYRING: {exc}") from None
    elif ring.create_if_missing():
        logger.info("created the key ring {}", ring.path)
    return ring


def make_kms(settings: Settings) -> Kms:
    if settings.pii.provider == "tencent":
        from server.pii.tencent import TencentKms

        try:
            return TencentKms(settings.pii)
        except KmsError as exc:
            raise ConfigError(str(exc)) from None
    try:
        return LocalKms(local_ring(settings))
    except KmsError as exc:
        raise ConfigError(f"KMS_LOCAL_KEYRING: {exc}") from None


@contextlib.asynccontextmanager
async def open_kms(settings: Settings) -> AsyncIterator[Kms]:
    kms = make_kms(settings)
    try:
        yield kms
    finally:
        await kms.close()


async def resolve_secrets(settings: Settings, kms: Kms) -> Settings:
    """Settings with every `kms:<ciphertext>` secret decrypted (the same object when none)."""
    wanted = kms_secrets(settings)
    if not wanted:
        return settings
    plain = {}
    for flat, ciphertext in wanted.items():
        try:
            plain[flat] = await kms.decrypt_secret(ciphertext)
        except KmsError as exc:
            raise ConfigError(f"{flat.upper()}: the kms: value does not decrypt ({exc})") from None
    logger.info("decrypted {} kms: secret(s): {}", len(plain), ", ".join(sorted(k.upper() for k in plain)))
    return settings.updated(**plain)


def blind_key(settings: Settings, kms: Kms) -> bytes:
    """BLIND_INDEX_KEY, else the local key ring's own."""
    given = settings.pii.blind_index_key
    if given is not None:
        value = given.get_secret_value().encode()
        if len(value) < MIN_BLIND_KEY:
            raise ConfigError(f"BLIND_INDEX_KEY must be at least {MIN_BLIND_KEY} characters")
        return value
    own = kms.blind_index_key()
    if own is None:
        raise ConfigError(
            f"KMS_PROVIDER={settings.pii.provider} needs BLIND_INDEX_KEY (at least 32 characters)"
        )
    return own
