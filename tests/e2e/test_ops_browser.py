"""The ops dashboard in a real Chromium against a real server process: the admin the
server made at start logs in through the form, sees the dashboard, and logs out.

A browser is the point: a page under `Referrer-Policy: no-referrer` makes Chromium send
`Origin: null` with the form's POST, which a test client never does. Screenshot:
tests/artifacts/ops.png.
"""

from __future__ import annotations

import pytest
from playwright.sync_api import Request, expect

from tests.e2e.conftest import ADMIN_PASSWORD, ADMIN_PHONE, ARTIFACTS, BrowserPage, LiveServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def test_an_admin_logs_in_through_the_form_sees_the_dashboard_and_logs_out(
    live_server: LiveServer, browser_page: BrowserPage
) -> None:
    page = browser_page.page
    posts: list[Request] = []
    page.on("request", lambda r: posts.append(r) if r.method == "POST" else None)
    try:
        page.goto(f"{live_server.url}/ops")
        expect(page).to_have_url(f"{live_server.url}/ops/login")
        page.fill("#phone", ADMIN_PHONE)
        page.fill("#password", ADMIN_PASSWORD)
        page.click("button[type=submit]")

        expect(page).to_have_url(f"{live_server.url}/ops")
        expect(page.locator("h1")).to_have_text("Wardrobe Server · ops")
        for section in ("process", "mysql", "redis", "credits", "tasks", "actors", "vendors"):
            expect(page.locator(f"section#{section}")).to_be_visible()
        expect(page.locator("section#vendors")).to_contain_text("local")
        expect(page.locator(".unavailable")).to_have_count(0)
        login = posts[0]
        assert login.url == f"{live_server.url}/ops/login"
        assert login.header_value("origin") == live_server.url  # the page keeps its origin
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ops.png"), full_page=True)

        page.click("text=Log out")
        expect(page).to_have_url(f"{live_server.url}/ops/login")
        expect(page.locator("#phone")).to_be_visible()
        assert [p.url for p in posts] == [f"{live_server.url}/ops/login", f"{live_server.url}/ops/logout"]
        page.goto(f"{live_server.url}/ops")  # the session is over: back to the form
        expect(page).to_have_url(f"{live_server.url}/ops/login")

        # No 403, no failed request, no console error; the page has no icon, and the 404 of
        # the browser's own /favicon.ico request is not the page's.
        assert [p for p in browser_page.problems if "/favicon.ico" not in p] == []
    except BaseException:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ops-failure.png"), full_page=True)
        print("browser problems:", *browser_page.problems, sep="\n  ")
        raise
