"""WeChat mini-program login: `jscode2session` over one aiohttp ClientSession.

GET {WECHAT_API_BASE}/sns/jscode2session?appid&secret&js_code&grant_type=authorization_code
answers {openid, session_key, unionid?} or {errcode, errmsg}, sometimes as
text/plain. The session_key is dropped here: nothing in this server decrypts
WeChat payloads, so it is never stored nor returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
from loguru import logger

from server.config import Settings
from server.errors import AppError, ErrorCode

# errcode → (API code, message). Anything else is UPSTREAM_FAILED.
_ERRORS: dict[int, tuple[ErrorCode, str]] = {
    40029: (ErrorCode.INVALID_CREDENTIALS, "The WeChat login code is invalid"),
    40163: (ErrorCode.INVALID_CREDENTIALS, "The WeChat login code was already used"),
    45011: (ErrorCode.RATE_LIMITED, "WeChat is rate limiting logins; retry shortly"),
    -1: (ErrorCode.UPSTREAM_FAILED, "WeChat is busy; retry shortly"),
}
RATE_LIMIT_RETRY_S = 10


@dataclass(frozen=True, slots=True)
class WeChatIdentity:
    openid: str
    unionid: str | None


class WeChatClient:
    def __init__(self, settings: Settings) -> None:
        self.base = settings.wechat.api_base.rstrip("/")
        self.appid = settings.wechat.appid
        self.secret = settings.wechat.secret.get_secret_value() if settings.wechat.secret else None
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=settings.wechat.timeout))

    async def close(self) -> None:
        await self.session.close()

    async def code_to_session(self, code: str) -> WeChatIdentity:
        if not self.appid or not self.secret:
            raise AppError(ErrorCode.UPSTREAM_FAILED, "WeChat login is not configured on this server")
        params = {
            "appid": self.appid,
            "secret": self.secret,
            "js_code": code,
            "grant_type": "authorization_code",
        }
        try:
            async with self.session.get(f"{self.base}/sns/jscode2session", params=params) as resp:
                if resp.status != 200:
                    logger.warning("jscode2session answered HTTP {}", resp.status)
                    raise _upstream("WeChat answered an error")
                data: Any = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            logger.warning("jscode2session failed: {}: {}", type(exc).__name__, exc)
            raise _upstream("WeChat did not answer in time") from None
        if not isinstance(data, dict):
            raise _upstream("WeChat answered something unexpected")
        try:
            errcode = int(data.get("errcode") or 0)
        except (TypeError, ValueError):
            raise _upstream("WeChat answered something unexpected") from None
        if errcode:
            code_, message = _ERRORS.get(errcode, (ErrorCode.UPSTREAM_FAILED, "WeChat refused the login"))
            logger.warning("jscode2session errcode {}: {}", errcode, data.get("errmsg"))
            raise AppError(
                code_,
                message,
                details={"errcode": errcode},
                retry_after=RATE_LIMIT_RETRY_S if code_ is ErrorCode.RATE_LIMITED else None,
            )
        openid = data.get("openid")
        if not isinstance(openid, str) or not openid:
            raise _upstream("WeChat answered without an openid")
        unionid = data.get("unionid")
        return WeChatIdentity(
            openid=openid, unionid=unionid if isinstance(unionid, str) and unionid else None
        )


def _upstream(message: str) -> AppError:
    return AppError(ErrorCode.UPSTREAM_FAILED, message)
