"""Vendor adapters: how one attempt of one operation reaches a vendor.

An adapter knows a vendor's wire format and nothing about limits: the VendorActor
(actors/vendor.py) decides when an attempt starts, how long it may take, and whether
a failure is worth another attempt. Adapters report failures as `VendorError`, whose
`kind` says why; `RETRYABLE` and `BREAKER_KINDS` say what the actor does with it.

- `LocalAdapter`: the built-in Pillow vendor (server/vendors/local.py) in an owned,
  bounded thread pool.
- `HttpAdapter`: a generic JSON-over-HTTP vendor (the protocol is in docs/vendors.md).
- `DashScopeAdapter` (server/vendors/dashscope.py): Alibaba DashScope's async tasks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, Protocol

import aiohttp
from PIL import Image

from server.errors import AppError, ErrorCode, parse_uint
from server.media.images import CONTENT_TYPES, sniff_format
from server.vendors import OperationSpec
from server.vendors import local as local_vendor

Inputs = Mapping[str, bytes | list[bytes]]
#: Publishes bytes where a vendor can fetch them; answers the URL (a signed, expiring one).
Publish = Callable[[bytes, str], Awaitable[str]]

#: Failure kinds worth another attempt: the same request may well succeed shortly.
RETRYABLE: Final = frozenset({"timeout", "connection", "rate_limited", "server", "publish"})
#: Failure kinds that say the vendor is unhealthy, counted by the circuit breaker.
BREAKER_KINDS: Final = frozenset({"timeout", "connection", "rate_limited", "server", "auth", "bad_response"})
#: Failure kinds that say nothing about the vendor (our storage, our bugs): the breaker
#: ignores them. Every other kind (rejected, task_failed) is the vendor working: it
#: resets the breaker's count.
NEUTRAL_KINDS: Final = frozenset({"publish", "internal"})
#: Consecutive failed polls of a running task tolerated before the attempt fails.
POLL_ERRORS: Final = 3


@dataclass(frozen=True, slots=True)
class VendorResult:
    """One vendor call's output image."""

    data: bytes
    content_type: str


class VendorError(AppError):
    """A vendor call failed; `kind` says why (it is the `kind` label of wardrobe_vendor_errors_total):

    timeout, connection, rate_limited (429), server (5xx), auth (401/403), rejected (other
    4xx), task_failed (the vendor ran the task and reported failure), bad_response (an
    answer we cannot use), invalid (inputs or parameters refused before any attempt),
    publish (inputs could not be made fetchable), breaker_open, internal (a bug).

    Code UPSTREAM_FAILED (502), except `invalid`: VALIDATION_FAILED (422).
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        status: int | None = None,
        wait_hint: float | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        code = ErrorCode.VALIDATION_FAILED if kind == "invalid" else ErrorCode.UPSTREAM_FAILED
        super().__init__(code, message, details={"kind": kind, **(details or {})})
        self.kind = kind
        self.http_status = status
        #: A vendor's Retry-After, in seconds: the next attempt waits at least this long.
        self.wait_hint = wait_hint

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE

    @property
    def unhealthy(self) -> bool:
        return self.kind in BREAKER_KINDS

    @property
    def neutral(self) -> bool:
        return self.kind in NEUTRAL_KINDS


def classify(exc: BaseException) -> VendorError:
    """Any exception from an attempt as a VendorError (its kind decides retry and breaker)."""
    if isinstance(exc, VendorError):
        return exc
    if isinstance(exc, TimeoutError):  # asyncio.timeout, aiohttp's ServerTimeoutError
        return VendorError("timeout", "The vendor did not answer in time")
    if isinstance(exc, aiohttp.ClientConnectionError | ConnectionError):
        return VendorError("connection", f"Cannot reach the vendor: {exc}")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return VendorError("connection", f"The vendor's answer was cut short: {exc}")
    return VendorError("internal", f"Vendor call failed: {type(exc).__name__}: {exc}")


class Adapter(Protocol):
    """One vendor's wire format. `call` runs ONE attempt, within `timeout` seconds."""

    kind: str
    operations: Mapping[str, OperationSpec]

    async def call(
        self,
        operation: str,
        inputs: Inputs,
        params: Mapping[str, Any],
        timeout: float,  # noqa: ASYNC109 - a budget the adapter passes on; the actor enforces it
    ) -> VendorResult: ...

    async def close(self) -> None: ...


