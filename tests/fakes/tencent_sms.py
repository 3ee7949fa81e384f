"""An in-process fake of Tencent Cloud SMS (`SendSms`, API version 2021-01-11).

It checks the TC3-HMAC-SHA256 signature the way the real API does:

    CanonicalRequest = POST, /, "", "content-type:<ct>\\nhost:<host>\\n", content-type;host,
                       SHA256hex(body), joined by \\n
    StringToSign     = TC3-HMAC-SHA256, <X-TC-Timestamp>, <date>/sms/tc3_request,
                       SHA256hex(CanonicalRequest), joined by \\n
    SecretDate = HMAC("TC3" + SecretKey, date); SecretService = HMAC(SecretDate, "sms")
    SecretSigning = HMAC(SecretService, "tc3_request"); Signature = HMAChex(SecretSigning, StringToSign)

with `date` the UTC day of the timestamp, which must be within 5 minutes of now.
Failures answer HTTP 200 with {"Response": {"Error": {Code, Message}, "RequestId"}},
as the real API does.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import web

_AUTH = re.compile(
    r"^TC3-HMAC-SHA256 "
    r"Credential=(?P<sid>[^/]+)/(?P<date>\d{4}-\d{2}-\d{2})/(?P<service>[a-z]+)/tc3_request, "
    r"SignedHeaders=(?P<headers>[a-z0-9;-]+), Signature=(?P<sig>[0-9a-f]{64})$"
)


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


@dataclass
class SentSms:
    phone: str
    template_id: str
    params: list[str]
    sign_name: str
    app_id: str


@dataclass
class FakeTencentSms:
    secret_id: str
    secret_key: str
    sent: list[SentSms] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # error codes answered
    fail_with: str | None = None  # a SendStatus code ("LimitExceeded.PhoneNumberDailyLimit"…)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/", self.handle)
        return app

    def error(self, code: str, message: str) -> web.Response:
        self.rejected.append(code)
        return _answer({"Error": {"Code": code, "Message": message}, "RequestId": uuid.uuid4().hex})

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        problem = self.check_signature(request, body)
        if problem is not None:
            return self.error(*problem)
        if (
            request.headers.get("X-TC-Action") != "SendSms"
            or request.headers.get("X-TC-Version") != "2021-01-11"
        ):
            return self.error("InvalidAction", "unknown action or version")
        params = json.loads(body)
        phones = params.get("PhoneNumberSet") or []
        for key in ("SmsSdkAppId", "SignName", "TemplateId"):
            if not params.get(key):
                return self.error("MissingParameter", f"{key} is required")
        statuses = []
        for phone in phones:
            code, message = "Ok", "send success"
            if self.fail_with:
                code, message = self.fail_with, "fake refusal"
            else:
                self.sent.append(
                    SentSms(
                        phone=phone,
                        template_id=params["TemplateId"],
                        params=list(params.get("TemplateParamSet") or []),
                        sign_name=params["SignName"],
                        app_id=params["SmsSdkAppId"],
                    )
                )
            statuses.append(
                {
                    "SerialNo": uuid.uuid4().hex,
                    "PhoneNumber": phone,
                    "Fee": 1,
                    "SessionContext": "",
                    "Code": code,
                    "Message": message,
                    "IsoCode": "CN",
                }
            )
        return _answer({"SendStatusSet": statuses, "RequestId": uuid.uuid4().hex})

    def check_signature(self, request: web.Request, body: bytes) -> tuple[str, str] | None:
        m = _AUTH.match(request.headers.get("Authorization", ""))
        if m is None:
            return "AuthFailure.SignatureFailure", "malformed Authorization header"
        if m["sid"] != self.secret_id:
            return "AuthFailure.SecretIdNotFound", "unknown SecretId"
        try:
            timestamp = int(request.headers.get("X-TC-Timestamp", ""))
        except ValueError:
            return "AuthFailure.InvalidAuthorization", "X-TC-Timestamp is missing"
        if abs(time.time() - timestamp) > 300:
            return "AuthFailure.SignatureExpire", "the signature has expired"
        date = datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")
        if m["date"] != date or m["service"] != "sms":
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
        scope = f"{date}/sms/tc3_request"
        to_sign = f"TC3-HMAC-SHA256\n{timestamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        key = _hmac(_hmac(_hmac(("TC3" + self.secret_key).encode(), date), "sms"), "tc3_request")
        expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, m["sig"]):
            return "AuthFailure.SignatureFailure", "the signature does not match"
        return None


def _answer(response: dict[str, object]) -> web.Response:
    resp = web.Response(body=json.dumps({"Response": response}).encode())
    resp.headers["Content-Type"] = "application/json"
    return resp
