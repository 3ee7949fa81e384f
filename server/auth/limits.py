"""Redis counters for SMS sending and failed logins.

Every check-and-count is one Lua script, so N concurrent attempts see the limit
exactly: with a limit of 5, five pass and the rest are refused, whatever the
interleaving. Windows are fixed from the first counted event (`EXPIRE` on the
first `INCR`); the refusal's Retry-After is what is left of that window.

Failed logins are counted *before* the password is checked (an attempt takes a
slot; a successful one gives it back), which is what makes the bound exact
under concurrency: 50 simultaneous guesses get 5 password checks, not 50.
"""

from __future__ import annotations

import math

from aiohttp import web
from redis.asyncio import Redis

from server.config import Settings
from server.errors import AppError, ErrorCode

# Prepended to the scripts that refuse: milliseconds until key k expires (1000 when it has
# no expiry), the Retry-After of a refusal.
_LEFT = """
local function left(k)
  local t = redis.call('PTTL', k)
  if t < 0 then return 1000 end
  return t
end
"""

# KEYS: gap, day, ip. ARGV: gap seconds, daily cap, day window, ip cap, ip window.
_SMS_SEND = """
if tonumber(ARGV[1]) > 0 and redis.call('EXISTS', KEYS[1]) == 1 then return {1, left(KEYS[1])} end
if tonumber(redis.call('GET', KEYS[2]) or '0') >= tonumber(ARGV[2]) then return {2, left(KEYS[2])} end
if tonumber(redis.call('GET', KEYS[3]) or '0') >= tonumber(ARGV[4]) then return {3, left(KEYS[3])} end
if tonumber(ARGV[1]) > 0 then redis.call('SET', KEYS[1], '1', 'EX', ARGV[1]) end
if redis.call('INCR', KEYS[2]) == 1 then redis.call('EXPIRE', KEYS[2], ARGV[3]) end
if redis.call('INCR', KEYS[3]) == 1 then redis.call('EXPIRE', KEYS[3], ARGV[5]) end
return {0, 0}
"""

# KEYS: phone, ip. ARGV: phone max, ip max, window.
_LOGIN_TAKE = """
if tonumber(redis.call('GET', KEYS[1]) or '0') >= tonumber(ARGV[1]) then return {1, left(KEYS[1])} end
if tonumber(redis.call('GET', KEYS[2]) or '0') >= tonumber(ARGV[2]) then return {2, left(KEYS[2])} end
for i = 1, 2 do
  if redis.call('INCR', KEYS[i]) == 1 then redis.call('EXPIRE', KEYS[i], ARGV[3]) end
end
return {0, 0}
"""

# Give a slot back (the attempt succeeded). Never below zero, never a key without TTL.
_LOGIN_GIVE_BACK = """
for i = 1, #KEYS do
  if tonumber(redis.call('GET', KEYS[i]) or '0') > 0 then redis.call('DECR', KEYS[i]) end
end
return 1
"""

DAY = 86400


def client_ip(request: web.Request, trusted_hops: int) -> str:
    """The caller's address: the socket peer, or X-Forwarded-For behind `trusted_hops` proxies."""
    if trusted_hops > 0:
        hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
        if len(hops) >= trusted_hops:
            return hops[-trusted_hops][:45]
    return (request.remote or "unknown")[:45]


def _seconds(ms: int) -> int:
    return max(1, math.ceil(int(ms) / 1000))


class Limits:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self._sms_send = redis.register_script(_LEFT + _SMS_SEND)
        self._login_take = redis.register_script(_LEFT + _LOGIN_TAKE)
        self._login_give_back = redis.register_script(_LOGIN_GIVE_BACK)

    async def take_sms_send(self, phone: str, ip: str) -> None:
        """Count one SMS to `phone` from `ip`, or answer RATE_LIMITED with Retry-After."""
        s = self.settings
        verdict, ms = await self._sms_send(
            keys=[f"auth:sms:gap:{phone}", f"auth:sms:day:{phone}", f"auth:sms:ip:{ip}"],
            args=[s.sms.resend_interval, s.sms.daily_cap, DAY, s.sms.ip_limit, s.sms.ip_window],
        )
        if verdict == 0:
            return
        message = {
            1: "A code was sent to this phone moments ago; wait before asking again",
            2: "This phone has had too many codes today",
            3: "Too many codes requested from this address",
        }[int(verdict)]
        raise AppError(ErrorCode.RATE_LIMITED, message, retry_after=_seconds(ms))

    async def give_back_sms_send(self, phone: str) -> None:
        """The provider failed: let the user ask again at once (the daily counts stay)."""
        await self.redis.delete(f"auth:sms:gap:{phone}")

    def _login_keys(self, account: str, ip: str) -> list[str]:
        return [f"auth:fail:acct:{account}", f"auth:fail:ip:{ip}"]

    async def take_login_attempt(self, account: str, ip: str) -> None:
        """Take a failed-login slot for `account` (a phone) and `ip`, or refuse.

        ACCOUNT_LOCKED (423) when the account has used its failures for the window;
        RATE_LIMITED (429) when the address has. Both carry Retry-After. Unknown
        phones are counted like known ones, so a lock reveals nothing."""
        s = self.settings
        verdict, ms = await self._login_take(
            keys=self._login_keys(account, ip),
            args=[s.auth.login_max_failures, s.auth.login_ip_max_failures, s.auth.login_failure_window],
        )
        if verdict == 1:
            raise AppError(
                ErrorCode.ACCOUNT_LOCKED,
                "Too many failed attempts; this account is locked for a while",
                retry_after=_seconds(ms),
            )
        if verdict == 2:
            raise AppError(
                ErrorCode.RATE_LIMITED, "Too many failed logins from this address", retry_after=_seconds(ms)
            )

    async def give_back_login_attempt(self, account: str, ip: str) -> None:
        await self._login_give_back(keys=self._login_keys(account, ip))

    async def clear_account(self, account: str) -> None:
        """A password reset proved the owner: lift the account's lock."""
        await self.redis.delete(self._login_keys(account, "")[0])
