"""OpenAPI 3.1, generated from the route declarations and their pydantic models."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from pydantic import BaseModel, TypeAdapter

from server.errors import ErrorCode
from server.routing import RouteSpec

REF = "#/components/schemas/{model}"

# Errors every route of a kind can answer, beyond those it declares itself.
_ALWAYS = (ErrorCode.INTERNAL,)
_API = (ErrorCode.BUSY, ErrorCode.UNAVAILABLE)
_WITH_BODY = (
    ErrorCode.MALFORMED_REQUEST,
    ErrorCode.VALIDATION_FAILED,
    ErrorCode.PAYLOAD_TOO_LARGE,
    ErrorCode.REQUEST_TIMEOUT,
)
_WITH_QUERY = (ErrorCode.VALIDATION_FAILED,)
_AUTHED = (ErrorCode.UNAUTHENTICATED, ErrorCode.TOKEN_EXPIRED, ErrorCode.TOKEN_REVOKED, ErrorCode.FORBIDDEN)


class ErrorBody(BaseModel):
    code: ErrorCode
    message: str
    request_id: str
    details: dict[str, Any]


class ErrorEnvelope(BaseModel):
    error: ErrorBody


class _Schemas:
    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def ref(self, tp: Any) -> dict[str, Any]:
        schema = TypeAdapter(tp).json_schema(ref_template=REF, mode="serialization")
        return self._hoist(tp, schema)

    def input_ref(self, tp: type[BaseModel]) -> dict[str, Any]:
        schema = tp.model_json_schema(ref_template=REF, mode="validation")
        return self._hoist(tp, schema)

    def _hoist(self, tp: Any, schema: dict[str, Any]) -> dict[str, Any]:
        for name, sub in schema.pop("$defs", {}).items():
            self.components[name] = sub
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            self.components[tp.__name__] = schema
            return {"$ref": REF.format(model=tp.__name__)}
        return schema


def _errors_for(spec: RouteSpec) -> list[ErrorCode]:
    codes = list(spec.errors) + list(_ALWAYS)
    if spec.path.startswith("/api/v1"):
        codes += _API
    if spec.body is not None:
        codes += _WITH_BODY
    if spec.query is not None:
        codes += _WITH_QUERY
    if spec.auth != "public":
        codes += _AUTHED if spec.auth == "admin" else _AUTHED[:3]
    return list(dict.fromkeys(codes))


def _query_parameters(model: type[BaseModel], schemas: _Schemas) -> list[dict[str, Any]]:
    params = []
    full = model.model_json_schema(ref_template=REF)
    for name, sub in full.get("$defs", {}).items():
        schemas.components[name] = sub
    required = set(full.get("required", []))
    for name, prop in full.get("properties", {}).items():
        params.append(
            {
                "name": name,
                "in": "query",
                "required": name in required,
                "schema": prop,
                **({"description": prop["description"]} if "description" in prop else {}),
            }
        )
    return params


def _operation(spec: RouteSpec, schemas: _Schemas) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": spec.name,
        "summary": spec.summary,
        "tags": list(spec.tags),
        "security": [] if spec.auth == "public" else [{"bearerAuth": []}],
        "x-auth": spec.auth,
    }
    if spec.description:
        op["description"] = spec.description
    params: list[dict[str, Any]] = [
        {"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in spec.path_params
    ]
    if spec.query is not None:
        params += _query_parameters(spec.query, schemas)
    if params:
        op["parameters"] = params
    if spec.body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schemas.input_ref(spec.body)}},
        }
    responses: dict[str, Any] = {}
    if spec.status == 204 or (spec.response is None and spec.content_type == "application/json"):
        responses[str(spec.status)] = {"description": "Done, no content" if spec.status == 204 else "OK"}
    elif spec.content_type == "application/json":
        responses[str(spec.status)] = {
            "description": "OK",
            "content": {"application/json": {"schema": schemas.ref(spec.response)}},
        }
    else:
        responses[str(spec.status)] = {
            "description": "OK",
            "content": {spec.content_type: {"schema": {"type": "string"}}},
        }
    for status, text in spec.extra_responses.items():
        responses[str(status)] = {"description": text}
    by_status: dict[int, list[ErrorCode]] = defaultdict(list)
    for code in _errors_for(spec):
        by_status[code.status].append(code)
    for status, codes in sorted(by_status.items()):
        responses[str(status)] = {
            "description": " | ".join(c.value for c in codes),
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}},
        }
    op["responses"] = responses
    return op


def build_spec(specs: list[RouteSpec], *, version: str, server_url: str | None = None) -> dict[str, Any]:
    schemas = _Schemas()
    schemas.ref(ErrorEnvelope)
    paths: dict[str, dict[str, Any]] = defaultdict(dict)
    for spec in specs:
        if spec.include_in_schema:
            paths[spec.openapi_path][spec.method.lower()] = _operation(spec, schemas)
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Wardrobe Server API",
            "version": version,
            "description": "The contract with the mini-program, the web front end and operators. "
            "Every non-2xx answer carries the error envelope; every answer carries X-Request-ID.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(schemas.components.items())),
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }
    if server_url:
        doc["servers"] = [{"url": server_url}]
    return doc
