"""GET /api/v1/ws: live events over a native WebSocket (docs/websocket.md).

Before the upgrade: a browser `Origin` must be this host or listed in
WS_ALLOWED_ORIGINS (else 403 FORBIDDEN, the usual error envelope); a request
without `Origin` (mini-program, native app) passes. After it: the per-process cap
(4429), then authentication by `?token=` or a first frame `{"type":"auth","token"}`
within WS_AUTH_TIMEOUT (4408), a bad or expired token (4401), the per-user cap
(4429); then `ready`, and events until either side closes. `after_seq` (in the
auth frame or the query) resumes from there with no race against live events.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import jwt
from aiohttp import WSMsgType, web
from loguru import logger

from server.auth import Principal, authenticate
from server.config import Settings
from server.errors import AppError, ErrorCode, parse_uint
from server.hub import AUTH_TIMEOUT, TOO_MANY, UNAUTHENTICATED, UNAVAILABLE, RedisEventHub, Session
from server.keys import hub_key, settings_key
from server.routing import RouteTable
from server.timing import rfc3339

routes = RouteTable(tags=["events"], auth="public")

_CLOSED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)


def origin_allowed(request: web.Request, settings: Settings) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not a browser: mini-program, native app, server
    allowed = {o.strip().rstrip("/").lower() for o in settings.ws.allowed_origins.split(",") if o.strip()}
    origin = origin.strip().rstrip("/").lower()
    if "*" in allowed or origin in allowed:
        return True
    return urlsplit(origin).netloc == request.host.lower()  # a page of this same host


def token_expiry(token: str) -> float:
    """The `exp` of an access token `authenticate` has just accepted."""
    claims = jwt.decode(token, options={"verify_signature": False, "verify_exp": False})
    return float(claims["exp"])


def check_token(request: web.Request, token: Any) -> tuple[Principal, float]:
    if not isinstance(token, str) or not token:
        raise AppError(ErrorCode.UNAUTHENTICATED, 'Send {"type": "auth", "token": <access token>}')
    principal = authenticate(request.app, token)
    return principal, token_expiry(token)


@routes.get(
    "/api/v1/ws",
    status=101,
    errors=[ErrorCode.FORBIDDEN, ErrorCode.MALFORMED_REQUEST],
    extra_responses={101: "Switching Protocols: the WebSocket of docs/websocket.md"},
)
async def websocket(request: web.Request) -> web.StreamResponse:
    """Live events: a native WebSocket (auth by first frame or ?token=)

    Frames and close codes: docs/websocket.md. Browsers must come from this host or an
    origin in WS_ALLOWED_ORIGINS (403 otherwise); clients without Origin are allowed."""
    settings = request.app[settings_key]
    hub = request.app[hub_key]
    if not origin_allowed(request, settings):
        raise AppError(ErrorCode.FORBIDDEN, "This Origin may not open the WebSocket")
    ws = web.WebSocketResponse(
        heartbeat=settings.ws.heartbeat,
        # aiohttp refuses a message of max_msg_size bytes or more; WS_MAX_FRAME is the largest allowed
        max_msg_size=settings.ws.max_frame + 1,
        timeout=settings.ws.close_timeout,
        compress=False,  # small JSON frames: deflate costs more CPU than it saves
    )
    if not ws.can_prepare(request).ok:
        raise AppError(ErrorCode.MALFORMED_REQUEST, "This endpoint speaks WebSocket only")
    await ws.prepare(request)
    session = hub.open_session(ws, request)
    try:
        session.start()
        if len(hub.sessions) > settings.ws.max_connections:
            session.close(TOO_MANY, "too many connections")
        else:
            await _serve(request, ws, session, hub, settings)
    finally:
        await session.finish()  # its first, synchronous step unregisters the session
    return ws


async def _serve(
    request: web.Request,
    ws: web.WebSocketResponse,
    session: Session,
    hub: RedisEventHub,
    settings: Settings,
) -> None:
    token: Any = request.query.get("token")
    after: Any = request.query.get("after_seq")
    if after is not None:
        parsed = parse_uint(after)
        after = -1 if parsed is None else parsed
    if token is None:
        try:
            first = await ws.receive(timeout=settings.ws.auth_timeout)
        except TimeoutError:
            session.close(AUTH_TIMEOUT, "no auth frame in time")
            return
        if first.type in _CLOSED:
            return
        frame = _parse(first.data) if first.type is WSMsgType.TEXT else None
        if frame is None or frame.get("type") != "auth":
            session.close(UNAUTHENTICATED, "the first frame must be auth")
            return
        token = frame.get("token")
        after = frame.get("after_seq")
    if after is not None and _seq_field({"after_seq": after}, "after_seq") is None:
        session.close(UNAUTHENTICATED, "after_seq must be a non-negative integer")
        return
    try:
        principal, expires_at = check_token(request, token)
    except AppError as exc:
        session.close(UNAUTHENTICATED, exc.code.value)
        return
    if hub.user_sockets(principal.user_id) >= settings.ws.max_per_user:
        session.close(TOO_MANY, "too many connections for this user")
        return
    session.renew(expires_at)
    try:
        last_seq = await hub.attach(session, principal.user_id)
    except Exception as exc:
        logger.warning("socket of user {} not attached: {!r}", principal.user_id, exc)
        session.close(UNAVAILABLE, "events unavailable, reconnect")
        return
    session.send({"type": "ready", "user_id": str(principal.user_id), "last_seq": last_seq})
    session.go_live(last_seq, after)
    async for msg in ws:
        if session.close_code is not None:
            break
        if msg.type is WSMsgType.TEXT:
            await _on_frame(request, session, msg.data)
        elif msg.type is WSMsgType.BINARY:
            _error(session, ErrorCode.MALFORMED_REQUEST, "Frames are JSON text")


def _parse(data: str) -> dict[str, Any] | None:
    try:
        frame = json.loads(data)
    except (ValueError, RecursionError):  # not JSON, or nested thousands deep
        return None
    return frame if isinstance(frame, dict) else None


def _error(session: Session, code: ErrorCode, message: str) -> None:
    session.send({"type": "error", "code": code.value, "message": message})


def _seq_field(frame: dict[str, Any], name: str) -> int | None:
    value = frame.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


async def _on_frame(request: web.Request, session: Session, data: str) -> None:
    frame = _parse(data)
    if frame is None:
        _error(session, ErrorCode.MALFORMED_REQUEST, "A frame is a JSON object")
        return
    kind = frame.get("type")
    if kind == "ping":
        session.send({"type": "pong"})
    elif kind == "ack":  # optional; checked, not recorded (docs/websocket.md)
        if _seq_field(frame, "seq") is None:
            _error(session, ErrorCode.VALIDATION_FAILED, "ack needs seq: a non-negative integer")
    elif kind == "resume":
        after = _seq_field(frame, "after_seq")
        if after is None:
            _error(session, ErrorCode.VALIDATION_FAILED, "resume needs after_seq: a non-negative integer")
        else:
            await session.resume(after)
    elif kind == "auth":
        _reauthenticate(request, session, frame.get("token"))
    else:
        _error(session, ErrorCode.MALFORMED_REQUEST, f"Unknown frame type {kind!r}")


def _reauthenticate(request: web.Request, session: Session, token: Any) -> None:
    """A fresh access token during the connection: same user, later expiry."""
    try:
        principal, expires_at = check_token(request, token)
    except AppError as exc:
        _error(session, exc.code, exc.message)
        return
    if principal.user_id != session.user_id:
        _error(session, ErrorCode.FORBIDDEN, "The token is for another user")
        return
    session.renew(expires_at)
    session.send({"type": "auth.ok", "expires_at": rfc3339(expires_at)})
