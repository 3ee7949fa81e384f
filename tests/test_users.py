"""The caller's profile, password, referrals and invite codes; the profile cache."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from aiohttp import web

from server.app import create_app
from server.auth.login import Client
from server.config import Settings
from server.keys import auth_key, db_key, redis_key
from tests.auth_support import (
    PASSWORD,
    auth_settings,
    bearer,
    error_code,
    login,
    new_phone,
    register,
    sms_code,
)
from tests.conftest import Services


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return auth_settings(make_settings)


async def patch_me(client: Any, token: str, body: dict[str, Any]) -> Any:
    return await client.patch("/api/v1/me", json=body, headers=bearer(token))


async def test_a_profile_is_completed_by_nickname_and_gender(client: Any) -> None:
    account = await register(client)
    token = account["access_token"]
    resp = await patch_me(client, token, {"nickname": "  Lin  "})
    assert resp.status == 200
    assert (await resp.json())["nickname"] == "Lin"
    assert (await resp.json())["profile_completed"] is False
    resp = await patch_me(client, token, {"gender": "female", "avatar_url": "https://cdn.example.com/a.png"})
    body = await resp.json()
    assert body["profile_completed"] is True and body["gender"] == "female" and body["nickname"] == "Lin"
    assert await (await client.get("/api/v1/me", headers=bearer(token))).json() == body


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"nickname": ""}, "nickname"),
        ({"nickname": "   "}, "nickname"),
        ({"nickname": "x" * 21}, "nickname"),
        ({"nickname": "bad\u0007bell"}, "nickname"),
        ({"nickname": None}, "nickname"),
        ({"gender": "other"}, "gender"),
        ({"avatar_url": "http://cdn.example.com/a.png"}, "avatar_url"),
        ({"avatar_url": "javascript:alert(1)"}, "avatar_url"),
        ({"avatar_url": "/etc/passwd"}, "avatar_url"),
        ({"role": "admin"}, "role"),
    ],
)
async def test_a_bad_profile_field_answers_422_and_changes_nothing(
    client: Any, body: dict[str, Any], field: str
) -> None:
    account = await register(client)
    resp = await patch_me(client, account["access_token"], body)
    assert resp.status == 422
    assert [f["field"] for f in (await resp.json())["error"]["details"]["fields"]] == [field]
    me = await (await client.get("/api/v1/me", headers=bearer(account["access_token"]))).json()
    assert me == account["user"]


async def test_the_docs_show_only_avatar_url_as_nullable_in_a_profile_patch(client: Any) -> None:
    doc = await (await client.get("/api/openapi.json")).json()
    fields = doc["components"]["schemas"]["ProfileIn"]["properties"]
    nullable = {name for name, schema in fields.items() if "null" in json.dumps(schema)}
    assert set(fields) == {"nickname", "avatar_url", "gender"} and nullable == {"avatar_url"}


@pytest.mark.parametrize("url", ["/api/v1/assets/42/file", "/files/avatars/a.webp", "https://x.cn/p.jpg"])
async def test_our_asset_paths_and_https_urls_are_accepted_as_avatars(client: Any, url: str) -> None:
    account = await register(client)
    resp = await patch_me(client, account["access_token"], {"avatar_url": url})
    assert (await resp.json())["avatar_url"] == url
    cleared = await patch_me(client, account["access_token"], {"avatar_url": None})
    assert (await cleared.json())["avatar_url"] is None


async def test_a_20_character_nickname_of_chinese_is_fine(client: Any) -> None:
    account = await register(client)
    resp = await patch_me(client, account["access_token"], {"nickname": "衣" * 20})
    assert resp.status == 200


async def change_password(client: Any, token: str, body: dict[str, Any]) -> Any:
    return await client.post("/api/v1/me/password", json=body, headers=bearer(token))


async def test_changing_the_password_with_the_old_one_ends_the_other_sessions_only(client: Any) -> None:
    account = await register(client)
    other = await login(client, account["phone"])
    resp = await change_password(
        client, account["access_token"], {"old_password": PASSWORD, "new_password": "n3w-password"}
    )
    assert resp.status == 204
    mine = await client.post("/api/v1/auth/refresh", json={"refresh_token": account["refresh_token"]})
    assert mine.status == 200
    theirs = await client.post("/api/v1/auth/refresh", json={"refresh_token": other["refresh_token"]})
    assert await error_code(theirs) == "TOKEN_REVOKED"
    await login(client, account["phone"], "n3w-password")


async def test_changing_the_password_needs_the_old_one_or_an_sms_code(client: Any) -> None:
    account = await register(client)
    token = account["access_token"]
    neither = await change_password(client, token, {"new_password": "n3w-password"})
    assert neither.status == 422
    wrong = await change_password(
        client, token, {"old_password": "wrong-pass1", "new_password": "n3w-password"}
    )
    assert wrong.status == 401
    assert await error_code(wrong) == "INVALID_CREDENTIALS"
    code = await sms_code(client, account["phone"], "reset_password")
    by_sms = await change_password(client, token, {"sms_code": code, "new_password": "n3w-password"})
    assert by_sms.status == 204
    await login(client, account["phone"], "n3w-password")


async def test_an_account_without_a_password_sets_one_without_proof(client: Any) -> None:
    phone = new_phone()
    code = await sms_code(client, phone, "login")
    account = await (await client.post("/api/v1/auth/login", json={"phone": phone, "sms_code": code})).json()
    resp = await change_password(client, account["access_token"], {"new_password": "f1rst-password"})
    assert resp.status == 204
    await login(client, phone, "f1rst-password")


async def test_a_weak_new_password_answers_422(client: Any) -> None:
    account = await register(client)
    resp = await change_password(
        client, account["access_token"], {"old_password": PASSWORD, "new_password": "weak"}
    )
    assert resp.status == 422


async def test_referrals_page_newest_first_with_masked_phones(client: Any) -> None:
    referrer = await register(client)
    invited = [await register(client, invite_code=referrer["user"]["invite_code"]) for _ in range(3)]
    await register(client)  # not invited
    token = bearer(referrer["access_token"])
    first = await (await client.get("/api/v1/me/referrals?limit=2", headers=token)).json()
    assert [i["phone"] for i in first["items"]] == [u["user"]["phone"] for u in invited[::-1][:2]]
    assert set(first["items"][0]) == {"phone", "nickname", "joined_at"}
    assert first["items"][0]["joined_at"].endswith("Z")
    second = await (
        await client.get(f"/api/v1/me/referrals?limit=2&cursor={first['next_cursor']}", headers=token)
    ).json()
    assert [i["phone"] for i in second["items"]] == [invited[0]["user"]["phone"]]
    assert second["next_cursor"] is None
    default = await (await client.get("/api/v1/me/referrals", headers=token)).json()
    assert len(default["items"]) == 3 and default["next_cursor"] is None


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=101", "limit=x", "cursor=not-a-cursor", "cursor=WyJ4Il0"]
)
async def test_bad_paging_parameters_answer_422(client: Any, query: str) -> None:
    account = await register(client)
    resp = await client.get(f"/api/v1/me/referrals?{query}", headers=bearer(account["access_token"]))
    assert resp.status == 422
    assert (await resp.json())["error"]["details"]["fields"][0]["field"].startswith("query.")


async def test_an_invite_code_check_is_case_insensitive_and_404s_otherwise(
    client: Any, services: Services, database: str
) -> None:
    account = await register(client)
    code = account["user"]["invite_code"]
    for variant in (code, code.lower()):
        resp = await client.get(f"/api/v1/invite-codes/{variant}")
        assert resp.status == 200 and await resp.json() == {"valid": True}
    for unknown_code in ("ZZZZZZZZ", "9" * 23, "X" * 32):  # the last two decode past 2**63 - 1
        unknown = await client.get(f"/api/v1/invite-codes/{unknown_code}")
        assert unknown.status == 404
        assert await error_code(unknown) == "NOT_FOUND"
    services.query(database, "UPDATE users SET status = 'banned' WHERE id = %s", account["user"]["id"])
    assert (await client.get(f"/api/v1/invite-codes/{code}")).status == 404


@pytest.mark.parametrize("local_copies", [10_000, 0])
async def test_a_profile_change_through_one_process_is_seen_at_once_through_another(
    aiohttp_client: Any, settings: Settings, local_copies: int
) -> None:
    settings = settings.updated(profile_local_cache_size=local_copies)
    one = await aiohttp_client(create_app(settings))
    two = await aiohttp_client(create_app(settings))
    account = await register(one)
    token = bearer(account["access_token"])
    assert (await (await two.get("/api/v1/me", headers=token)).json())["nickname"] is None  # cached there now
    await patch_me(one, account["access_token"], {"nickname": "Mei", "gender": "female"})
    seen = await (await two.get("/api/v1/me", headers=token)).json()
    assert seen["nickname"] == "Mei" and seen["profile_completed"] is True


async def test_a_stampede_of_cache_misses_reads_mysql_once(aiohttp_client: Any, settings: Settings) -> None:
    apps = [create_app(settings), create_app(settings)]
    clients = [await aiohttp_client(a) for a in apps]
    account = await register(clients[0])
    user_id = int(account["user"]["id"])
    loads = 0
    for app in apps:
        profiles = app[auth_key].profiles
        original = profiles.load

        async def counted(uid: int, original: Any = original) -> Any:
            nonlocal loads
            loads += 1
            return await original(uid)

        profiles.load = counted  # type: ignore[method-assign]
    await apps[0][auth_key].profiles.invalidate(user_id)
    token = bearer(account["access_token"])
    answers = await asyncio.gather(*(clients[i % 2].get("/api/v1/me", headers=token) for i in range(60)))
    assert {r.status for r in answers} == {200}
    assert loads == 1


async def test_a_miss_that_loses_the_race_to_another_loader_takes_its_record(
    client: Any, app: web.Application
) -> None:
    # The interleaving CI hit: this process misses the key, another one loads MySQL and fills
    # the key (dropping its lock), and only then does this process try to take the lock.
    account = await register(client)
    user_id = int(account["user"]["id"])
    profiles = app[auth_key].profiles
    await profiles.invalidate(user_id)
    assert await app[redis_key].get(f"user:{user_id}:profile") is None  # our miss
    record = await profiles.load(user_id)
    assert record is not None
    record["nickname"] = "filled-by-the-other-process"
    await app[redis_key].set(f"user:{user_id}:profile", json.dumps(record))  # their fill

    async def must_not_load(uid: int) -> Any:
        raise AssertionError("loaded MySQL a second time")

    profiles.load = must_not_load  # type: ignore[method-assign]
    assert (await profiles._fill(user_id) or {})["nickname"] == "filled-by-the-other-process"
    assert not await app[redis_key].exists(f"user:{user_id}:profile:lock")


async def test_the_cache_is_filled_on_read_and_dropped_on_change(client: Any, app: web.Application) -> None:
    account = await register(client)
    key = f"user:{account['user']['id']}:profile"
    redis = app[redis_key]
    await client.get("/api/v1/me", headers=bearer(account["access_token"]))
    assert await redis.exists(key)
    assert 3500 < await redis.ttl(key) <= 3600
    await patch_me(client, account["access_token"], {"gender": "male"})
    assert not await redis.exists(key) or b'"male"' in await redis.get(key)


async def test_a_hash_made_with_old_parameters_is_replaced_at_login(
    client: Any, app: web.Application, services: Services, database: str
) -> None:
    from argon2 import PasswordHasher

    def hash_password(password: str) -> str:  # the library's defaults, not the test settings'
        return PasswordHasher().hash(password)

    account = await register(client)
    services.query(
        database,
        "UPDATE users SET password_hash = %s WHERE id = %s",
        hash_password(PASSWORD),
        account["user"]["id"],
    )
    await login(client, account["phone"])
    [row] = services.query(database, "SELECT password_hash FROM users WHERE id = %s", account["user"]["id"])
    assert row["password_hash"].startswith("$argon2id$v=19$m=8,t=1,p=1$")
    await login(client, account["phone"])


@pytest.mark.timeout(180)  # a hang guard: 8 s on an idle machine, 30-55 s at load average 8 on 2 cores
async def test_1000_concurrent_registrations_get_1000_distinct_invite_codes(
    aiohttp_client: Any, make_settings: Callable[..., Settings], services: Services, database: str
) -> None:
    # 100 registrations in flight at any moment, as 100 clients would send them: enough
    # to race for users rows, invite codes and pool connections, without opening 1,000
    # Redis connections at once (that timed out on a busy 2-core machine). The pool
    # waits are long because a loaded machine is slow, not wrong.
    app = create_app(auth_settings(make_settings, db_pool_max=20, db_acquire_timeout=50, redis_timeout=50))
    await aiohttp_client(app)
    auth = app[auth_key]
    in_flight = asyncio.Semaphore(100)

    async def sign_up(phone: str) -> str | None:
        async with in_flight:
            code = await auth.codes.issue(phone, "register")
            result = await auth.service.register(phone, PASSWORD, code, None, Client(ip="127.0.0.1"))
            return result.user.invite_code

    async with asyncio.TaskGroup() as group:  # one failure cancels the rest before teardown
        signups = [group.create_task(sign_up(new_phone())) for _ in range(1000)]
    assert len({s.result() for s in signups}) == 1000
    rows = services.query(database, "SELECT COUNT(DISTINCT invite_code) AS n, COUNT(*) AS total FROM users")
    assert rows == [{"n": 1000, "total": 1000}]


@pytest.fixture
def cleanup_reads() -> Iterator[list[str]]:
    """What the app's own teardown read from its database, checked once the app is closed."""
    reads: list[str] = []
    yield reads
    assert reads == ["1 user"], "the app's teardown ran after its database was dropped"


