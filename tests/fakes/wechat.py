"""An in-process fake of WeChat's `GET /sns/jscode2session`.

Like the real one it answers 200 with text/plain JSON, checks appid and secret
(40013 / 40125), answers 40029 for an unknown code and 40163 for a used one, and
omits `errcode` on success. Codes made with `issue()` map to an openid (and
optionally a unionid); `fail_next(errcode)` makes the next call fail that way,
and `hold()` makes calls wait until released (to exercise the client timeout).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class FakeWeChat:
    appid: str
    secret: str
    codes: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    calls: int = 0
    failures: list[int] = field(default_factory=list)
    release: asyncio.Event | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/sns/jscode2session", self.jscode2session)
        app.on_shutdown.append(self._release_all)
        return app

    def issue(self, openid: str | None = None, unionid: str | None = None) -> str:
        """A wx.login() code for this openid (a new one when not given)."""
        code = secrets.token_hex(16)
        self.codes[code] = (openid or "o" + secrets.token_hex(14), unionid)
        return code

    def fail_next(self, errcode: int) -> None:
        self.failures.append(errcode)

    def hold(self) -> None:
        self.release = asyncio.Event()

    async def _release_all(self, app: web.Application) -> None:
        if self.release is not None:
            self.release.set()

    async def jscode2session(self, request: web.Request) -> web.Response:
        self.calls += 1
        if self.release is not None:
            await self.release.wait()
        q = request.query
        if q.get("appid") != self.appid:
            return _answer({"errcode": 40013, "errmsg": "invalid appid"})
        if q.get("secret") != self.secret:
            return _answer({"errcode": 40125, "errmsg": "invalid appsecret"})
        if q.get("grant_type") != "authorization_code":
            return _answer({"errcode": 40002, "errmsg": "invalid grant_type"})
        if self.failures:
            errcode = self.failures.pop(0)
            return _answer({"errcode": errcode, "errmsg": "fake failure"})
        code = q.get("js_code", "")
        if code in self.used:
            return _answer({"errcode": 40163, "errmsg": "code been used"})
        if code not in self.codes:
            return _answer({"errcode": 40029, "errmsg": "invalid code"})
        self.used.add(code)
        openid, unionid = self.codes[code]
        body: dict[str, str] = {"openid": openid, "session_key": secrets.token_urlsafe(16)}
        if unionid:
            body["unionid"] = unionid
        return _answer(body)


def _answer(body: dict[str, object]) -> web.Response:
    return web.Response(text=json.dumps(body), content_type="text/plain")
