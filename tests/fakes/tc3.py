"""The TC3-HMAC-SHA256 check the Tencent Cloud fakes (SMS, KMS) share, as the real APIs do:

    CanonicalRequest = method, path, query, the signed headers, their names,
                       SHA256hex(body), joined by \\n
    StringToSign     = TC3-HMAC-SHA256, <X-TC-Timestamp>, <date>/<service>/tc3_request,
                       SHA256hex(CanonicalRequest), joined by \\n
    SecretDate = HMAC("TC3" + SecretKey, date); SecretService = HMAC(SecretDate, service)
    SecretSigning = HMAC(SecretService, "tc3_request"); Signature = HMAChex(SecretSigning, StringToSign)

with `date` the UTC day of the timestamp, which must be within 5 minutes of now. Errors
answer HTTP 200 with {"Response": {"Error": {Code, Message}, "RequestId"}} (`answer`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from datetime import UTC, datetime

from aiohttp import web

_AUTH = re.compile(
    r"^TC3-HMAC-SHA256 "
    r"Credential=(?P<sid>[^/]+)/(?P<date>\d{4}-\d{2}-\d{2})/(?P<service>[a-z]+)/tc3_request, "
    r"SignedHeaders=(?P<headers>[a-z0-9;-]+), Signature=(?P<sig>[0-9a-f]{64})$"
)


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def check_tc3(
    request: web.Request, body: bytes, secret_id: str, secret_key: str, service: str
) -> tuple[str, str] | None:
    """None when the request carries a valid TC3-HMAC-SHA256 signature by `secret_id` for
    `service`, else the (code, message) Tencent Cloud answers."""
    m = _AUTH.match(request.headers.get("Authorization", ""))
    if m is None:
        return "AuthFailure.SignatureFailure", "malformed Authorization header"
    if m["sid"] != secret_id:
        return "AuthFailure.SecretIdNotFound", "unknown SecretId"
    try:
        timestamp = int(request.headers.get("X-TC-Timestamp", ""))
    except ValueError:
        return "AuthFailure.InvalidAuthorization", "X-TC-Timestamp is missing"
    if abs(time.time() - timestamp) > 300:
        return "AuthFailure.SignatureExpire", "the signature has expired"
    date = datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")
    if m["date"] != date or m["service"] != service:
        return "AuthFailure.SignatureFailure", "credential scope mismatch"
    names = m["headers"].split(";")
    if "host" not in names or "content-type" not in names:
        return "AuthFailure.SignatureFailure", "host and content-type must be signed"
    canonical_headers = "".join(f"{n}:{request.headers.get(n, '').strip().lower()}\n" for n in names)
    canonical = "\n".join(
        [
            request.method,
            request.path,
            request.query_string,
            canonical_headers,
            m["headers"],
            hashlib.sha256(body).hexdigest(),
        ]
    )
    scope = f"{date}/{service}/tc3_request"
    to_sign = f"TC3-HMAC-SHA256\n{timestamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    key = _hmac(_hmac(_hmac(("TC3" + secret_key).encode(), date), service), "tc3_request")
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, m["sig"]):
        return "AuthFailure.SignatureFailure", "the signature does not match"
    return None


def answer(response: dict[str, object]) -> web.Response:
    resp = web.Response(body=json.dumps({"Response": response}).encode())
    resp.headers["Content-Type"] = "application/json"
    return resp
