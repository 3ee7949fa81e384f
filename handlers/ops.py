"""The ops dashboard: GET /ops, its JSON view GET /ops/data.json and refresh script
/ops/dashboard.js, and its own login (docs/ops.md).

Server-rendered HTML for admins; the script only rewrites figures in place. It
authenticates with an `ops_token` cookie (HttpOnly, SameSite=Strict, Path=/ops)
holding an admin's access token, issued by the same `AuthService.login_password` as
POST /api/v1/auth/login, so lockouts and rate limits are shared. The login form
carries a single-use CSRF token kept in Redis and echoed in an `ops_csrf` cookie; the
logout form a token derived from the session's cookie. The tokens are the CSRF check:
a browser may send `Origin: null` (it did while the page said `Referrer-Policy:
no-referrer`), so Origin only refuses a foreign origin. Every figure is fetched under
a time bound; a source that fails or is slow shows as "unavailable: …" and the page
still renders.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp_jinja2
from aiohttp import web
from loguru import logger
from multidict import MultiDictProxy
from pydantic import ValidationError

from server import __version__
from server.auth import Principal, authenticate, client_of
from server.auth.schemas import PhoneIn
from server.credits.facade import ReservationFigures
from server.errors import AppError, ErrorCode
from server.keys import (
    actor_system_key,
    auth_key,
    credits_key,
    cron_key,
    db_key,
    distributors_key,
    instance_id_key,
    media_key,
    ops_started_key,
    payments_key,
    redis_key,
    redis_pool_key,
    settings_key,
    storage_meter_key,
    tasks_key,
    vendors_key,
)
from server.routing import RouteTable
from server.templates import TEMPLATE_DIR

routes = RouteTable(tags=["ops"], auth="public")

T = TypeVar("T")

TOKEN_COOKIE = "ops_token"
CSRF_COOKIE = "ops_csrf"
COOKIE_PATH = "/ops"
CSRF_TTL = 600  # seconds a login form stays valid
QUERY_TIMEOUT = 2.0  # seconds per data source
RECENT_TASKS = 20
SCRIPT = TEMPLATE_DIR / "ops" / "dashboard.js"
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; style-src 'self' 'unsafe-inline'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Not no-referrer: under it Chromium sends `Origin: null` with the page's own form POSTs.
    "Referrer-Policy": "same-origin",
}
BAD_FORM = "This form has expired or did not come from this page; try again."
ADMIN_ONLY = "Admin only: this account cannot open the ops dashboard."


def _page(request: web.Request, name: str, context: Mapping[str, Any], status: int = 200) -> web.Response:
    resp = aiohttp_jinja2.render_template(f"ops/{name}", request, dict(context), status=status)
    resp.headers.update(HEADERS)
    return resp


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


def _set_cookie(request: web.Request, resp: web.StreamResponse, name: str, value: str, max_age: int) -> None:
    resp.set_cookie(
        name,
        value,
        max_age=max_age,
        path=COOKIE_PATH,
        httponly=True,
        samesite="Strict",
        secure=request.app[settings_key].is_prod,
    )


def _field(form: MultiDictProxy[Any], name: str, limit: int = 128) -> str:
    value = form.get(name)
    return value[:limit] if isinstance(value, str) else ""


async def _login_form(
    request: web.Request, *, status: int = 200, error: str | None = None, phone: str = ""
) -> web.Response:
    """The form with a fresh single-use CSRF token (in Redis and in a cookie)."""
    token = secrets.token_urlsafe(32)
    await request.app[redis_key].set(f"ops:csrf:{token}", "1", ex=CSRF_TTL)
    resp = _page(request, "login.html", {"csrf": token, "error": error, "phone": phone}, status)
    _set_cookie(request, resp, CSRF_COOKIE, token, CSRF_TTL)
    return resp


async def _csrf_ok(request: web.Request, form: MultiDictProxy[Any]) -> bool:
    sent = _field(form, "csrf", 64)
    cookie = request.cookies.get(CSRF_COOKIE, "")
    if not sent or not hmac.compare_digest(sent.encode(), cookie.encode()):
        return False
    return bool(await request.app[redis_key].delete(f"ops:csrf:{sent}"))  # used once


def _not_foreign(request: web.Request) -> bool:
    """False when the POST names another origin: refused even before SameSite=Strict would
    drop the cookie. No Origin, or the opaque "null", proves nothing either way: the
    form's token is then the only check (it always is checked)."""
    origin = request.headers.get("Origin")
    return origin is None or origin == "null" or urlsplit(origin).netloc == request.host


