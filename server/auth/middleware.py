"""The one authentication middleware.

Each route declares `auth` (server/routing.py): `public` routes pass untouched;
`user` and `admin` routes need `Authorization: Bearer <access token>`, whose
signature, kid, typ and expiry are checked here. The caller (user id, role,
session id) goes on the request under `principal_key`. The role check of admin
routes reads the token only: no database, no Redis.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from server.auth.limits import client_ip
from server.auth.login import Client
from server.auth.tokens import Principal, bearer_token
from server.errors import AppError, ErrorCode
from server.keys import auth_key, principal_key, settings_key
from server.routing import route_spec


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    spec = route_spec(request)
    if spec is None or spec.auth == "public":
        return await handler(request)
    token = bearer_token(request.headers.get("Authorization"))
    if token is None:
        raise AppError(ErrorCode.UNAUTHENTICATED, "Send Authorization: Bearer <access token>")
    principal = request.app[auth_key].tokens.verify_access(token)
    if spec.auth == "admin" and not principal.is_admin:
        raise AppError(ErrorCode.FORBIDDEN, "This needs the admin role")
    request[principal_key] = principal
    return await handler(request)


def principal_of(request: web.Request) -> Principal:
    """The authenticated caller of a `user` or `admin` route."""
    return request[principal_key]


def authenticate(app: web.Application, token: str) -> Principal:
    """Check an access token sent some other way (e.g. the WebSocket's first frame)."""
    return app[auth_key].tokens.verify_access(token)


def client_of(request: web.Request) -> Client:
    """The caller's address (behind TRUSTED_PROXY_HOPS proxies) and user agent."""
    hops = request.app[settings_key].http.trusted_proxy_hops
    return Client(ip=client_ip(request, hops), user_agent=request.headers.get("User-Agent", "")[:255])
