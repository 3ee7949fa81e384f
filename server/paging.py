"""Cursor paging for every list (API.md: `?cursor=&limit=`, `{items, next_cursor}`).

A cursor is opaque to clients: the sort key of the last row of a page, as
URL-safe base64 of a JSON array. Lists page by a key that only grows (an id, or
(created_at, id)), newest first:

    after = decode_cursor(query.cursor, int)        # None on the first page
    rows = await db.fetchall("... WHERE id < %s ORDER BY id DESC LIMIT %s",
                             after[0] if after else 2**63, query.limit + 1)
    rows, next_cursor = page_of(rows, query.limit, lambda r: (r["id"],))

Fetch one row more than the limit: its presence says there is a next page.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, Field, field_validator

from server.errors import validation_failed

T = TypeVar("T")
R = TypeVar("R")
CursorValue = int | str


class PageQuery(BaseModel):
    """Subclass it to add filters; `cursor` and `limit` are the paging part."""

    cursor: str | None = Field(None, description="`next_cursor` of the previous page")
    limit: int = Field(20, ge=1, le=100, description="Items per page, 1..100")

    @field_validator("cursor")
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v or None


class Page(BaseModel, Generic[T]):
    """Subclass with a concrete item type (`class UserPage(Page[User])`): OpenAPI names it."""

    items: list[T]
    next_cursor: str | None = None


def encode_cursor(*key: CursorValue) -> str:
    raw = json.dumps(list(key), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(
    cursor: str | None, *types: type[CursorValue], accept: Callable[..., bool] | None = None
) -> tuple[Any, ...] | None:
    """The key a cursor carries, checked against the expected types (and by `accept`, given
    the values, where a type is not enough: a string key's format); 422 when it is not ours."""
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        values = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):  # RecursionError: nested thousands deep
        raise _bad_cursor() from None
    if not isinstance(values, list) or len(values) != len(types):
        raise _bad_cursor()
    for value, tp in zip(values, types, strict=True):
        if type(value) is not tp:
            raise _bad_cursor()
    if accept is not None and not accept(*values):
        raise _bad_cursor()
    return tuple(values)


def page_of(
    rows: Sequence[R], limit: int, key: Callable[[R], tuple[CursorValue, ...]]
) -> tuple[list[R], str | None]:
    """Cut `limit + 1` fetched rows to a page and the cursor of the next one."""
    items = list(rows[:limit])
    if len(rows) > limit and items:
        return items, encode_cursor(*key(items[-1]))
    return items, None


def _bad_cursor() -> Exception:
    return validation_failed([{"field": "query.cursor", "message": "is not a cursor this list gave out"}])