# --- local --------------------------------------------------------------------------------


class LocalAdapter:
    """The built-in vendor: `server.vendors.local.run_operation` in a thread pool of
    `threads` workers, owned here and shut down by `close()`. Give it as many threads as
    the actor has slots: each call then holds one thread, and the pool's own queue never
    holds more than a call whose asker was cancelled while its thread still ran."""

    kind = "local"

    def __init__(self, threads: int) -> None:
        self.operations: Mapping[str, OperationSpec] = local_vendor.OPERATIONS
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="vendor-local")

    async def call(
        self,
        operation: str,
        inputs: Inputs,
        params: Mapping[str, Any],
        timeout: float,  # noqa: ASYNC109
    ) -> VendorResult:
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(
                self._pool, local_vendor.run_operation, operation, inputs, params
            )
        except (ValueError, OSError, Image.DecompressionBombError) as exc:
            # Pillow reports an unreadable image as OSError; nothing here is worth a retry.
            raise VendorError("invalid", str(exc) or type(exc).__name__) from exc
        return VendorResult(result.data, result.content_type)

    async def close(self) -> None:
        # Threads cannot be interrupted: wait (off the loop) for running operations.
        await asyncio.to_thread(self._pool.shutdown, True, cancel_futures=True)


# --- HTTP helpers -------------------------------------------------------------------------


def status_error(status: int, body: str, *, retry_after: str | None = None, code: str = "") -> VendorError:
    """The VendorError for a non-2xx answer."""
    detail = f"{code}: " if code else ""
    text = f"HTTP {status} {detail}{body[:300]}".strip()
    if status == 429:
        hint = None
        seconds = parse_uint(retry_after, max_digits=6)
        if seconds is not None:
            hint = float(seconds)
        return VendorError(
            "rate_limited", f"The vendor is rate limiting us ({text})", status=status, wait_hint=hint
        )
    if status >= 500:
        return VendorError("server", f"The vendor failed ({text})", status=status)
    if status in (401, 403):
        return VendorError("auth", f"The vendor refused our credentials ({text})", status=status)
    return VendorError("rejected", f"The vendor rejected the request ({text})", status=status)


def image_type(data: bytes, declared: str | None = None) -> str:
    """The content type of image bytes (sniffed; the declared type only breaks no tie)."""
    fmt = sniff_format(data)
    if fmt is not None:
        return CONTENT_TYPES[fmt]
    if data.startswith(b"BM"):
        return "image/bmp"
    raise VendorError("bad_response", f"The vendor's result is not a JPEG, PNG or WebP image ({declared})")