def logout_token(access_token: str) -> str:
    """The logout form's CSRF token: derived from the HttpOnly session cookie, which a
    foreign page can neither read nor guess, so it needs no storage of its own."""
    return hashlib.sha256(b"ops-logout\0" + access_token.encode()).hexdigest()


def _principal(request: web.Request) -> Principal | None:
    token = request.cookies.get(TOKEN_COOKIE)
    if not token:
        return None
    try:
        return authenticate(request.app, token)
    except AppError:
        return None


@routes.get("/ops/login", include_in_schema=False)
async def ops_login_page(request: web.Request) -> web.Response:
    return await _login_form(request)


@routes.post("/ops/login", include_in_schema=False)
async def ops_login(request: web.Request) -> web.Response:
    if not _not_foreign(request):
        return await _login_form(request, status=403, error=BAD_FORM)
    form = await request.post()
    phone = _field(form, "phone", 32)
    if not await _csrf_ok(request, form):
        return await _login_form(request, status=403, error=BAD_FORM, phone=phone)
    service = request.app[auth_key].service
    try:
        normalized = PhoneIn(phone=phone).phone
        result = await service.login_password(normalized, _field(form, "password"), client_of(request))
    except ValidationError:
        return await _login_form(request, status=401, error="Wrong phone number or password", phone=phone)
    except AppError as exc:  # wrong password, locked, rate limited, banned
        resp = await _login_form(request, status=exc.code.status, error=exc.message, phone=phone)
        if exc.retry_after is not None:
            resp.headers["Retry-After"] = str(exc.retry_after)
        return resp
    principal = authenticate(request.app, result.access_token)
    if not principal.is_admin:
        await service.logout(result.refresh_token)  # no use for a session the page will not open
        return await _login_form(request, status=403, error=ADMIN_ONLY, phone=phone)
    # Kept only so that logout can end the session; the page never refreshes it.
    ttl = request.app[settings_key].auth.refresh_token_ttl
    await request.app[redis_key].set(f"ops:refresh:{principal.sid}", result.refresh_token, ex=ttl)
    resp = _redirect("/ops")
    _set_cookie(request, resp, TOKEN_COOKIE, result.access_token, result.expires_in)
    resp.del_cookie(CSRF_COOKIE, path=COOKIE_PATH)
    logger.info("ops login of admin {}", principal.user_id)
    return resp


@routes.post("/ops/logout", include_in_schema=False)
async def ops_logout(request: web.Request) -> web.Response:
    if not _not_foreign(request):
        return await _login_form(request, status=403, error=BAD_FORM)
    principal = _principal(request)
    if principal is not None:
        sent = _field(await request.post(), "csrf", 64)
        expected = logout_token(request.cookies[TOKEN_COOKIE])
        if not hmac.compare_digest(sent.encode(), expected.encode()):
            return await _login_form(request, status=403, error=BAD_FORM)
    if principal is not None:
        redis = request.app[redis_key]
        key = f"ops:refresh:{principal.sid}"
        refresh_token = await redis.get(key)
        await redis.delete(key)
        if refresh_token:
            token = refresh_token.decode() if isinstance(refresh_token, bytes) else str(refresh_token)
            with contextlib.suppress(AppError):  # already ended
                await request.app[auth_key].service.logout(token)
    resp = _redirect("/ops/login")
    resp.del_cookie(TOKEN_COOKIE, path=COOKIE_PATH)
    return resp


# --- the dashboard ------------------------------------------------------------


