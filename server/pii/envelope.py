"""Envelope encryption of personal data.

Each record gets a fresh 256-bit data key from the KMS; every column of it is sealed
with AES-256-GCM under that key, with `table|column|owner id` as associated data, so a
ciphertext copied onto another row (or column) does not open. The wrapped data key
and its KEK version are stored beside the ciphertexts; the plaintext key lives only in
memory while a record is sealed or opened. A stored column is nonce (12 bytes) +
ciphertext + tag.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.pii.kms import NONCE, Kms

FORMAT = b"\x01"  # the first byte of every sealed column


class DecryptError(RuntimeError):
    """A sealed value does not open: another row's ciphertext, a destroyed key, tampering.
    The message names the place, never a value."""


def aad(table: str, column: str, owner_id: int) -> bytes:
    return f"{table}|{column}|{owner_id}".encode()


@dataclass(frozen=True, slots=True)
class SealedRecord:
    columns: dict[str, bytes]  # column → sealed value
    wrapped_key: bytes
    kek_version: str


def seal_with(key: bytes, value: str, associated: bytes) -> bytes:
    nonce = secrets.token_bytes(NONCE)
    return FORMAT + nonce + AESGCM(key).encrypt(nonce, value.encode(), associated)


def open_with(key: bytes, sealed: bytes, associated: bytes, where: str) -> str:
    if not sealed or sealed[:1] != FORMAT or len(sealed) < 1 + NONCE + 16:
        raise DecryptError(f"{where} is not a sealed value")
    try:
        return AESGCM(key).decrypt(sealed[1 : 1 + NONCE], sealed[1 + NONCE :], associated).decode()
    except InvalidTag:
        raise DecryptError(
            f"{where} does not decrypt under its row's data key (a ciphertext of another row, or tampered)"
        ) from None


async def seal(kms: Kms, table: str, owner_id: int, values: Mapping[str, str]) -> SealedRecord:
    """Seal every column of one record under one fresh data key."""
    dk = await kms.generate_data_key()
    columns = {c: seal_with(dk.plaintext, v, aad(table, c, owner_id)) for c, v in values.items()}
    return SealedRecord(columns, dk.wrapped, dk.version)


async def unseal(
    kms: Kms,
    table: str,
    owner_id: int,
    columns: Mapping[str, bytes | None],
    wrapped_key: bytes | None,
    version: str | None,
) -> dict[str, str]:
    """Open the sealed columns of one record (DecryptError when any does not open)."""
    if wrapped_key is None or version is None:
        raise DecryptError(f"{table} row {owner_id} has no data key (its identity was deleted)")
    key = await kms.unwrap(wrapped_key, version)
    out = {}
    for column, sealed in columns.items():
        where = f"{table}.{column} of row {owner_id}"
        if sealed is None:
            raise DecryptError(f"{where} is empty")
        out[column] = open_with(key, sealed, aad(table, column, owner_id), where)
    return out