async def read_limited(resp: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    """The body, or bad_response once it passes `max_bytes` (checked while reading)."""
    if resp.content_length is not None and resp.content_length > max_bytes:
        raise VendorError("bad_response", f"The vendor's result is over {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > max_bytes:
            raise VendorError("bad_response", f"The vendor's result is over {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(resp: aiohttp.ClientResponse, max_bytes: int) -> dict[str, Any]:
    raw = await read_limited(resp, max_bytes)
    try:
        body = json.loads(raw)
    except ValueError:
        raise VendorError(
            "bad_response", f"The vendor answered HTTP {resp.status} with invalid JSON"
        ) from None
    if not isinstance(body, dict):
        raise VendorError("bad_response", "The vendor answered JSON that is not an object")
    return body


async def raise_for_status(resp: aiohttp.ClientResponse) -> None:
    if resp.status < 300:
        return
    text = (await resp.content.read(2048)).decode("utf-8", "replace")
    code = ""
    try:
        body = json.loads(text)
        if isinstance(body, dict):
            code = str(body.get("code") or "")
            text = str(body.get("message") or body.get("error") or text)
    except ValueError:
        pass
    raise status_error(resp.status, text, retry_after=resp.headers.get("Retry-After"), code=code)


# --- generic HTTP -------------------------------------------------------------------------


def _b64(value: bytes | list[bytes]) -> str | list[str]:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return [base64.b64encode(v).decode() for v in value]


class HttpAdapter:
    """A generic vendor: POST `{base}/{operation}` with a bearer key and JSON
    `{"operation", "params", "inputs": {name: base64 | [base64]}}`. The answer is the image
    itself (an image/* body), JSON `{"image": base64}`, or JSON `{"task_id"}`; a task is
    polled at GET `{base}/tasks/{id}` until `{"status": "succeeded", "image"}` (or an image
    body) or `{"status": "failed", "error"}`."""

    kind = "http"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: str | None,
        operations: Mapping[str, OperationSpec],
        *,
        poll_interval: float = 1.0,
        max_result_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.operations = operations
        self._session = session
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._poll_interval = poll_interval
        self._max = max_result_bytes

    async def call(
        self,
        operation: str,
        inputs: Inputs,
        params: Mapping[str, Any],
        timeout: float,  # noqa: ASYNC109
    ) -> VendorResult:
        body = {
            "operation": operation,
            "params": dict(params),
            "inputs": {name: _b64(value) for name, value in inputs.items()},
        }
        async with self._session.post(f"{self._base}/{operation}", json=body, headers=self._headers) as resp:
            await raise_for_status(resp)
            answer = await self._answer(resp)
        if isinstance(answer, VendorResult):
            return answer
        if answer is None:
            raise VendorError("bad_response", "The vendor answered neither an image nor a task id")
        return await self._poll(answer)

    async def close(self) -> None:
        """Nothing to close: the session belongs to vendors_ctx."""

    async def _answer(self, resp: aiohttp.ClientResponse) -> VendorResult | str | None:
        """The image of a finished answer, the task id of an unfinished one (None: no id)."""
        if resp.content_type.startswith("image/"):
            data = await read_limited(resp, self._max)
            return VendorResult(data, image_type(data, resp.content_type))
        body = await read_json(resp, self._max * 2)  # base64 is 4/3 of the image
        if isinstance(body.get("image"), str):
            return self._decode(body["image"])
        status = body.get("status")
        if status == "failed":
            reason = body.get("error") or "no reason given"
            raise VendorError("task_failed", f"The vendor's task failed: {reason}")
        if status == "succeeded":
            raise VendorError("bad_response", "The vendor's task succeeded without an image")
        task_id = body.get("task_id")
        return str(task_id) if isinstance(task_id, str | int) else None

    def _decode(self, text: str) -> VendorResult:
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise VendorError("bad_response", "The vendor's image is not valid base64") from None
        if len(data) > self._max:
            raise VendorError("bad_response", f"The vendor's result is over {self._max} bytes")
        return VendorResult(data, image_type(data))

    async def _poll(self, task_id: str) -> VendorResult:
        """Poll until the task ends; bounded by the attempt's timeout (the actor's
        asyncio.timeout around `call`). A poll that fails for a passing reason is
        tolerated POLL_ERRORS times in a row: the task itself is still running."""
        errors = 0
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                async with self._session.get(f"{self._base}/tasks/{task_id}", headers=self._headers) as resp:
                    await raise_for_status(resp)
                    answer = await self._answer(resp)
            except (aiohttp.ClientError, VendorError) as exc:
                error = classify(exc)
                errors += 1
                if not error.retryable or errors > POLL_ERRORS:
                    raise error from exc
                continue
            errors = 0
            if isinstance(answer, VendorResult):
                return answer