def _unavailable(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"unavailable: no answer within {QUERY_TIMEOUT:g}s"
    return f"unavailable: {type(exc).__name__}: {exc}"[:300]


async def _bounded(
    name: str, fetch: Callable[[web.Application], Awaitable[T]], app: web.Application
) -> T | str:
    """The figures of one source, or why they are missing (never an exception)."""
    try:
        async with asyncio.timeout(QUERY_TIMEOUT):
            return await fetch(app)
    except Exception as exc:
        logger.warning("ops dashboard: {} {}", name, _unavailable(exc))
        return _unavailable(exc)


def _now(name: str, read: Callable[[web.Application], T], app: web.Application) -> T | str:
    try:
        return read(app)
    except Exception as exc:  # e.g. a part that did not start
        logger.warning("ops dashboard: {} {}", name, _unavailable(exc))
        return _unavailable(exc)


def _process(app: web.Application) -> dict[str, Any]:
    uptime = int(time.monotonic() - app[ops_started_key])
    days, rest = divmod(uptime, 86_400)
    return {
        "instance": app.get(instance_id_key, "?"),
        "version": __version__,
        "env": app[settings_key].app_env,
        "uptime": f"{days}d {rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}",
    }


def _pool(app: web.Application) -> dict[str, int]:
    return app[db_key].pool_stats()


def _actors(app: web.Application) -> object:
    return app[actor_system_key].snapshot()


def _vendors(app: web.Application) -> list[dict[str, Any]]:
    rows = []
    for name, s in sorted(app[vendors_key].stats().items()):
        last = s.get("last_error") or {}
        latency = s["latency"]
        rows.append(
            {
                "name": name,
                "kind": s["kind"],
                "in_flight": s["in_flight"],
                "concurrency": s["concurrency"],
                "limit_scope": f"fallback: this process's share of {s['limits']['local_limit']}"
                if s["limits"]["fallback"]
                else s["limits"]["scope"],
                "limit_fallback": s["limits"]["fallback"],
                "queue_depth": s["queue_depth"],
                "breaker": s["breaker"]["state"],
                "calls": s["calls"],
                "latency": "–"
                if latency["p50_seconds"] is None
                else f"{latency['p50_seconds']:.3g} / {latency['p99_seconds']:.3g} s",
                "errors": ", ".join(f"{k}: {v}" for k, v in sorted(s["errors"].items())) or "none",
                "last_error": f"{last.get('kind')}: {last.get('message')}" if last else "",
            }
        )
    return rows


def _local_tasks(app: web.Application) -> dict[str, int]:
    return app[tasks_key].local_stats()


async def _redis_info(app: web.Application) -> dict[str, Any]:
    info = await app[redis_key].info()
    keys = ("redis_version", "used_memory_human", "connected_clients", "uptime_in_seconds")
    return {k: info.get(k, "?") for k in keys}


async def _status_counts(app: web.Application) -> dict[str, int]:
    return await app[tasks_key].status_counts()


async def _recent_tasks(app: web.Application) -> list[dict[str, Any]]:
    return await app[tasks_key].recent(RECENT_TASKS)


async def _reservations(app: web.Application) -> ReservationFigures:
    return await app[credits_key].reservation_figures()


async def _storage(app: web.Application) -> dict[str, Any]:
    """Bytes and objects per retention class, the estimated monthly cost, and whether the
    bucket's lifecycle rules match the configuration (issue 14)."""
    report = await app[storage_meter_key].measure()
    bucket = report.bucket or {}
    differences = await app[media_key].lifecycle_check()
    return {
        "classes": [
            {
                "name": cls,
                "objects": report.database[cls][0],
                "bytes": report.database[cls][1],
                "bucket": bucket.get(cls),
            }
            for cls in report.database
        ],
        "monthly_cost_cny": round(report.monthly_cost, 4),
        "lifecycle": "applied by the nightly job (local backend)"
        if differences is None
        else ("rules match" if not differences else "; ".join(differences)),
        "lifecycle_ok": differences is None or not differences,
    }


async def _distributors(app: web.Application) -> dict[str, int]:
    """Pending applications and commission totals (issue 13)."""
    return await app[distributors_key].dashboard()


def _redis_pool(app: web.Application) -> dict[str, int]:
    return app[redis_pool_key]()


def _cron(app: web.Application) -> list[dict[str, Any]]:
    """The cron table: schedule, next run, and what this instance saw of each job."""
    runner = app.get(cron_key)
    if runner is None:
        return []  # CRON_ENABLED=false: the page says so
    return runner.table()


async def _figures(app: web.Application) -> dict[str, Any]:
    """Every figure of the dashboard: a value, or the text saying why it is missing."""
    redis, counts, recent, credits = await asyncio.gather(
        _bounded("redis", _redis_info, app),
        _bounded("task counts", _status_counts, app),
        _bounded("recent tasks", _recent_tasks, app),
        _bounded("reservations", _reservations, app),
    )
    return {
        "process": _now("process", _process, app),
        "db": _now("db pool", _pool, app),
        "redis": redis,
        "redis_pool": _now("redis pool", _redis_pool, app),
        "actors": _now("actors", _actors, app),
        "vendors": _now("vendors", _vendors, app),
        "local_tasks": _now("tasks", _local_tasks, app),
        "task_counts": counts,
        "recent_tasks": recent,
        "credits": credits,
        "distributors": await _bounded("distributors", _distributors, app),
        "storage": await _bounded("storage", _storage, app),
        "cron": _now("cron", _cron, app),
        "cron_enabled": app[settings_key].cron_enabled,
    }


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _when(ts: float | None) -> str:
    """A Unix time as the page shows it (UTC), or a dash."""
    return "–" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


async def _admin(request: web.Request) -> Principal | web.Response:
    principal = _principal(request)
    if principal is None:
        return _redirect("/ops/login")
    if not principal.is_admin:
        return await _login_form(request, status=403, error=ADMIN_ONLY)
    return principal


@routes.get("/ops", include_in_schema=False)
async def ops_dashboard(request: web.Request) -> web.Response:
    principal = await _admin(request)
    if isinstance(principal, web.Response):
        return principal
    context = {
        **await _figures(request.app),
        "user_id": principal.user_id,
        "logout_csrf": logout_token(request.cookies[TOKEN_COOKIE]),
        "when": _when,
    }
    return _page(request, "dashboard.html", context)


# --- payments (issue 12): orders, refunds and the latest notifications -----------------

RECENT_PAYMENTS = 30


async def _payments(app: web.Application) -> dict[str, Any]:
    payments = app[payments_key]
    counts, orders, refunds, notes = await asyncio.gather(
        payments.order_counts(),
        payments.admin_orders(None, None, None, RECENT_PAYMENTS),
        payments.refunds.latest(RECENT_PAYMENTS),
        payments.latest_notifications(RECENT_PAYMENTS),
    )
    return {
        "counts": counts,
        "orders": [{**o.public(), "user_id": o.user_id} for o in orders[0]],
        "refunds": [r.public() for r in refunds],
        "notifications": notes,
    }


@routes.get("/ops/payments", include_in_schema=False)
async def ops_payments(request: web.Request) -> web.Response:
    """Orders by channel and status, the latest orders, refunds and notifications (with
    why one was refused)."""
    principal = _principal(request)
    if principal is None:
        return _redirect("/ops/login")
    if not principal.is_admin:
        return await _login_form(request, status=403, error=ADMIN_ONLY)
    data = await _bounded("payments", _payments, request.app)
    return _page(request, "payments.html", {"payments": data, "user_id": principal.user_id})


@routes.get("/ops/data.json", include_in_schema=False)
async def ops_data(request: web.Request) -> web.Response:
    """The dashboard's figures as JSON, for its refresh script (same cookie as the page).
    Without a session: 401 UNAUTHENTICATED; a non-admin: 403 FORBIDDEN (the envelope)."""
    principal = _principal(request)
    if principal is None:
        raise AppError(ErrorCode.UNAUTHENTICATED, "Log in at /ops/login first")
    if not principal.is_admin:
        raise AppError(ErrorCode.FORBIDDEN, ADMIN_ONLY)
    data = await _figures(request.app)
    body = json.dumps(data, default=_json_default, ensure_ascii=False, separators=(",", ":"))
    resp = web.Response(body=body.encode(), content_type="application/json")
    resp.headers.update(HEADERS)
    return resp


@routes.get("/ops/dashboard.js", include_in_schema=False)
async def ops_script(request: web.Request) -> web.StreamResponse:
    """The refresh script: no inline script, so the page's CSP needs no 'unsafe-inline'."""
    return web.FileResponse(SCRIPT, headers={**HEADERS, "Content-Type": "text/javascript; charset=utf-8"})


async def _started(app: web.Application) -> None:
    app[ops_started_key] = time.monotonic()


def setup(app: web.Application) -> None:
    """Called by setup_routes: remember when this process started serving, for the uptime."""
    app.on_startup.append(_started)
