"""Route declarations: one decorator gives aiohttp its route and OpenAPI its operation.

    routes = RouteTable(tags=["auth"])

    @routes.post("/api/v1/auth/login", body=LoginIn, response=TokenPair,
                 errors=[ErrorCode.INVALID_CREDENTIALS])
    async def login(request: web.Request, body: LoginIn) -> TokenPair: ...

The wrapper parses and validates the JSON body (`body=`) and the query string
(`query=`) with pydantic, passes them as keyword arguments, and renders what the
handler returns: a pydantic model or any value of the declared `response` type as
JSON with `status`, `None` as 204, or a `web.StreamResponse` as it is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from aiohttp import web
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from server.errors import AppError, ErrorCode, UnreadableBody, field_errors, parse_uint, validation_failed
from server.keys import settings_key

Auth = Literal["public", "user", "admin"]
Handler = Callable[..., Awaitable[Any]]

JSON_TYPES = ("application/json",)
_PATH_PARAM = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_]*)(?::[^}]*)?\}")


@dataclass(frozen=True, slots=True)
class RouteSpec:
    method: str
    path: str
    handler: Handler
    name: str
    summary: str
    description: str
    tags: tuple[str, ...]
    auth: Auth
    body: type[BaseModel] | None
    query: type[BaseModel] | None
    response: Any
    status: int
    errors: tuple[ErrorCode, ...]
    content_type: str
    include_in_schema: bool
    extra_responses: dict[int, str] = field(default_factory=dict)

    @property
    def path_params(self) -> list[str]:
        return _PATH_PARAM.findall(self.path)

    @property
    def openapi_path(self) -> str:
        return _PATH_PARAM.sub(lambda m: "{" + m.group(1) + "}", self.path)


async def read_json(request: web.Request, max_bytes: int) -> Any:
    """The request body as JSON, or MALFORMED_REQUEST / PAYLOAD_TOO_LARGE."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise AppError(ErrorCode.PAYLOAD_TOO_LARGE, f"JSON bodies are limited to {max_bytes} bytes")
    ctype = request.headers.get("Content-Type")
    if ctype is not None and not (
        request.content_type in JSON_TYPES or request.content_type.endswith("+json")
    ):
        raise AppError(ErrorCode.MALFORMED_REQUEST, "The body must be JSON (Content-Type: application/json)")
    try:
        raw = await request.read()
    except web.RequestPayloadError as exc:  # e.g. Content-Encoding: gzip on a body that is not
        raise UnreadableBody(exc) from None
    if len(raw) > max_bytes:
        raise AppError(ErrorCode.PAYLOAD_TOO_LARGE, f"JSON bodies are limited to {max_bytes} bytes")
    if not raw.strip():
        raise AppError(ErrorCode.MALFORMED_REQUEST, "A JSON body is required")
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        # ValueError: not JSON (JSONDecodeError), not UTF-8, NaN/Infinity, an integer of over
        # 4,300 digits; RecursionError: arrays or objects nested thousands deep.
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise AppError(ErrorCode.MALFORMED_REQUEST, f"The body is not valid JSON: {reason}") from None
    if b"\\u" in raw and _lone_surrogate(data):  # only an escape can make one: UTF-8 cannot
        # "\\ud800" alone is JSON, but not text: no column can store it (MySQL's client raised).
        raise AppError(ErrorCode.MALFORMED_REQUEST, "The body is not valid JSON: a lone surrogate")
    return data


def _lone_surrogate(data: Any) -> bool:
    try:
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    return False


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _not_null_in_docs(schema: dict[str, Any]) -> None:
    schema.pop("default", None)
    kinds = [k for k in schema.pop("anyOf", []) if k != {"type": "null"}]
    if len(kinds) == 1:
        schema.update(kinds[0])
    elif kinds:
        schema["anyOf"] = kinds


def omittable(**field_kwargs: Any) -> Any:
    """A PATCH field that may be left out (it stays as it is) but never set to null.

    Type it `T | None` and reject None in a validator; the OpenAPI schema shows `T` alone,
    with no null type and no null default. Read the changes with
    `model_dump(exclude_unset=True)`."""
    return Field(None, json_schema_extra=_not_null_in_docs, **field_kwargs)


def path_id(request: web.Request, name: str, what: str) -> int:
    """A numeric id from the path (BIGINT range), or 404 NOT_FOUND naming `what`."""
    value = parse_uint(request.match_info[name])
    if value is None or value >= 2**63:
        raise AppError(ErrorCode.NOT_FOUND, f"No such {what}")
    return value


def json_response(data: Any, status: int = 200) -> web.Response:
    """Compact JSON (no spaces), as every answer of the API; not `web.json_response`."""
    return web.Response(
        body=json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
    )


