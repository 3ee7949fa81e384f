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

import json
import uuid
from dataclasses import dataclass, field

from aiohttp import web

from tests.fakes.tc3 import answer, check_tc3


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
        return answer({"Error": {"Code": code, "Message": message}, "RequestId": uuid.uuid4().hex})

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
        return answer({"SendStatusSet": statuses, "RequestId": uuid.uuid4().hex})

    def check_signature(self, request: web.Request, body: bytes) -> tuple[str, str] | None:
        return check_tc3(request, body, self.secret_id, self.secret_key, "sms")
