"""SMS limits, code tries and the login lockout hold exactly under concurrency."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from server.app import create_app
from server.config import Settings
from server.errors import AppError
from server.keys import auth_key
from tests.auth_support import PASSWORD, auth_settings, error_code, login, new_phone, register, sms_code

CONCURRENCY = 50


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return auth_settings(make_settings)


async def send(client: Any, phone: str, headers: dict[str, str] | None = None) -> Any:
    return await client.post(
        "/api/v1/auth/sms-codes", json={"phone": phone, "purpose": "login"}, headers=headers or {}
    )


async def statuses(responses: list[Any]) -> Counter[int]:
    return Counter(r.status for r in responses)


async def limited_client(
    aiohttp_client: Any, make_settings: Callable[..., Settings], **overrides: Any
) -> Any:
    return await aiohttp_client(create_app(auth_settings(make_settings, **overrides)))


async def test_one_code_per_phone_per_interval_under_50_concurrent_asks(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    client = await limited_client(aiohttp_client, make_settings, sms_resend_interval=60)
    phone = new_phone()
    answers = await asyncio.gather(*(send(client, phone) for _ in range(CONCURRENCY)))
    assert await statuses(answers) == {202: 1, 429: CONCURRENCY - 1}
    ok = next(r for r in answers if r.status == 202)
    assert await ok.json() == {"retry_after": 60}
    refused = next(r for r in answers if r.status == 429)
    assert await error_code(refused) == "RATE_LIMITED"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60


async def test_the_daily_cap_per_phone_holds_under_50_concurrent_asks(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    client = await limited_client(aiohttp_client, make_settings, sms_daily_cap=3)
    phone = new_phone()
    answers = await asyncio.gather(*(send(client, phone) for _ in range(CONCURRENCY)))
    assert await statuses(answers) == {202: 3, 429: CONCURRENCY - 3}
    refused = next(r for r in answers if r.status == 429)
    assert 86000 < int(refused.headers["Retry-After"]) <= 86400


async def test_the_per_ip_cap_holds_across_phones_under_50_concurrent_asks(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    client = await limited_client(aiohttp_client, make_settings, sms_ip_limit=7, trusted_proxy_hops=1)
    answers = await asyncio.gather(
        *(send(client, new_phone(), {"X-Forwarded-For": "203.0.113.9"}) for _ in range(CONCURRENCY))
    )
    assert await statuses(answers) == {202: 7, 429: CONCURRENCY - 7}
    other_ip = await send(client, new_phone(), {"X-Forwarded-For": "203.0.113.10"})
    assert other_ip.status == 202


async def test_a_code_dies_after_five_wrong_tries_even_when_they_arrive_at_once(
    client: Any, app: web.Application
) -> None:
    phone = new_phone()
    code = await sms_code(client, phone, "register")
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    codes = app[auth_key].codes
    results = await asyncio.gather(
        *(codes.verify(phone, "register", wrong) for _ in range(CONCURRENCY)), return_exceptions=True
    )
    assert all(isinstance(r, AppError) and r.code == "INVALID_CREDENTIALS" for r in results)
    with pytest.raises(AppError):
        await codes.verify(phone, "register", code)


async def test_four_wrong_tries_still_leave_the_right_code_usable(client: Any, app: web.Application) -> None:
    phone = new_phone()
    code = await sms_code(client, phone, "register")
    codes = app[auth_key].codes
    for _ in range(4):
        with pytest.raises(AppError):
            await codes.verify(phone, "register", "000000" if code != "000000" else "111111")
    await codes.verify(phone, "register", code)


async def test_a_right_code_sent_50_times_at_once_is_accepted_once(client: Any, app: web.Application) -> None:
    phone = new_phone()
    code = await sms_code(client, phone, "login")
    results = await asyncio.gather(
        *(app[auth_key].codes.verify(phone, "login", code) for _ in range(CONCURRENCY)),
        return_exceptions=True,
    )
    assert sum(r is None for r in results) == 1


async def wrong_login(client: Any, phone: str, headers: dict[str, str] | None = None) -> Any:
    return await client.post(
        "/api/v1/auth/login", json={"phone": phone, "password": "wrong-pass1"}, headers=headers or {}
    )


async def test_five_failures_lock_the_account_under_50_concurrent_attempts(client: Any) -> None:
    account = await register(client)
    answers = await asyncio.gather(*(wrong_login(client, account["phone"]) for _ in range(CONCURRENCY)))
    assert await statuses(answers) == {401: 5, 423: CONCURRENCY - 5}
    locked = next(r for r in answers if r.status == 423)
    assert await error_code(locked) == "ACCOUNT_LOCKED"
    assert 1 <= int(locked.headers["Retry-After"]) <= 900
    right = await client.post("/api/v1/auth/login", json={"phone": account["phone"], "password": PASSWORD})
    assert right.status == 423


async def test_an_unknown_phone_locks_the_same_way(client: Any) -> None:
    phone = new_phone()
    answers = [await wrong_login(client, phone) for _ in range(6)]
    assert [r.status for r in answers] == [401] * 5 + [423]


async def test_a_successful_login_does_not_count_as_a_failure(client: Any) -> None:
    account = await register(client)
    for _ in range(4):
        assert (await wrong_login(client, account["phone"])).status == 401
    for _ in range(3):
        await login(client, account["phone"])
    assert (await wrong_login(client, account["phone"])).status == 401
    assert (await wrong_login(client, account["phone"])).status == 423


async def test_the_per_ip_failure_bound_is_higher_and_holds_across_phones(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    client = await limited_client(
        aiohttp_client, make_settings, login_ip_max_failures=8, trusted_proxy_hops=1
    )
    xff = {"X-Forwarded-For": "198.51.100.7"}
    answers = await asyncio.gather(*(wrong_login(client, new_phone(), xff) for _ in range(CONCURRENCY)))
    assert await statuses(answers) == {401: 8, 429: CONCURRENCY - 8}
    assert (await wrong_login(client, new_phone(), {"X-Forwarded-For": "198.51.100.8"})).status == 401


async def test_wrong_sms_login_codes_count_towards_the_lock(client: Any) -> None:
    phone = new_phone()
    await sms_code(client, phone, "login")
    for _ in range(5):
        resp = await client.post("/api/v1/auth/login", json={"phone": phone, "sms_code": "000000"})
        assert resp.status == 401
    resp = await client.post("/api/v1/auth/login", json={"phone": phone, "sms_code": "000000"})
    assert resp.status == 423


async def test_a_password_reset_lifts_the_lock(client: Any) -> None:
    account = await register(client)
    for _ in range(5):
        await wrong_login(client, account["phone"])
    code = await sms_code(client, account["phone"], "reset_password")
    resp = await client.post(
        "/api/v1/auth/password/reset",
        json={"phone": account["phone"], "sms_code": code, "new_password": "n3w-password"},
    )
    assert resp.status == 204
    await login(client, account["phone"], "n3w-password")