class RouteTable:
    """The routes of one handlers module."""

    def __init__(self, *, tags: Sequence[str] = (), auth: Auth = "user") -> None:
        self.specs: list[RouteSpec] = []
        self._tags = tuple(tags)
        self._auth: Auth = auth

    def route(
        self,
        method: str,
        path: str,
        *,
        auth: Auth | None = None,
        body: type[BaseModel] | None = None,
        query: type[BaseModel] | None = None,
        response: Any = None,
        status: int = 200,
        errors: Iterable[ErrorCode] = (),
        summary: str | None = None,
        tags: Sequence[str] | None = None,
        content_type: str = "application/json",
        include_in_schema: bool = True,
        extra_responses: dict[int, str] | None = None,
    ) -> Callable[[Handler], Handler]:
        def decorate(fn: Handler) -> Handler:
            adapter = (
                TypeAdapter(response) if response is not None and content_type == JSON_TYPES[0] else None
            )
            doc = (fn.__doc__ or "").strip()
            first, _, rest = doc.partition("\n")

            async def handler(request: web.Request) -> web.StreamResponse:
                kwargs: dict[str, Any] = {}
                if body is not None:
                    data = await read_json(request, request.app[settings_key].http.json_body_max)
                    try:
                        kwargs["body"] = body.model_validate(data)
                    except ValidationError as exc:
                        raise validation_failed(field_errors(exc)) from None
                if query is not None:
                    try:
                        kwargs["query"] = query.model_validate(dict(request.query))
                    except ValidationError as exc:
                        raise validation_failed(field_errors(exc, "query")) from None
                result = await fn(request, **kwargs)
                if isinstance(result, web.StreamResponse):
                    return result
                if result is None:
                    return web.Response(status=204)
                if isinstance(result, BaseModel):
                    payload = result.model_dump_json().encode()
                elif adapter is not None:
                    # Plain data is checked against the declared model: the contract holds.
                    payload = adapter.dump_json(adapter.validate_python(result))
                else:
                    return json_response(result, status)
                return web.Response(body=payload, status=status, content_type="application/json")

            spec = RouteSpec(
                method=method.upper(),
                path=path,
                handler=handler,
                name=fn.__name__,
                summary=summary or first or fn.__name__.replace("_", " "),
                description=rest.strip(),
                tags=tuple(tags) if tags is not None else self._tags,
                auth=auth or self._auth,
                body=body,
                query=query,
                response=response,
                status=status,
                errors=tuple(errors),
                content_type=content_type,
                include_in_schema=include_in_schema,
                extra_responses=extra_responses or {},
            )
            handler.route_spec = spec  # type: ignore[attr-defined]
            handler.__name__ = fn.__name__
            handler.__doc__ = fn.__doc__
            self.specs.append(spec)
            return fn

        return decorate

    def get(self, path: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("POST", path, **kw)

    def patch(self, path: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("PATCH", path, **kw)

    def put(self, path: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("PUT", path, **kw)

    def delete(self, path: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("DELETE", path, **kw)


def idempotency_key(request: web.Request) -> str:
    """The request's `Idempotency-Key` header: 1–128 printable characters, else 422."""
    key = optional_idempotency_key(request)
    if key is None:
        raise validation_failed(
            [{"field": "header.Idempotency-Key", "message": "required: 1–128 printable characters"}]
        )
    return key


def optional_idempotency_key(request: web.Request) -> str | None:
    """The request's `Idempotency-Key` header, None when not sent; 422 when it is not
    1–128 printable characters."""
    key = request.headers.get("Idempotency-Key")
    if key is not None and (not (1 <= len(key) <= 128) or not key.isprintable() or key.strip() != key):
        raise validation_failed(
            [{"field": "header.Idempotency-Key", "message": "must be 1–128 printable characters"}]
        )
    return key


def route_spec(request: web.Request) -> RouteSpec | None:
    """The declaration of the route a request matched (None for 404/405 and static files)."""
    return route_spec_of(request.match_info.handler)


def route_spec_of(handler: Any) -> RouteSpec | None:
    """The declaration behind a route's handler (None for a route not declared here)."""
    return cast(RouteSpec | None, getattr(handler, "route_spec", None))


def add_routes(app: web.Application, tables: Iterable[RouteTable]) -> list[RouteSpec]:
    """Every method of one path goes on one resource (named after its first route), as
    aiohttp-cors needs: it answers a preflight for the methods of the resource it matches."""
    specs: list[RouteSpec] = []
    resources: dict[str, web.Resource] = {}
    for table in tables:
        for spec in table.specs:
            resource = resources.get(spec.path)
            if resource is None:
                resource = resources[spec.path] = app.router.add_resource(spec.path, name=spec.name)
            resource.add_route(spec.method, spec.handler)
            specs.append(spec)
    return specs
