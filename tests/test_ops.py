"""The ops dashboard: its own cookie login, the admin check, and the page's figures."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from handlers import ops
from server.app import CRON_JOBS, create_app
from server.config import Settings
from server.keys import cron_key, db_key, redis_key
from server.media.assets import new_id
from tests.auth_support import PASSWORD, auth_settings, register

ADMIN_PHONE = "13900000001"
ADMIN_PASSWORD = "admin-pass-1"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return auth_settings(
        make_settings,
        cron_enabled=False,
        admin_phone=ADMIN_PHONE,
        admin_password=ADMIN_PASSWORD,
        db_pool_max=7,
    )


async def login_form(client: Any) -> str:
    resp = await client.get("/ops/login")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    match = _CSRF.search(await resp.text())
    assert match is not None
    return match.group(1)


async def post_login(client: Any, phone: str, password: str, csrf: str | None = None) -> Any:
    token = csrf if csrf is not None else await login_form(client)
    data = {"phone": phone, "password": password, "csrf": token}
    return await client.post("/ops/login", data=data, allow_redirects=False)


async def admin_login(client: Any) -> None:
    resp = await post_login(client, ADMIN_PHONE, ADMIN_PASSWORD)
    assert resp.status == 303, await resp.text()
    assert resp.headers["Location"] == "/ops"
    cookie = resp.cookies["ops_token"]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/ops"


async def seed_tasks(
    app: web.Application, feature: str, statuses: list[str], error: str | None = None
) -> None:
    for i, status in enumerate(statuses):
        await app[db_key].execute(
            "INSERT INTO tasks (id, user_id, feature, feature_version, status, progress, cost, inputs, "
            "idempotency_key, request_hash, error_code) VALUES (%s, 1, %s, 1, %s, 0.5, 10, '{}', %s, %s, %s)",
            new_id(),
            feature,
            status,
            f"{feature}-{status}-{i}",
            "0" * 64,
            error,
        )


async def test_an_admin_sees_every_section_with_its_figures(client: Any, app: web.Application) -> None:
    await seed_tasks(app, "tryon-preview", ["succeeded", "succeeded", "succeeded", "queued"])
    await seed_tasks(app, "tryon-preview", ["failed"], error="<b>VENDOR_FAILED</b>")
    await app[db_key].execute(
        "INSERT INTO quota_transactions (task_id, user_id, amount, phase, expires_at) "
        "VALUES ('t-open-1', 1, 30, 'reserved', UTC_TIMESTAMP(6) + INTERVAL 1 HOUR), "
        "('t-open-2', 1, 12, 'reserved', UTC_TIMESTAMP(6) + INTERVAL 1 HOUR), "
        "('t-done', 1, 99, 'confirmed', UTC_TIMESTAMP(6))"
    )
    await admin_login(client)

    resp = await client.get("/ops", allow_redirects=False)
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert resp.headers["Content-Security-Policy"].startswith(
        "default-src 'self'; style-src 'self' 'unsafe-inline'"
    )
    html = await resp.text()
    for section in (
        "process",
        "mysql",
        "redis",
        "redis-pool",
        "credits",
        "tasks",
        "actors",
        "vendors",
        "storage",
        "distributors",
        "cron",
    ):
        assert f'<section id="{section}">' in html
    assert '<noscript><meta http-equiv="refresh" content="10"></noscript>' in html
    assert '<script src="/ops/dashboard.js" defer></script>' in html
    assert 'href="/metrics"' in html and 'href="/api/docs"' in html
    assert "<dt>Size / max</dt><dd>" in html and " / 7</dd>" in html
    assert 'data-status="succeeded">3<' in html
    assert 'data-status="queued">1<' in html
    assert 'data-status="failed">1<' in html
    assert '<dt>Open reservations</dt><dd data-k="credits.count">2</dd>' in html
    assert '<dt>Credits reserved</dt><dd data-k="credits.sum">42</dd>' in html
    assert '<dt>Past their TTL</dt><dd data-k="credits.overdue">0</dd>' in html
    assert html.count("<td>tryon-preview</td>") == 5
    assert "&lt;b&gt;VENDOR_FAILED&lt;/b&gt;" in html  # autoescaped
    assert "<b>VENDOR_FAILED" not in html
    assert "<td>VendorActor[local]</td>" in html
    assert "<td>local</td>" in html
    assert '<th class="n">Latency p50 / p99</th>' in html
    assert (
        '<dt>Lifecycle rules</dt><dd class="state-closed">applied by the nightly job (local backend)</dd>'
        in html
    )
    assert "<dt>Estimated monthly cost</dt><dd>" in html
    assert "unavailable:" not in html


async def test_a_source_that_fails_or_hangs_shows_as_unavailable(
    client: Any, app: web.Application, monkeypatch: pytest.MonkeyPatch
) -> None:
    await admin_login(client)
    db, redis = app[db_key], app[redis_key]

    async def broken(*args: Any) -> Any:
        raise RuntimeError("MySQL went away")

    async def hangs(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(5)

    monkeypatch.setattr(ops, "QUERY_TIMEOUT", 0.1)
    monkeypatch.setattr(db, "fetchall", broken)
    monkeypatch.setattr(redis, "info", hangs)
    resp = await client.get("/ops")
    assert resp.status == 200
    html = await resp.text()
    assert "unavailable: RuntimeError: MySQL went away" in html
    assert "unavailable: no answer within 0.1s" in html
    # the other sources still show
    assert '<dt>Open reservations</dt><dd data-k="credits.count">0</dd>' in html


async def test_without_a_valid_cookie_the_dashboard_redirects_to_login(client: Any) -> None:
    resp = await client.get("/ops", allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == "/ops/login"
    resp = await client.get("/ops", headers={"Cookie": "ops_token=not-a-token"}, allow_redirects=False)
    assert resp.status == 303


async def test_a_user_who_is_not_an_admin_gets_403(client: Any) -> None:
    me = await register(client)
    resp = await post_login(client, me["phone"], PASSWORD)
    assert resp.status == 403
    assert "Admin only" in await resp.text()
    assert "ops_token" not in resp.cookies

    headers = {"Cookie": f"ops_token={me['access_token']}"}
    resp = await client.get("/ops", headers=headers, allow_redirects=False)
    assert resp.status == 403
    assert resp.content_type == "text/html"
    assert "Admin only" in await resp.text()


async def test_a_login_without_the_form_s_csrf_token_is_refused(client: Any) -> None:
    await login_form(client)
    resp = await post_login(client, ADMIN_PHONE, ADMIN_PASSWORD, csrf="forged")
    assert resp.status == 403
    assert "ops_token" not in resp.cookies

    token = await login_form(client)
    client.session.cookie_jar.clear()  # the form token without its cookie
    resp = await post_login(client, ADMIN_PHONE, ADMIN_PASSWORD, csrf=token)
    assert resp.status == 403


async def test_a_csrf_token_works_once(client: Any) -> None:
    token = await login_form(client)
    resp = await post_login(client, ADMIN_PHONE, "wrong-pass-1", csrf=token)
    assert resp.status == 401
    client.session.cookie_jar.update_cookies({"ops_csrf": token})
    resp = await post_login(client, ADMIN_PHONE, ADMIN_PASSWORD, csrf=token)
    assert resp.status == 403


async def test_a_cross_site_post_is_refused(client: Any) -> None:
    token = await login_form(client)
    resp = await client.post(
        "/ops/login",
        data={"phone": ADMIN_PHONE, "password": ADMIN_PASSWORD, "csrf": token},
        headers={"Origin": "https://evil.example"},
        allow_redirects=False,
    )
    assert resp.status == 403


async def test_a_login_sent_with_origin_null_and_a_valid_token_gets_in(client: Any) -> None:
    # What Chromium sends for a form POST from a page under `Referrer-Policy: no-referrer`.
    token = await login_form(client)
    resp = await client.post(
        "/ops/login",
        data={"phone": ADMIN_PHONE, "password": ADMIN_PASSWORD, "csrf": token},
        headers={"Origin": "null"},
        allow_redirects=False,
    )
    assert resp.status == 303, await resp.text()
    assert resp.headers["Location"] == "/ops"
    assert "ops_token" in resp.cookies


async def test_a_login_sent_with_origin_null_and_a_bad_token_is_refused(client: Any) -> None:
    await login_form(client)
    resp = await client.post(
        "/ops/login",
        data={"phone": ADMIN_PHONE, "password": ADMIN_PASSWORD, "csrf": "forged"},
        headers={"Origin": "null"},
        allow_redirects=False,
    )
    assert resp.status == 403
    assert "ops_token" not in resp.cookies


async def test_the_pages_keep_the_origin_in_their_referrer_policy(client: Any) -> None:
    resp = await client.get("/ops/login")
    assert resp.headers["Referrer-Policy"] == "same-origin"
    await admin_login(client)
    resp = await client.get("/ops", allow_redirects=False)
    assert resp.headers["Referrer-Policy"] == "same-origin"


async def test_a_wrong_password_shows_the_form_again_with_401(client: Any) -> None:
    resp = await post_login(client, ADMIN_PHONE, "wrong-pass-1")
    assert resp.status == 401
    html = await resp.text()
    assert "Wrong phone number or password" in html
    assert f'value="{ADMIN_PHONE}"' in html
    assert _CSRF.search(html) is not None  # a fresh form to try again
    resp = await post_login(client, "not-a-phone", "whatever")
    assert resp.status == 401


async def logout_token_of_the_page(client: Any) -> str:
    resp = await client.get("/ops", allow_redirects=False)
    assert resp.status == 200
    match = re.search(
        r'action="/ops/logout"><input type="hidden" name="csrf" value="([0-9a-f]+)"', await resp.text()
    )
    assert match is not None
    return match.group(1)


async def test_logout_clears_the_cookie_and_ends_the_session(client: Any, app: web.Application) -> None:
    await admin_login(client)
    token = await logout_token_of_the_page(client)
    keys = [k async for k in app[redis_key].scan_iter("ops:refresh:*")]
    assert len(keys) == 1

    resp = await client.post(
        "/ops/logout", data={"csrf": token}, headers={"Origin": "null"}, allow_redirects=False
    )
    assert resp.status == 303
    assert resp.headers["Location"] == "/ops/login"
    assert [k async for k in app[redis_key].scan_iter("ops:refresh:*")] == []
    revoked = await app[db_key].fetchval("SELECT COUNT(*) FROM auth_sessions WHERE revoke_reason = 'logout'")
    assert revoked == 1
    resp = await client.get("/ops", allow_redirects=False)
    assert resp.status == 303


async def test_a_logout_without_the_page_s_token_is_refused_and_the_session_stays(
    client: Any, app: web.Application
) -> None:
    await admin_login(client)
    await logout_token_of_the_page(client)
    for data in ({}, {"csrf": "0" * 64}):
        resp = await client.post("/ops/logout", data=data, headers={"Origin": "null"}, allow_redirects=False)
        assert resp.status == 403
    assert len([k async for k in app[redis_key].scan_iter("ops:refresh:*")]) == 1
    assert (await client.get("/ops", allow_redirects=False)).status == 200


async def test_a_cross_site_logout_is_refused_even_with_the_token(client: Any) -> None:
    await admin_login(client)
    token = await logout_token_of_the_page(client)
    resp = await client.post(
        "/ops/logout", data={"csrf": token}, headers={"Origin": "https://evil.example"}, allow_redirects=False
    )
    assert resp.status == 403
    assert (await client.get("/ops", allow_redirects=False)).status == 200


async def test_the_json_view_has_the_page_figures_and_needs_an_admin_session(
    client: Any, app: web.Application
) -> None:
    resp = await client.get("/ops/data.json")
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "UNAUTHENTICATED"
    await seed_tasks(app, "bg-remove", ["succeeded", "failed"])
    await admin_login(client)
    resp = await client.get("/ops/data.json")
    assert resp.status == 200 and resp.content_type == "application/json"
    assert resp.headers["Cache-Control"] == "no-store"
    data = await resp.json()
    assert data["task_counts"] == {"cancelled": 0, "failed": 1, "queued": 0, "running": 0, "succeeded": 1}
    assert data["db"]["max"] == 7
    assert data["credits"] == {"count": 0, "sum": 0, "overdue": 0}
    assert set(data["redis_pool"]) == {"in_use", "idle", "waiting", "max", "exhausted"}
    assert sorted(t["status"] for t in data["recent_tasks"]) == ["failed", "succeeded"]
    assert data["cron_enabled"] is False and data["cron"] == []
    script = await client.get("/ops/dashboard.js")
    assert script.status == 200 and "/ops/data.json" in await script.text()


async def test_a_user_who_is_not_admin_gets_403_from_the_json_view(client: Any) -> None:
    body = await register(client)
    client.session.cookie_jar.update_cookies({"ops_token": body["access_token"]})
    resp = await client.get("/ops/data.json")
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "FORBIDDEN"


async def test_the_cron_table_shows_each_job_its_next_run_and_last_result(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    app = create_app(
        auth_settings(
            make_settings, cron_enabled=True, admin_phone=ADMIN_PHONE, admin_password=ADMIN_PASSWORD
        )
    )
    client = await aiohttp_client(app)
    runner = app[cron_key]
    await runner.run(CRON_JOBS[0])
    await admin_login(client)
    data = await (await client.get("/ops/data.json")).json()
    rows = {row["name"]: row for row in data["cron"]}
    assert set(rows) == {job.name for job in CRON_JOBS}
    sweeper = rows["reservation-sweeper"]
    assert sweeper["last_result"] == "ok" and sweeper["runs"] == {"ok": 1}
    assert sweeper["last_start"] <= sweeper["last_end"] == sweeper["last_success"]
    assert sweeper["next_run"] > sweeper["last_end"]
    assert rows["orphan-files"]["last_start"] is None
    html = await (await client.get("/ops")).text()
    assert html.count('<section id="cron">') == 1 and "<code>0 3 * * *</code>" in html
    assert '<td data-k="cron.0.last_result" class="result-ok">ok</td>' in html
