"""The error vocabulary of the API (API.md, "Errors").

Domain code raises `AppError` (or a subclass) with an `ErrorCode`; only the error
middleware (server/middleware.py) turns it into an HTTP answer.
"""

from __future__ import annotations

import enum
from typing import Any

from pydantic import ValidationError


class ErrorCode(enum.StrEnum):
    MALFORMED_REQUEST = "MALFORMED_REQUEST"
    VALIDATION_FAILED = "VALIDATION_FAILED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    TOKEN_EXPIRED = "TOKEN_EXPIRED"
    TOKEN_REVOKED = "TOKEN_REVOKED"
    INVALID_CREDENTIALS = "INVALID_CREDENTIALS"
    FORBIDDEN = "FORBIDDEN"
    NOT_FOUND = "NOT_FOUND"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    CONFLICT = "CONFLICT"
    PHONE_TAKEN = "PHONE_TAKEN"
    IDEMPOTENCY_CONFLICT = "IDEMPOTENCY_CONFLICT"
    INVITE_CODE_INVALID = "INVITE_CODE_INVALID"
    QUOTA_INSUFFICIENT = "QUOTA_INSUFFICIENT"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"
    ACCOUNT_LOCKED = "ACCOUNT_LOCKED"
    RATE_LIMITED = "RATE_LIMITED"
    BUSY = "BUSY"
    UNAVAILABLE = "UNAVAILABLE"
    REQUEST_TIMEOUT = "REQUEST_TIMEOUT"
    UPSTREAM_FAILED = "UPSTREAM_FAILED"
    INTERNAL = "INTERNAL"

    @property
    def status(self) -> int:
        return STATUS[self]


STATUS: dict[ErrorCode, int] = {
    ErrorCode.MALFORMED_REQUEST: 400,
    ErrorCode.VALIDATION_FAILED: 422,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.TOKEN_EXPIRED: 401,
    ErrorCode.TOKEN_REVOKED: 401,
    ErrorCode.INVALID_CREDENTIALS: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.CONFLICT: 409,
    ErrorCode.PHONE_TAKEN: 409,
    ErrorCode.IDEMPOTENCY_CONFLICT: 409,
    ErrorCode.INVITE_CODE_INVALID: 422,
    ErrorCode.QUOTA_INSUFFICIENT: 402,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.ACCOUNT_LOCKED: 423,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.BUSY: 503,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.REQUEST_TIMEOUT: 408,
    ErrorCode.UPSTREAM_FAILED: 502,
    ErrorCode.INTERNAL: 500,
}

# Codes whose answers carry a Retry-After header.
RETRY_AFTER_CODES = frozenset(
    {ErrorCode.ACCOUNT_LOCKED, ErrorCode.RATE_LIMITED, ErrorCode.BUSY, ErrorCode.UNAVAILABLE}
)

# The code an aiohttp HTTPException of a given status becomes.
CODE_FOR_STATUS: dict[int, ErrorCode] = {
    400: ErrorCode.MALFORMED_REQUEST,
    401: ErrorCode.UNAUTHENTICATED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    408: ErrorCode.REQUEST_TIMEOUT,
    409: ErrorCode.CONFLICT,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    422: ErrorCode.VALIDATION_FAILED,
    429: ErrorCode.RATE_LIMITED,
    502: ErrorCode.UPSTREAM_FAILED,
    503: ErrorCode.BUSY,
}


class AppError(Exception):
    """An error with a stable API code. `retry_after` (seconds) becomes a header."""

    def __init__(
        self,
        code: ErrorCode,
        message: str | None = None,
        *,
        details: dict[str, Any] | None = None,
        retry_after: int | None = None,
    ) -> None:
        self.code = code
        self.message = message or code.value.replace("_", " ").capitalize()
        self.details = details or {}
        if retry_after is None and code in RETRY_AFTER_CODES:
            retry_after = 1
        self.retry_after = retry_after
        super().__init__(f"{code.value}: {self.message}")

    @property
    def status(self) -> int:
        return self.code.status


class UnreadableBody(AppError):
    """400 MALFORMED_REQUEST for a body that could not be read off the connection (e.g.
    `Content-Encoding: gzip` on bytes that are not gzip). aiohttp closes such a connection
    after answering, so the answer says `Connection: close`: a client must not reuse it."""

    def __init__(self, reason: object) -> None:
        super().__init__(ErrorCode.MALFORMED_REQUEST, f"The body cannot be read: {reason}")


def validation_failed(fields: list[dict[str, str]], message: str = "Validation failed") -> AppError:
    """A 422 with `details.fields` = [{"field", "message"}]."""
    return AppError(ErrorCode.VALIDATION_FAILED, message, details={"fields": fields})


class Busy(AppError):
    """A bounded mailbox, pool or queue is full: answer 503 at once."""

    def __init__(self, message: str = "Server busy, retry shortly", retry_after: int = 1) -> None:
        super().__init__(ErrorCode.BUSY, message, retry_after=retry_after)


class Unavailable(AppError):
    """503 UNAVAILABLE: the database or Redis cannot be reached (down, restarting, network).
    Nothing was written; the pools reconnect by themselves once it is back."""

    RETRY_AFTER_S = 5

    def __init__(self, what: str, cause: BaseException) -> None:
        super().__init__(
            ErrorCode.UNAVAILABLE, f"{what} is unreachable, retry shortly", retry_after=self.RETRY_AFTER_S
        )
        self.cause = f"{type(cause).__name__}: {cause}"


class BodyTimeout(AppError, TimeoutError):
    """408 REQUEST_TIMEOUT: the request body did not arrive within REQUEST_BODY_TIMEOUT.
    Set on the body stream (server/middleware.py), so whatever reads it raises this. A
    TimeoutError too: aiohttp's own read of an abandoned body then ends quietly."""

    def __init__(self, seconds: float) -> None:
        super().__init__(ErrorCode.REQUEST_TIMEOUT, f"The request body did not arrive within {seconds:g} s")


class NotFound(AppError):
    def __init__(self, message: str = "Not found") -> None:
        super().__init__(ErrorCode.NOT_FOUND, message)


class Conflict(AppError):
    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(ErrorCode.CONFLICT, message, details=details)


def parse_uint(raw: str | None, max_digits: int = 19) -> int | None:
    """`raw` as a non-negative int when it is 1..max_digits ASCII digits, else None.

    `str.isdigit` alone also accepts "²" and "１２", which `int` refuses (a 500), and
    `int` of thousands of digits raises too."""
    if raw is None or not (0 < len(raw) <= max_digits and raw.isascii() and raw.isdigit()):
        return None
    return int(raw)


def field_errors(exc: ValidationError, prefix: str = "") -> list[dict[str, str]]:
    out = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        name = f"{prefix}.{loc}" if prefix and loc else (loc or prefix or "body")
        out.append({"field": name, "message": err["msg"]})
    return out