async def test_an_apps_teardown_still_reaches_its_database(
    cleanup_reads: list[str], aiohttp_client: Any, settings: Settings
) -> None:
    async def last_words(app: web.Application) -> AsyncIterator[None]:
        yield
        try:
            cleanup_reads.append(f"{await app[db_key].fetchval('SELECT COUNT(*) FROM users')} user")
        except Exception as exc:
            cleanup_reads.append(repr(exc))

    app = create_app(settings)
    app.cleanup_ctx.append(last_words)  # after db_ctx: torn down while the pool is open
    await register(await aiohttp_client(app))


async def test_a_change_drops_every_process_copy_before_it_answers(
    aiohttp_client: Any, settings: Settings
) -> None:
    apps = [create_app(settings), create_app(settings)]
    clients = [await aiohttp_client(a) for a in apps]
    account = await register(clients[0])
    uid = int(account["user"]["id"])
    for client in clients:
        await client.get("/api/v1/me", headers=bearer(account["access_token"]))
    nears = [a[auth_key].profiles.near for a in apps]
    assert all(near.get(uid) is not None for near in nears)
    await patch_me(clients[0], account["access_token"], {"nickname": "Qiu"})
    copies = [near.get(uid) for near in nears]
    assert copies[1] is None  # the other process dropped its copy before the PATCH answered
    assert copies[0] is None or copies[0]["nickname"] == "Qiu"  # the writer may hold the new one


async def test_a_copy_read_before_an_invalidation_is_not_kept(app: web.Application, client: Any) -> None:
    near = app[auth_key].profiles.near
    generation = near.generation
    near.drop(7)  # an invalidation arrives while a read of user 7 is in flight
    near.put(7, {"id": 7}, generation)
    assert near.get(7) is None
    near.put(7, {"id": 7}, near.generation)
    assert near.get(7) == {"id": 7}
