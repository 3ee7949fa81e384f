"""SMS verification codes and the providers that deliver them.

A code is 6 digits, lives SMS_CODE_TTL seconds (300), is single use, and dies
after SMS_CODE_MAX_TRIES wrong tries (5). It is kept in Redis as
`auth:sms:code:{purpose}:{phone}` = {code, tries}. Each check takes a try
*before* comparing (one Lua script), so concurrent guesses cannot get more than
the allowed number of comparisons; the comparison itself is hmac.compare_digest.

Providers: `console` (dev/test: logs the code and keeps the last one for
GET /api/v1/dev/sms/{phone}; APP_ENV=prod refuses to start with it), `tencent`
(tencentcloud-sdk-python-sms, whose blocking client runs on a small thread pool) and
`disabled` (no SMS at all: asking for a code is 404 NOT_FOUND, so accounts come from
WeChat login only).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from loguru import logger
from redis.asyncio import Redis

from server.auth.accounts import mask_phone
from server.auth.limits import Limits
from server.config import Settings
from server.errors import AppError, ErrorCode

Purpose = Literal["login", "register", "reset_password"]

# KEYS[1]: the code. ARGV[1]: max tries. Returns {code, tries} or nil (no live code).
_TAKE_TRY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local n = redis.call('HINCRBY', KEYS[1], 'tries', 1)
if n > tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
  return false
end
return {redis.call('HGET', KEYS[1], 'code'), n}
"""

