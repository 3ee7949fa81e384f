"""The outermost middleware: request id, the error envelope, access log, HTTP metrics,
and the deadline of the request body.

Only this module turns exceptions into HTTP answers (STYLE.md rule 10).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import secrets
import time
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from loguru import logger
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server import sentry
from server.errors import (
    CODE_FOR_STATUS,
    AppError,
    BodyTimeout,
    ErrorCode,
    Unavailable,
    UnreadableBody,
)
from server.keys import error_code_key, metrics_key, request_id_key, settings_key
from server.logging import REQUEST_ID
from server.routing import json_response

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
REQUEST_ID_HEADER = "X-Request-ID"
UNMATCHED = "<unmatched>"
CLIENT_CLOSED = 499  # the status nginx logs for a client that went away before the answer


#: A request id made here: this process's random prefix and a counter. Unique across
#: processes and restarts (64 random bits), and no system call per request: an id
#: needs to be unique, not unguessable.
_RID_PREFIX = secrets.token_hex(8)
_rid_serial = itertools.count(1)


def _new_rid_prefix() -> None:  # a forked child is another process: its own prefix
    global _RID_PREFIX, _rid_serial
    _RID_PREFIX, _rid_serial = secrets.token_hex(8), itertools.count(1)


os.register_at_fork(after_in_child=_new_rid_prefix)


def request_id_for(request: web.Request) -> str:
    rid: str | None = request.get(request_id_key)
    if rid is not None:
        return rid
    sent = request.headers.get(REQUEST_ID_HEADER, "")
    rid = sent if _REQUEST_ID_OK.match(sent) else f"{_RID_PREFIX}{next(_rid_serial):016x}"
    request[request_id_key] = rid
    return rid


def route_template(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


def error_response(
    request: web.Request,
    code: ErrorCode,
    message: str,
    *,
    details: dict[str, Any] | None = None,
    retry_after: int | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    request[error_code_key] = code.value  # counted in wardrobe_http_errors_total{route,code}
    body = {
        "error": {
            "code": code.value,
            "message": message,
            "request_id": request_id_for(request),
            "details": details or {},
        }
    }
    resp = json_response(body, code.status)
    if retry_after is not None:
        resp.headers["Retry-After"] = str(max(1, int(retry_after)))
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> web.StreamResponse:
    if exc.status < 400:
        return exc  # redirects and 2xx raised as exceptions pass through
    code = CODE_FOR_STATUS.get(
        exc.status, ErrorCode.INTERNAL if exc.status >= 500 else ErrorCode.MALFORMED_REQUEST
    )
    headers = {}
    if "Allow" in exc.headers:
        headers["Allow"] = exc.headers["Allow"]
    message = exc.reason
    if exc.status == 404:
        message = f"No route for {request.method} {request.path}"
    elif exc.status == 405:
        message = f"{request.method} is not allowed on {request.path}"
    retry = 1 if code in (ErrorCode.RATE_LIMITED, ErrorCode.BUSY) else None
    return error_response(request, code, message, retry_after=retry, headers=headers)


def _body_deadline(request: web.Request) -> asyncio.TimerHandle | None:
    """After REQUEST_BODY_TIMEOUT, a body not fully received fails every read of it with
    BodyTimeout (408): whoever reads it (JSON, multipart, form) gets the same error, and a
    client trickling a byte at a time cannot hold a handler for ever."""
    if not request.body_exists or request.content.is_eof():
        return None  # no body, or all of it is in already (most requests): no timer to set
    body = request.content
    seconds = request.app[settings_key].http.request_body_timeout

    def expire() -> None:
        if not body.is_eof():
            body.set_exception(BodyTimeout(seconds))

    return asyncio.get_running_loop().call_later(seconds, expire)


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


@web.middleware
async def envelope_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = request_id_for(request)
    started = time.perf_counter()
    status = 500
    rid_token = REQUEST_ID.set(rid)
    sentry.tag_request(rid)
    deadline = _body_deadline(request)
    try:
        response = await handler(request)
        status = response.status
        return response
    except AppError as exc:
        if isinstance(exc, Unavailable):
            logger.warning("{} {}: {} ({})", request.method, request.path, exc.message, exc.cause)
        response = error_response(
            request, exc.code, exc.message, details=exc.details, retry_after=exc.retry_after
        )
        if isinstance(exc, UnreadableBody | BodyTimeout):
            response.force_close()  # the rest of the body is not read: the connection is spent
        status = response.status
        return response
    except web.HTTPException as exc:
        response = _from_http_exception(request, exc)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = CLIENT_CLOSED  # the client went away (a server run with handler_cancellation)
        raise
    except (RedisConnectionError, RedisTimeoutError) as exc:
        lost = Unavailable("Redis", exc)
        logger.warning("{} {}: {} ({})", request.method, request.path, lost.message, lost.cause)
        response = error_response(request, lost.code, lost.message, retry_after=lost.retry_after)
        status = response.status
        return response
    except Exception as exc:
        if isinstance(exc, ConnectionError) and _client_gone(request):
            # The client hung up while its body was read (ConnectionResetError from the
            # body stream): nobody is left to answer, and nothing went wrong on our side.
            logger.info("{} {}: the client went away ({!r})", request.method, request.path, exc)
            response = web.Response(status=CLIENT_CLOSED)
            response.force_close()
            status = CLIENT_CLOSED
            return response
        logger.opt(exception=True).error("unhandled error in {} {}", request.method, request.path)
        sentry.capture(exc)  # answered here, so the aiohttp integration never sees it
        response = error_response(request, ErrorCode.INTERNAL, "Internal server error")
        status = 500
        return response
    finally:
        if deadline is not None:
            deadline.cancel()
        elapsed = time.perf_counter() - started
        route = route_template(request)
        metrics = request.app[metrics_key]
        metrics.http_answered(request.method, route, status, elapsed)
        code = request.get(error_code_key)
        if code is not None:
            metrics.http_errors.labels(route, code).inc()
        logger.info(
            "{} {} {} {:.1f}ms", request.method, route, status, elapsed * 1000, route=route, status=status
        )
        REQUEST_ID.reset(rid_token)


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer carries X-Request-ID, WebSocket upgrades included."""
    response.headers[REQUEST_ID_HEADER] = request_id_for(request)
