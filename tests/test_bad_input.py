"""Bad input, swept over the whole API from its OpenAPI document: every operation gets
malformed path parameters, query parameters, bodies, bearer tokens and Idempotency-Keys,
and none may answer 500 or an error without the envelope (API.md: "Bad input always gets
the error envelope"); a route that needs a token answers a bad one 401.

The app runs as in the other black-box tests (real MariaDB and Redis, the payment
channels configured against fake gateways that check signatures), signed in as the
start-up admin, so admin routes validate too. A new operation is swept without a change
here. What the sweep found when it was written: order numbers no order can have (500:
MySQL refused to compare them with the ASCII column), an invite code decoding past
2**63 - 1 (500), a forged orders cursor (500), and a lone surrogate in a task's inputs
(500 at MySQL's client)."""

from __future__ import annotations

import urllib.parse
from typing import Any

from aiohttp.test_utils import TestClient

from server.paging import encode_cursor
from tests.auth_support import bearer, login
from tests.payments_support import (  # fixtures: pytest finds them by these module-level names
    ADMIN_PHONE,
    ali_keys,  # noqa: F401
    alipay_gateway,  # noqa: F401
    settings,  # noqa: F401
    wechat_server,  # noqa: F401
    wx_keys,  # noqa: F401
    wxpay_gateway,  # noqa: F401
)

PATH_VALUES = ["ü😀", "9" * 23, "x" * 300, "a'b", "-1", "0", "..%2F..", "%ff"]
QUERY_VALUES = [
    "ü😀",
    "-1",
    "9" * 30,
    "x" * 300,
    "1e400",
    encode_cursor("ü"),
    encode_cursor(2**70),
    encode_cursor(-1, "x"),
]
FIELD_VALUES: list[Any] = [None, "", -1, 2**64, 1e308, True, [], {}, "ü😀", "x" * 5000, {"a": [None]}]
RAW_BODIES = [b"{", b"[]", b"null", b'"x"', b'{"a": "\\ud800"}', b"\xff\xfe", b"[" * 5000]
NOT_A_TOKEN = [
    "",
    "Bearer",
    "Bearer ",
    "Basic YWJj",
    "Bearer a.b.c",
    "Bearer " + "x" * 5000,
    "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIiwicm9sZSI6ImFkbWluIn0.",  # alg "none", role admin
]
IDEMPOTENCY_KEYS = ["", " ", "ü" * 10, "x" * 129, "x" * 5000]
# Answers in the provider's format, not the envelope (API.md: notifications).
PROVIDER_FORMAT = ("/api/v1/payments/",)
SKIPPED = {"/api/v1/ws", "/api/v1/auth/logout-all"}  # a socket; revoking the sweep's own token


def _baseline(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    """A body with each required property set to a plain value of its type."""
    if "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[1]]
    plain = {"string": "abc", "integer": 1, "number": 1, "boolean": True, "object": {}, "array": []}
    body: dict[str, Any] = {}
    for name in schema.get("required", []):
        prop = schema["properties"][name]
        kinds = [prop.get("type")] + [k.get("type") for k in prop.get("anyOf", [])]
        body[name] = next((plain[k] for k in kinds if k in plain), "abc")
    return body


def _requests(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, URL, keywords of client.request) for every malformed request of the sweep."""
    made: list[tuple[str, str, dict[str, Any]]] = []
    components = doc["components"]["schemas"]
    for path, ops in doc["paths"].items():
        if path in SKIPPED:
            continue
        for method, op in ops.items():
            params = op.get("parameters", [])

            def url(value: str, path: str = path, params: list[dict[str, Any]] = params) -> str:
                for p in params:
                    if p["in"] == "path":
                        path = path.replace("{" + p["name"] + "}", value)
                return path

            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            baseline = _baseline(body["schema"], components) if body is not None else None
            valid = {} if baseline is None else {"json": baseline}  # so the handler is reached
            plain = url("424242")  # no such thing: a body that validates reaches a 404
            for v in PATH_VALUES:
                if plain != url(v):
                    made.append((method, url(urllib.parse.quote(v, safe="%")), dict(valid)))
            for p in params:
                if p["in"] == "query":
                    made += [(method, plain, {"params": {p["name"]: v}}) for v in QUERY_VALUES]
            if op.get("security"):
                made += [(method, plain, {**valid, "headers": {"Authorization": t}}) for t in NOT_A_TOKEN]
            if method == "post":
                made += [
                    (method, plain, {**valid, "headers": {"Idempotency-Key": k}}) for k in IDEMPOTENCY_KEYS
                ]
            if baseline is None:
                continue
            json_type = {"Content-Type": "application/json"}
            made += [(method, plain, {"data": raw, "headers": json_type}) for raw in RAW_BODIES]
            for name in baseline:
                made += [(method, plain, {"json": {**baseline, name: v}}) for v in FIELD_VALUES]
    return made


async def test_no_malformed_request_to_any_operation_answers_500_or_without_the_envelope(
    client: TestClient[Any, Any],
) -> None:
    doc = await (await client.get("/api/openapi.json")).json()
    admin = bearer((await login(client, ADMIN_PHONE))["access_token"])
    sweep = _requests(doc)
    assert len(sweep) > 1300 and {m for m, _, _ in sweep} >= {"get", "post", "patch", "put", "delete"}
    wrong: list[str] = []
    for n, (method, url, kwargs) in enumerate(sweep):
        sent = kwargs.pop("headers", {})
        headers = {**admin, "Idempotency-Key": f"sweep-{n}", **sent}
        async with client.request(method.upper(), url, headers=headers, **kwargs) as resp:
            text = await resp.text()
            enveloped = resp.status < 400 or url.startswith(PROVIDER_FORMAT) or '"error":{"code":' in text
            refused = "Authorization" not in sent or resp.status == 401  # a bad token is 401, nothing else
            if resp.status == 500 or not enveloped or not refused:
                wrong.append(
                    f"{resp.status} {method.upper()} {url[:80]} {sent!s:.60} {kwargs!s:.80}: {text[:120]}"
                )
    assert not wrong, f"{len(wrong)} of {len(sweep)}:\n" + "\n".join(wrong[:20])