# KEYS[1]: the code. ARGV[1]: the code that was compared. Deletes it if it is still that one.
_CONSUME = """
if redis.call('HGET', KEYS[1], 'code') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


class SmsProvider(Protocol):
    name: str

    async def send(self, phone: str, code: str, purpose: Purpose, ttl: int) -> None:
        """Deliver `code`; raise AppError(UPSTREAM_FAILED) when the gateway refuses."""

    def close(self) -> None: ...


def _dev_key(phone: str) -> str:
    return f"auth:dev:sms:{phone}"


class ConsoleSms:
    """Writes the code to the log and keeps the last one per phone for the dev endpoint."""

    name = "console"

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def send(self, phone: str, code: str, purpose: Purpose, ttl: int) -> None:
        logger.info("SMS (console) to {}: code {} for {}", mask_phone(phone), code, purpose)
        await self.redis.set(_dev_key(phone), json.dumps({"code": code, "purpose": purpose}), ex=ttl)

    async def last(self, phone: str) -> dict[str, str] | None:
        raw = await self.redis.get(_dev_key(phone))
        return None if raw is None else dict(json.loads(raw))

    def close(self) -> None:
        pass


class DisabledSms:
    """SMS_PROVIDER=disabled: this server sends no codes."""

    name = "disabled"

    async def send(self, phone: str, code: str, purpose: Purpose, ttl: int) -> None:
        raise sms_disabled()

    def close(self) -> None:
        pass


def sms_disabled() -> AppError:
    return AppError(ErrorCode.NOT_FOUND, "This server does not send SMS codes; log in with WeChat")


class TencentSms:
    """Tencent Cloud SMS (API 2021-01-11 SendSms), template parameters [code, minutes]."""

    name = "tencent"

    def __init__(self, settings: Settings) -> None:
        from tencentcloud.common import credential
        from tencentcloud.common.profile.client_profile import ClientProfile
        from tencentcloud.common.profile.http_profile import HttpProfile
        from tencentcloud.sms.v20210111 import sms_client

        if not (settings.tencent_secret_id and settings.tencent_secret_key):
            raise AppError(ErrorCode.UPSTREAM_FAILED, "Tencent SMS is not configured")
        endpoint = urlsplit(settings.sms.tencent_endpoint)
        http = HttpProfile(
            protocol=endpoint.scheme or "https",
            endpoint=endpoint.netloc or endpoint.path,
            reqTimeout=settings.sms.tencent_timeout,
        )
        cred = credential.Credential(
            settings.tencent_secret_id, settings.tencent_secret_key.get_secret_value()
        )
        self.client = sms_client.SmsClient(cred, settings.sms.tencent_region, ClientProfile(httpProfile=http))
        self.settings = settings
        self.executor = ThreadPoolExecutor(4, thread_name_prefix="tencent-sms")

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def send(self, phone: str, code: str, purpose: Purpose, ttl: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            status = await loop.run_in_executor(self.executor, self._send_blocking, phone, code, ttl)
        except Exception as exc:  # SDK and network errors alike: the gateway failed us
            logger.warning("Tencent SMS to {} failed: {}", mask_phone(phone), exc)
            raise AppError(ErrorCode.UPSTREAM_FAILED, "The SMS gateway failed; try again") from None
        if status.get("Code") != "Ok":
            logger.warning("Tencent SMS to {} refused: {}", mask_phone(phone), status)
            raise AppError(
                ErrorCode.UPSTREAM_FAILED,
                "The SMS gateway refused the message",
                details={"code": status.get("Code")},
            )

    def _send_blocking(self, phone: str, code: str, ttl: int) -> dict[str, Any]:
        from tencentcloud.sms.v20210111 import models

        s = self.settings
        req = models.SendSmsRequest()
        req.PhoneNumberSet = [f"+86{phone}"]
        req.SmsSdkAppId = s.sms.tencent_app_id
        req.SignName = s.sms.tencent_sign_name
        req.TemplateId = s.sms.tencent_template_id
        req.TemplateParamSet = [code, str(max(1, ttl // 60))]
        resp = self.client.SendSms(req)
        statuses = resp.SendStatusSet or []
        if not statuses:
            return {"Code": "NoStatus"}
        first = statuses[0]
        return {"Code": first.Code, "Message": first.Message}


def make_provider(settings: Settings, redis: Redis) -> SmsProvider:
    if settings.sms.provider == "tencent":
        return TencentSms(settings)
    if settings.sms.provider == "disabled":
        return DisabledSms()
    if settings.is_prod:
        logger.warning("SMS_PROVIDER=console in prod: codes go to the log, not to phones")
    return ConsoleSms(redis)


def _code_key(phone: str, purpose: str) -> str:
    return f"auth:sms:code:{purpose}:{phone}"


class SmsCodes:
    def __init__(self, redis: Redis, provider: SmsProvider, limits: Limits, settings: Settings) -> None:
        self.redis = redis
        self.provider = provider
        self.limits = limits
        self.ttl = settings.sms.code_ttl
        self.max_tries = settings.sms.code_max_tries
        self.resend_interval = settings.sms.resend_interval
        self._take_try = redis.register_script(_TAKE_TRY)
        self._consume = redis.register_script(_CONSUME)

    async def request(self, phone: str, purpose: Purpose, ip: str) -> int:
        """Send a code if the limits allow; returns the seconds before the next may be asked."""
        if isinstance(self.provider, DisabledSms):
            raise sms_disabled()
        await self.limits.take_sms_send(phone, ip)
        try:
            await self.issue(phone, purpose)
        except Exception:
            await self.limits.give_back_sms_send(phone)
            raise
        return self.resend_interval

    async def issue(self, phone: str, purpose: Purpose) -> str:
        """Make, keep and send a new code (no limits: `request` applies them)."""
        code = f"{secrets.randbelow(10**6):06d}"
        key = _code_key(phone, purpose)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping={"code": code, "tries": 0})
            pipe.expire(key, self.ttl)
            await pipe.execute()
        try:
            await self.provider.send(phone, code, purpose, self.ttl)
        except Exception:
            await self.redis.delete(key)
            raise
        return code

    async def verify(self, phone: str, purpose: Purpose, code: str) -> None:
        """Use up the code, or raise INVALID_CREDENTIALS (wrong, expired, used or dead)."""
        key = _code_key(phone, purpose)
        taken = await self._take_try(keys=[key], args=[self.max_tries])
        if taken is None:
            raise _wrong_code()
        stored, tries = taken[0], int(taken[1])
        if hmac.compare_digest(stored, code.encode()):
            if await self._consume(keys=[key], args=[stored]):
                return
            raise _wrong_code()
        if tries >= self.max_tries:
            await self._consume(keys=[key], args=[stored])
        raise _wrong_code()


def _wrong_code() -> AppError:
    return AppError(ErrorCode.INVALID_CREDENTIALS, "The SMS code is wrong or has expired")
