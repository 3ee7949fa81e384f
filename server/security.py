"""Password hashing (argon2id) with transparent rehash when the parameters change.

Parameters: time_cost=3, memory_cost=64 MiB, parallelism=1 (argon2-cffi's RFC 9106
low-memory profile); about 40 ms per hash on one core of the dev machine.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

HASHER = PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=1, hash_len=32, salt_len=16)


def hash_password(password: str) -> str:
    return HASHER.hash(password)


def verify_password(stored: str, password: str) -> bool:
    try:
        return HASHER.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(stored: str) -> bool:
    return HASHER.check_needs_rehash(stored)


async def hash_password_async(password: str, executor: Executor | None = None) -> str:
    """argon2 takes tens of milliseconds of CPU: keep it off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(executor, hash_password, password)


async def verify_password_async(stored: str, password: str, executor: Executor | None = None) -> bool:
    return await asyncio.get_running_loop().run_in_executor(executor, verify_password, stored, password)
