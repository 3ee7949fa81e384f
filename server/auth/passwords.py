"""argon2id hashing on a bounded thread pool, with transparent rehash.

The parameters come from the settings (ARGON2_TIME_COST, ARGON2_MEMORY_KIB,
ARGON2_PARALLELISM; the defaults are argon2-cffi's RFC 9106 low-memory profile, about
40 ms a hash on one core). A stored hash made with other parameters still verifies,
and is replaced at the next successful login. This is the only place passwords are
hashed: the admin bootstrap and `run.py create-admin` use it too.
Password rules (API.md): 8–72 characters with a letter and a digit.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from concurrent.futures import ThreadPoolExecutor

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from server.config import Settings

_LETTER = re.compile(r"[^\W\d_]")
_DIGIT = re.compile(r"\d")


def password_problem(password: str) -> str | None:
    """Why a new password is refused, or None."""
    if not 8 <= len(password) <= 72:
        return "must be 8 to 72 characters"
    if not _LETTER.search(password) or not _DIGIT.search(password):
        return "must contain a letter and a digit"
    return None


class Passwords:
    def __init__(self, settings: Settings) -> None:
        self.hasher = PasswordHasher(
            time_cost=settings.auth.argon2_time_cost,
            memory_cost=settings.auth.argon2_memory_kib,
            parallelism=settings.auth.argon2_parallelism,
            hash_len=32,
            salt_len=16,
        )
        self.executor = ThreadPoolExecutor(settings.auth.hash_threads, thread_name_prefix="argon2")
        # Verified against when the phone is unknown, so both cases cost the same.
        self._decoy = self.hasher.hash("decoy-password-0")

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    async def hash(self, password: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.hasher.hash, password)

    async def verify(self, stored: str | None, password: str) -> tuple[bool, str | None]:
        """(matches, new hash to store when the parameters changed)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._verify, stored, password)

    def _verify(self, stored: str | None, password: str) -> tuple[bool, str | None]:
        if stored is None:
            with contextlib.suppress(VerificationError):
                self.hasher.verify(self._decoy, password + "\0")
            return False, None
        try:
            self.hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False, None
        if self.hasher.check_needs_rehash(stored):
            return True, self.hasher.hash(password)
        return True, None
