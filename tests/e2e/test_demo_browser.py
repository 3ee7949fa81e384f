"""The reference client at /demo in a real Chromium against a real server process:
SMS login through the dev shortcut, credits, upload, a bg-remove task followed by
live WebSocket events, its output image; then a task run while the socket is closed,
caught up with `resume {after_seq}` on reconnect. Screenshot: tests/artifacts/demo.png.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw
from playwright.sync_api import Page, expect

from tests.e2e.conftest import ARTIFACTS, SIGNUP_CREDITS, BrowserPage, LiveServer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

BG_REMOVE_COST = 2


def red_square_png(path: Path) -> Path:
    """A red square on a white backdrop: the local vendor's colour-key matting keeps the square."""
    image = Image.new("RGB", (320, 240), "white")
    ImageDraw.Draw(image).rectangle((100, 60, 220, 180), fill=(220, 20, 30))
    image.save(path, "PNG")
    return path


def logged_events(page: Page) -> list[tuple[int, str, dict[str, Any]]]:
    rows = page.eval_on_selector_all(
        "#events li[data-seq]", "els => els.map(e => [Number(e.dataset.seq), e.dataset.event, e.textContent])"
    )
    out = []
    for seq, event, text in rows:
        data = json.loads(text.split(f"#{seq} {event} ", 1)[1])
        out.append((seq, event, data))
    return out


def control_lines(page: Page) -> list[str]:
    return page.eval_on_selector_all("#events li.ctl", "els => els.map(e => e.textContent)")


def wait_for_output_image(page: Page) -> int:
    page.wait_for_function(
        "() => { const i = document.querySelector('#result img');"
        " return !document.querySelector('#result').hidden && i.complete && i.naturalWidth > 0 }"
    )
    return int(page.eval_on_selector("#result img", "i => i.naturalWidth"))


def task_status_on_server(page: Page, task_id: str) -> str:
    """The task as GET /tasks/{id} has it, with the page's own token (not through the UI)."""
    return str(
        page.evaluate(
            """async (id) => {
                const token = JSON.parse(sessionStorage.getItem("wardrobe.demo")).access;
                const r = await fetch(`/api/v1/tasks/${id}`, {headers: {Authorization: `Bearer ${token}`}});
                return (await r.json()).status;
            }""",
            task_id,
        )
    )


def test_login_upload_run_and_watch_live_events_then_resume_after_a_reconnect(
    live_server: LiveServer, browser_page: BrowserPage, tmp_path: Path
) -> None:
    page = browser_page.page
    png = red_square_png(tmp_path / "red-square.png")
    phone = f"139{random.randrange(10**8):08d}"
    times: dict[str, float] = {}
    started = time.monotonic()
    try:
        page.goto(f"{live_server.url}/demo")
        expect(page.locator("body")).to_have_attribute("data-ready", "1")
        expect(page.locator("#feature option[value=bg-remove]")).to_have_count(1)

        # Log in: send a code, the dev shortcut fills it in, log in; a new account gets the signup credits.
        page.fill("#phone", phone)
        page.click("#send-code")
        expect(page.locator("#dev-shortcut")).to_be_visible()
        expect(page.locator("#sms-code")).to_have_value(re.compile(r"^\d{4,8}$"))
        expect(page.locator("#send-code")).to_be_disabled()  # the resend cooldown
        page.click("#login")
        expect(page.locator("#auth-status")).to_contain_text("Logged in as 139****")
        expect(page.locator("#credits")).to_have_text(str(SIGNUP_CREDITS))
        expect(page.locator("#ws-state")).to_have_text("open")
        times["login"] = time.monotonic() - started

        # Upload and run bg-remove; the status comes from live events.
        page.select_option("#feature", "bg-remove")
        page.set_input_files("#file", str(png))
        expect(page.locator("#asset-image img.thumb")).to_have_count(1)
        expect(page.locator("#asset-image")).to_contain_text("320×240")
        first_seq = int(page.inner_text("#last-seq"))
        page.click("#run")
        expect(page.locator("#task-id")).not_to_have_text("–")
        task_id = page.inner_text("#task-id")
        expect(page.locator("#status")).to_have_text("succeeded")
        width = wait_for_output_image(page)
        times["first task"] = time.monotonic() - started
        assert width == 320  # matting keeps the size: a transparent PNG
        assert page.eval_on_selector("#progress", "p => p.value") == 1
        expect(page.locator("#credits")).to_have_text(str(SIGNUP_CREDITS - BG_REMOVE_COST))

        events = logged_events(page)
        seqs = [seq for seq, _, _ in events]
        assert seqs == list(range(first_seq + 1, first_seq + 1 + len(seqs))), seqs  # increasing, no gaps
        mine = [(event, data) for _, event, data in events if data.get("task_id") == task_id]
        statuses = [d["status"] for e, d in mine if e == "task.updated"]
        assert statuses == ["queued", "running", "succeeded"], mine
        progress = [d["progress"] for e, d in mine if e == "task.progress"]
        assert progress and progress == sorted(progress) and progress[-1] == 1, mine
        order = [(e, d.get("status")) for e, d in mine]
        assert order.index(("task.progress", None)) < order.index(("task.updated", "succeeded")), order
        assert any(
            e == "quota.changed" and d["available"] == SIGNUP_CREDITS - BG_REMOVE_COST for _, e, d in events
        )

        # Close the socket, run again while it is closed: nothing arrives live.
        page.click("#ws-toggle")
        expect(page.locator("#ws-state")).to_have_text("closed (1000)")
        seq_before = int(page.inner_text("#last-seq"))
        page.click("#run")
        expect(page.locator("#task-id")).not_to_have_text(task_id)
        second_id = page.inner_text("#task-id")
        deadline = time.monotonic() + 20
        while task_status_on_server(page, second_id) != "succeeded":
            assert time.monotonic() < deadline, "the second task did not finish"
            time.sleep(0.1)
        assert page.inner_text("#status") == "queued"  # the page has not heard yet
        assert int(page.inner_text("#last-seq")) == seq_before

        # Reconnect: `ready` shows a later last_seq, the page resumes after its own and catches up.
        page.click("#ws-toggle")
        expect(page.locator("#status")).to_have_text("succeeded")
        wait_for_output_image(page)
        times["resumed task"] = time.monotonic() - started
        assert f"→ resume after_seq={seq_before}" in "\n".join(control_lines(page))
        events = logged_events(page)
        seqs = [seq for seq, _, _ in events]
        assert seqs == list(range(first_seq + 1, first_seq + 1 + len(seqs))), seqs
        replayed = [(e, d) for seq, e, d in events if seq > seq_before]
        assert [d["status"] for e, d in replayed if e == "task.updated"] == ["queued", "running", "succeeded"]
        assert all(d.get("task_id") in (None, second_id) for _, d in replayed)
        expect(page.locator("#credits")).to_have_text(str(SIGNUP_CREDITS - 2 * BG_REMOVE_COST))

        assert browser_page.problems == []  # no script error, no CSP violation, no failed request
    except BaseException:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "demo-failure.png"), full_page=True)
        print("browser problems:", *browser_page.problems, sep="\n  ")
        raise
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
    print("timings (s since page load):", {k: round(v, 1) for k, v in times.items()})
