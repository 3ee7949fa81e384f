"""The auth capability's entry point: `open_auth` builds every part once MySQL and Redis
are up, as one `Auth` (the app keeps it under `auth_key`); handlers reach them as
`request.app[auth_key].service`. server/auth/__init__.py re-exports it with the HTTP side.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from redis.asyncio import Redis

from server.auth.accounts import ensure_admin
from server.auth.admin import UserAdmin
from server.auth.credentials import AccountService
from server.auth.limits import Limits
from server.auth.login import AuthService
from server.auth.nearcache import NearCache
from server.auth.passwords import Passwords
from server.auth.sessions import Sessions
from server.auth.sms import ConsoleSms, SmsCodes, SmsProvider, make_provider
from server.auth.tokens import TokenIssuer
from server.auth.users import Profiles
from server.auth.wechat import WeChatClient
from server.config import Settings
from server.db import Database


@dataclass(frozen=True, slots=True)
class Auth:
    tokens: TokenIssuer
    passwords: Passwords
    sessions: Sessions
    limits: Limits
    sms: SmsProvider
    codes: SmsCodes
    profiles: Profiles
    wechat: WeChatClient
    service: AuthService
    account: AccountService
    admin: UserAdmin

    async def last_console_sms(self, phone: str) -> dict[str, str] | None:
        """The last code the console SMS provider sent to `phone` (the dev helper route);
        None when none was sent or another provider is configured."""
        return await self.sms.last(phone) if isinstance(self.sms, ConsoleSms) else None


@contextlib.asynccontextmanager
async def open_auth(settings: Settings, db: Database, redis: Redis) -> AsyncIterator[Auth]:
    """The auth parts and their thread pools (closed on exit); the ADMIN_PHONE admin made."""
    tokens = TokenIssuer.from_settings(settings)
    passwords = Passwords(settings)
    sessions = Sessions(db, redis, settings.auth.refresh_token_ttl)
    limits = Limits(redis, settings)
    sms = make_provider(settings, redis)
    codes = SmsCodes(redis, sms, limits, settings)
    near = NearCache(redis, settings.auth.profile_local_cache_size, settings.auth.profile_local_cache_ttl)
    profiles = Profiles(db, redis, settings.auth.profile_cache_ttl, near)
    wechat = WeChatClient(settings)
    auth = Auth(
        tokens=tokens,
        passwords=passwords,
        sessions=sessions,
        limits=limits,
        sms=sms,
        codes=codes,
        profiles=profiles,
        wechat=wechat,
        service=AuthService(
            settings=settings,
            db=db,
            tokens=tokens,
            sessions=sessions,
            passwords=passwords,
            codes=codes,
            limits=limits,
            profiles=profiles,
            wechat=wechat,
        ),
        account=AccountService(
            db=db, sessions=sessions, passwords=passwords, codes=codes, limits=limits, profiles=profiles
        ),
        admin=UserAdmin(db, sessions, profiles),
    )
    if settings.admin_phone and settings.admin_password:
        admin_id, _ = await ensure_admin(
            db, passwords, settings.admin_phone, settings.admin_password.get_secret_value()
        )
        await profiles.invalidate(admin_id)  # a promoted user's cached role is stale
    await near.start()
    try:
        yield auth
    finally:
        await near.stop()
        await wechat.close()
        sms.close()
        passwords.close()
