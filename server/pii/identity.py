"""Mainland ID numbers (GB 11643-1999) and names: checks, masked forms, the blind index.

The masked forms are computed once, when the identity is written, and stored: lists
and the distributor's own view show them without decrypting anything. The blind index
is HMAC-SHA256 of the normalised number under a key the database never holds: equal
numbers give equal indexes (duplicates and lookups), and without the key an index says
nothing (the 18-digit space is small enough to enumerate, so a plain hash would).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re

_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CHECK = "10X98765432"
_SHAPE = re.compile(r"^\d{17}[\dX]$")
ADULT_AGE = 18


class IdentityInvalid(ValueError):
    """What is wrong with an ID number or name; the message never repeats the value."""


def normalise_id(number: str) -> str:
    return number.strip().replace(" ", "").upper()


def check_digit(first17: str) -> str:
    return _CHECK[sum(int(c) * w for c, w in zip(first17, _WEIGHTS, strict=True)) % 11]


def birth_date(number: str) -> dt.date:
    try:
        return dt.date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        raise IdentityInvalid("the ID number's date of birth is not a real date") from None


def check_id(number: str, today: dt.date | None = None) -> str:
    """The normalised number when it is a valid ID number of an adult; else IdentityInvalid."""
    n = normalise_id(number)
    if not _SHAPE.match(n):
        raise IdentityInvalid("an ID number is 17 digits and a final digit or X")
    if check_digit(n[:17]) != n[17]:
        raise IdentityInvalid("the ID number's check digit is wrong")
    born = birth_date(n)
    today = today or dt.date.today()
    if born > today or born.year < 1900:
        raise IdentityInvalid("the ID number's date of birth is not a real date")
    age = today.year - born.year - ((today.month, today.day) < (born.month, born.day))
    if age < ADULT_AGE:
        raise IdentityInvalid(f"a distributor must be at least {ADULT_AGE} years old")
    return n


def check_name(name: str) -> str:
    n = name.strip()
    if not 2 <= len(n) <= 64 or any(c.isdigit() or c in "<>{}[]\\/" for c in n):
        raise IdentityInvalid("a real name is 2 to 64 characters, no digits")
    return n


def mask_id(number: str) -> str:
    """`1101**********1234`: the region's first 4 and the last 4."""
    return number[:4] + "*" * (len(number) - 8) + number[-4:]


def mask_name(name: str) -> str:
    """`张*`, `张**`: the first character only."""
    return name[:1] + "*" * (len(name) - 1)


def blind_index(key: bytes, number: str) -> bytes:
    return hmac.new(key, normalise_id(number).encode(), hashlib.sha256).digest()


def make_id(born: dt.date, region: str = "110101", serial: str = "123") -> str:
    """A valid ID number (tests, benchmarks, docs)."""
    first = f"{region}{born:%Y%m%d}{serial}"
    return first + check_digit(first)
