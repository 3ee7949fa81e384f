"""Optional error tracking with Sentry (SENTRY_DSN; docs/ops.md "Sentry").

`init_sentry(settings)` turns on sentry-sdk with its aiohttp integration; without a DSN
nothing is initialised and the hooks below cost one boolean test. The envelope
middleware answers every unhandled error itself (a 500 envelope), so it reports the
exception with `capture` and tags each request's scope with its request id.

Personal data never leaves: `data_collection` sends no user info, request bodies or
local variables, and `scrub` (before_send and
before_send_transaction) masks phone numbers, ID-card numbers, tokens and secrets in
every string of the event, and the values of Authorization, Cookie and token-like keys.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import sentry_sdk
from sentry_sdk.integrations.aiohttp import AioHttpIntegration
from sentry_sdk.integrations.logging import LoggingIntegration

from server.config import Settings

FILTERED = "[Filtered]"
_SECRET_KEY = re.compile(
    r"authorization|cookie|token|password|secret|csrf|^code$|id_?card|id_?number|phone|signature", re.I
)
_PATTERNS = (
    re.compile(r"\b[1-9]\d{5}(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx]\b"),  # ID
    re.compile(r"(?<!\d)(?:\+?86[- ]?)?1[3-9]\d{9}(?!\d)"),  # mainland mobile numbers
    re.compile(r"\beyJ[\w-]+\.[\w-]+\.[\w-]+"),  # JWTs
    re.compile(r"(?i)\b(bearer|basic)\s+[\w.~+/=-]+"),  # credentials in text
    re.compile(r"(?i)((?:token|password|secret|code)[\"']?\s*[=:]\s*[\"']?)[^\s&\"',;]+"),
)

_enabled = False


def _scrub_text(text: str) -> str:
    for pattern in _PATTERNS:
        if pattern.groups:
            text = pattern.sub(lambda m: m.group(1) + FILTERED if m.group(1) else FILTERED, text)
        else:
            text = pattern.sub(FILTERED, text)
    return text


def _scrub(value: Any, depth: int = 0) -> Any:
    if depth > 20:
        return value
    if isinstance(value, str):
        return _scrub_text(value)
    if isinstance(value, dict):
        return {
            k: FILTERED if isinstance(k, str) and _SECRET_KEY.search(k) and v else _scrub(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub(v, depth + 1) for v in value]
    return value


def scrub(event: dict[str, Any], hint: dict[str, Any] | None = None) -> dict[str, Any]:
    """before_send: the event with personal data and secrets masked (never dropped)."""
    tags = event.get("tags")
    scrubbed: dict[str, Any] = _scrub(event)
    if isinstance(tags, dict):
        scrubbed["tags"] = {k: _scrub_text(v) if isinstance(v, str) else v for k, v in tags.items()}
    return scrubbed


def init_sentry(settings: Settings) -> bool:
    """Start sentry-sdk when SENTRY_DSN is set; True if it did."""
    global _enabled
    if not settings.sentry.dsn:
        return False
    from server import __version__

    sentry_sdk.init(
        dsn=settings.sentry.dsn,
        environment=settings.sentry.environment or settings.app_env,
        release=f"wardrobe-server@{__version__}",
        sample_rate=settings.sentry.sample_rate,
        traces_sample_rate=settings.sentry.traces_sample_rate,
        # No user info, request bodies or local variables; headers still go, masked by scrub.
        data_collection={"user_info": False, "http_bodies": [], "stack_frame_variables": False},
        max_request_body_size="never",
        before_send=scrub,  # type: ignore[arg-type]
        before_send_transaction=scrub,  # type: ignore[arg-type]
        integrations=[AioHttpIntegration(), LoggingIntegration(event_level=None)],
    )
    _enabled = True
    return True


async def close_sentry(timeout: float = 2.0) -> None:  # noqa: ASYNC109 - the SDK's flush bound
    """Send what is queued (up to `timeout` seconds) and stop reporting. The flush waits
    in a thread: the loop stays free (in tests the ingest endpoint runs on it)."""
    global _enabled
    if _enabled:
        _enabled = False
        await asyncio.to_thread(sentry_sdk.get_client().close, timeout=timeout)
        sentry_sdk.get_global_scope().set_client(None)  # back to the non-recording client


def tag_request(request_id: str) -> None:
    """Tag the current request's scope (the aiohttp integration opened it)."""
    if _enabled:
        sentry_sdk.set_tag("request_id", request_id)


def capture(exc: BaseException) -> None:
    if _enabled:
        sentry_sdk.capture_exception(exc)
