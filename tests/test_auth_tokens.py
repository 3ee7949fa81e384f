"""Access tokens and the auth middleware: what is refused, and what the role check costs."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import warnings
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from aiohttp import web

from server.app import create_app
from server.auth.tokens import TokenIssuer, parse_jwt_keys
from server.config import Settings
from server.keys import auth_key
from tests.auth_support import (
    PASSWORD,
    SqlCounter,
    auth_settings,
    bearer,
    error_code,
    login,
    new_phone,
    register,
)

OLD_KEY = "old:" + "o" * 40
NEW_KEY = "new:" + "n" * 40
ADMIN_PHONE = "13900000001"


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return auth_settings(make_settings, admin_phone=ADMIN_PHONE, admin_password=PASSWORD)


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def claims(user_id: str = "1", **over: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"sub": user_id, "role": "user", "sid": "s" * 32, "typ": "access", "iat": now, "exp": now + 900}
    base["jti"] = "j1"
    base.update(over)
    return base


async def me(client: Any, token: str) -> Any:
    return await client.get("/api/v1/me", headers=bearer(token))


async def test_an_access_token_carries_the_documented_claims_and_a_kid(
    client: Any, app: web.Application
) -> None:
    account = await register(client)
    token = account["access_token"]
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256" and header["kid"] == app[auth_key].tokens.keys[0].kid
    body = jwt.decode(token, options={"verify_signature": False})
    assert set(body) == {"sub", "role", "sid", "typ", "iat", "exp", "jti"}
    assert body["sub"] == account["user"]["id"] and body["typ"] == "access" and body["role"] == "user"
    assert body["exp"] - body["iat"] == 900
    assert body["sid"] == account["refresh_token"].split(".")[0]


async def test_a_token_with_alg_none_answers_401(client: Any, app: web.Application) -> None:
    account = await register(client)
    kid = app[auth_key].tokens.keys[0].kid
    forged = f"{b64({'alg': 'none', 'typ': 'JWT', 'kid': kid})}.{b64(claims(account['user']['id']))}."
    resp = await me(client, forged)
    assert resp.status == 401
    assert await error_code(resp) == "UNAUTHENTICATED"


async def test_a_token_signed_with_another_algorithm_answers_401(client: Any, app: web.Application) -> None:
    account = await register(client)
    key = app[auth_key].tokens.keys[0]
    with warnings.catch_warnings():  # the dev secret is short for HS512, which is the point
        warnings.simplefilter("ignore")
        forged = jwt.encode(
            claims(account["user"]["id"]), key.secret, algorithm="HS512", headers={"kid": key.kid}
        )
    assert (await me(client, forged)).status == 401


async def test_a_token_signed_with_a_wrong_key_answers_401(client: Any, app: web.Application) -> None:
    account = await register(client)
    kid = app[auth_key].tokens.keys[0].kid
    forged = jwt.encode(claims(account["user"]["id"]), "x" * 40, algorithm="HS256", headers={"kid": kid})
    assert (await me(client, forged)).status == 401
    unknown_kid = jwt.encode(
        claims(account["user"]["id"]), "x" * 40, algorithm="HS256", headers={"kid": "zz"}
    )
    assert (await me(client, unknown_kid)).status == 401


async def test_an_expired_access_token_answers_token_expired(client: Any, app: web.Application) -> None:
    account = await register(client)
    old = app[auth_key].tokens.issue_access(
        int(account["user"]["id"]), "user", "s" * 32, now=time.time() - 901
    )
    resp = await me(client, old)
    assert resp.status == 401
    assert await error_code(resp) == "TOKEN_EXPIRED"


async def test_a_refresh_token_used_as_an_access_token_answers_401(client: Any) -> None:
    account = await register(client)
    resp = await me(client, account["refresh_token"])
    assert resp.status == 401
    assert await error_code(resp) == "UNAUTHENTICATED"


async def test_a_signed_token_of_another_typ_answers_401(client: Any, app: web.Application) -> None:
    account = await register(client)
    key = app[auth_key].tokens.keys[0]
    other = jwt.encode(claims(account["user"]["id"], typ="refresh"), key.secret, headers={"kid": key.kid})
    assert (await me(client, other)).status == 401


@pytest.mark.parametrize("header", [None, "Basic dXNlcjpwYXNz", "Bearer", "Bearer not.a.jwt"])
async def test_a_missing_or_malformed_authorization_header_answers_401(
    client: Any, header: str | None
) -> None:
    headers = {} if header is None else {"Authorization": header}
    resp = await client.get("/api/v1/me", headers=headers)
    assert resp.status == 401
    assert await error_code(resp) == "UNAUTHENTICATED"


async def test_a_user_token_on_an_admin_route_answers_403_without_any_sql(
    client: Any, app: web.Application
) -> None:
    account = await register(client)
    counter = SqlCounter(app)
    resp = await client.get("/api/v1/admin/users", headers=bearer(account["access_token"]))
    assert resp.status == 403
    assert await error_code(resp) == "FORBIDDEN"
    assert counter.count == 0
    ban = await client.post(
        f"/api/v1/admin/users/{account['user']['id']}/ban", json={}, headers=bearer(account["access_token"])
    )
    assert ban.status == 403
    assert counter.count == 0


async def test_an_admin_token_reaches_admin_routes(client: Any) -> None:
    admin = await login(client, ADMIN_PHONE)
    assert admin["user"]["role"] == "admin"
    resp = await client.get("/api/v1/admin/users", headers=bearer(admin["access_token"]))
    assert resp.status == 200


async def test_a_no_token_on_an_admin_route_answers_401(client: Any) -> None:
    assert (await client.get("/api/v1/admin/users")).status == 401


async def test_with_rotated_keys_the_newest_signs_and_the_older_still_verifies(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    before = auth_settings(make_settings, jwt_keys=OLD_KEY)
    after = auth_settings(make_settings, jwt_keys=f"{NEW_KEY},{OLD_KEY}")
    old_client = await aiohttp_client(create_app(before))
    account = await register(old_client)
    assert jwt.get_unverified_header(account["access_token"])["kid"] == "old"
    new_client = await aiohttp_client(create_app(after))
    assert (await me(new_client, account["access_token"])).status == 200
    fresh = await login(new_client, account["phone"])
    assert jwt.get_unverified_header(fresh["access_token"])["kid"] == "new"
    assert (await me(old_client, fresh["access_token"])).status == 401  # the old key set lacks "new"


def test_jwt_keys_are_parsed_newest_first_and_bad_lists_are_refused(
    make_settings: Callable[..., Settings],
) -> None:
    keys = parse_jwt_keys(make_settings(jwt_keys=f"{NEW_KEY}, {OLD_KEY}"))
    assert [k.kid for k in keys] == ["new", "old"]
    for bad in ("nokid", "a:x,a:y", ":secret"):
        with pytest.raises(ValueError):
            parse_jwt_keys(make_settings(jwt_keys=bad))
    single = TokenIssuer.from_settings(make_settings())
    assert single.keys[0].kid == "default"


SECRET = "a-jwt-secret-of-at-least-32-characters-0123"


async def test_the_kid_of_a_jwt_secret_token_reveals_nothing_about_the_secret_and_verifies(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    client = await aiohttp_client(create_app(auth_settings(make_settings, jwt_secret=SECRET)))
    account = await register(client)
    kid = str(jwt.get_unverified_header(account["access_token"])["kid"])
    for name in ("sha256", "sha1", "md5", "sha512", "blake2b"):
        digest = hashlib.new(name, SECRET.encode()).hexdigest()
        assert not digest.startswith(kid.lower()), f"the kid is a prefix of the secret's {name}"
    assert kid not in SECRET
    assert (await me(client, account["access_token"])).status == 200
    # The same kid under another secret: the kid says nothing, the signature decides.
    other = await aiohttp_client(create_app(auth_settings(make_settings, jwt_secret=SECRET[::-1])))
    assert jwt.get_unverified_header((await register(other))["access_token"])["kid"] == kid
    assert (await me(other, account["access_token"])).status == 401


async def test_a_token_under_the_kid_earlier_releases_derived_from_jwt_secret_still_verifies(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    client = await aiohttp_client(create_app(auth_settings(make_settings, jwt_secret=SECRET)))
    account = await register(client)
    body = jwt.decode(account["access_token"], options={"verify_signature": False})
    legacy_kid = hashlib.sha256(SECRET.encode()).hexdigest()[:8]
    before_upgrade = jwt.encode(body, SECRET, algorithm="HS256", headers={"kid": legacy_kid})
    assert (await me(client, before_upgrade)).status == 200
    forged = jwt.encode(body, SECRET[::-1], algorithm="HS256", headers={"kid": legacy_kid})
    assert (await me(client, forged)).status == 401


def test_prod_refuses_short_jwt_keys_and_an_unconfigured_tencent_provider() -> None:
    from server.config import ConfigError

    base = {"app_env": "prod", "database_url": "mysql://u:p@db:3306/w", "redis_url": "redis://r:6379/0"}
    short = Settings(_env_file=None, jwt_keys="k1:short", **base)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="JWT_KEYS"):
        short.check_for_start()
    tencent = Settings(_env_file=None, jwt_keys=NEW_KEY, sms_provider="tencent", **base)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="TENCENT_SECRET_ID"):
        tencent.check_for_start()
    console = Settings(_env_file=None, jwt_keys=NEW_KEY, **base)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="SMS_PROVIDER=console"):
        console.check_for_start()
    Settings(_env_file=None, jwt_keys=NEW_KEY, sms_provider="disabled", **base).check_for_start()  # type: ignore[call-arg]


async def test_role_checks_read_the_token_so_a_promotion_shows_after_refresh(client: Any) -> None:
    admin = await login(client, ADMIN_PHONE)
    user = await register(client, new_phone())
    promoted = await client.post(
        f"/api/v1/admin/users/{user['user']['id']}/role",
        json={"role": "admin"},
        headers=bearer(admin["access_token"]),
    )
    assert promoted.status == 200
    assert (await client.get("/api/v1/admin/users", headers=bearer(user["access_token"]))).status == 403
    pair = await (
        await client.post("/api/v1/auth/refresh", json={"refresh_token": user["refresh_token"]})
    ).json()
    assert (await client.get("/api/v1/admin/users", headers=bearer(pair["access_token"]))).status == 200
