"""The ops dashboard refreshes itself in a real Chromium: after a task runs, its figure
changes on the page without a reload; its forms refuse a POST without their CSRF token
or from another origin. Screenshot: tests/artifacts/ops-live.png."""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image
from playwright.sync_api import APIRequestContext, Page, expect

from server.app import CRON_JOBS
from tests.e2e.conftest import ADMIN_PASSWORD, ADMIN_PHONE, ARTIFACTS, BrowserPage, LiveServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

SUCCEEDED = '[data-k="task_counts.succeeded"]'


def log_in(page: Page, url: str) -> None:
    page.goto(f"{url}/ops")
    expect(page).to_have_url(f"{url}/ops/login")
    page.fill("#phone", ADMIN_PHONE)
    page.fill("#password", ADMIN_PASSWORD)
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{url}/ops")


def run_a_task(api: APIRequestContext, url: str) -> str:
    """A new user (SIGNUP_CREDITS) runs bg-remove on the local vendor; the task id."""
    phone = f"137{random.randrange(10**8):08d}"
    assert api.post(f"{url}/api/v1/auth/sms-codes", data={"phone": phone, "purpose": "register"}).ok
    code = api.get(f"{url}/api/v1/dev/sms/{phone}").json()["code"]
    reg = api.post(
        f"{url}/api/v1/auth/register", data={"phone": phone, "password": "live-pass-1", "sms_code": code}
    )
    assert reg.status == 201, reg.text()
    headers = {"Authorization": f"Bearer {reg.json()['access_token']}"}
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "olive").save(buf, "PNG")
    photo = api.post(
        f"{url}/api/v1/assets",
        headers=headers,
        multipart={"file": {"name": "p.png", "mimeType": "image/png", "buffer": buf.getvalue()}},
    )
    assert photo.status == 201, photo.text()
    task = api.post(
        f"{url}/api/v1/tasks",
        headers={**headers, "Idempotency-Key": phone},
        data={"feature": "bg-remove", "inputs": {"image": photo.json()["id"]}},
    )
    assert task.status == 202, task.text()
    return str(task.json()["id"])


def test_the_dashboard_shows_a_finished_task_without_reloading(
    live_server: LiveServer, browser_page: BrowserPage
) -> None:
    page, url = browser_page.page, live_server.url
    try:
        log_in(page, url)
        expect(page.locator("#refreshed")).to_have_attribute("data-state", "live")  # the script ran
        before = int(page.locator(SUCCEEDED).inner_text())
        page.evaluate("window.__sameDocument = true")  # gone if the page reloaded

        run_a_task(page.context.request, url)

        expect(page.locator(SUCCEEDED)).to_have_text(str(before + 1), timeout=30_000)
        assert page.evaluate("window.__sameDocument === true")  # updated in place
        expect(page.locator("section#cron")).to_be_visible()
        expect(page.locator("section#cron tbody tr")).to_have_count(len(CRON_JOBS))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ops-live.png"), full_page=True)
        assert [p for p in browser_page.problems if "/favicon.ico" not in p] == []
    except BaseException:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ops-live-failure.png"), full_page=True)
        print("browser problems:", *browser_page.problems, sep="\n  ")
        raise


def test_the_dashboard_forms_refuse_a_post_without_their_token_or_from_another_origin(
    live_server: LiveServer, browser_page: BrowserPage
) -> None:
    page, url = browser_page.page, live_server.url
    api = page.context.request  # the browser's cookies (ops_token, SameSite=Strict)
    log_in(page, url)
    token = page.locator('form[action="/ops/logout"] input[name=csrf]').get_attribute("value")
    assert token

    for form in ({}, {"csrf": "x" * 64}):
        refused = api.post(f"{url}/ops/logout", form=form, max_redirects=0)
        assert refused.status == 403, form
    foreign = api.post(
        f"{url}/ops/logout", form={"csrf": token}, headers={"Origin": "http://evil.example"}, max_redirects=0
    )
    assert foreign.status == 403
    assert api.get(f"{url}/ops/data.json").status == 200  # the session survived all three

    # The login form: a token it never issued, or one already used, is refused.
    login = {"phone": ADMIN_PHONE, "password": ADMIN_PASSWORD, "csrf": "not-issued"}
    assert api.post(f"{url}/ops/login", form=login, max_redirects=0).status == 403

    page.click("text=Log out")  # the form with its token works
    expect(page).to_have_url(f"{url}/ops/login")
    assert api.get(f"{url}/ops/data.json").status == 401
