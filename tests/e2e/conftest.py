"""A real server process and Debian's Chromium, for tests marked `e2e` (`make e2e`).

The server is `python run.py serve` in a temporary directory (so no .env applies),
with its own embedded MariaDB and Redis under a temporary VAR_DIR, APP_ENV=test,
SIGNUP_CREDITS=20 and an admin account (ADMIN_PHONE / ADMIN_PASSWORD, made at start).
The browser is /usr/bin/chromium (or $CHROMIUM) driven by the playwright package;
nothing is downloaded (`playwright install` is never run).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import ConsoleMessage, Page, Response, sync_playwright

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SIGNUP_CREDITS = 20
# The server makes this account an admin at start (ADMIN_PHONE / ADMIN_PASSWORD).
ADMIN_PHONE = "13900000077"
ADMIN_PASSWORD = "e2e-admin-pass-1"
# Only what a process needs from the caller's environment: no DATABASE_URL, REDIS_URL,
# storage or vendor settings of the developer's shell reach the server under test.
PASS_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")


@dataclass
class LiveServer:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def wait_ready(server: LiveServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"server exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server not ready within {timeout} s:\n{server.log_tail()}")


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    base = tmp_path_factory.mktemp("e2e")
    port = free_port()
    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    env.update(
        APP_ENV="test",
        HOST="127.0.0.1",
        PORT=str(port),
        VAR_DIR=str(base / "var"),
        SIGNUP_CREDITS=str(SIGNUP_CREDITS),
        ADMIN_PHONE=ADMIN_PHONE,
        ADMIN_PASSWORD=ADMIN_PASSWORD,
        SHUTDOWN_TIMEOUT="2",
    )
    log = base / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "run.py"), "serve"],
            cwd=base,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = LiveServer(f"http://127.0.0.1:{port}", proc, log)
    try:
        started = time.monotonic()
        wait_ready(server, timeout=90)
        print(f"server ready in {time.monotonic() - started:.1f} s")
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print(f"--- server log (last lines) ---\n{server.log_tail()}")


@pytest.fixture
def chromium_path() -> str:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run `make e2e` (it installs Debian's chromium) or set CHROMIUM")
    return CHROMIUM


@dataclass
class BrowserPage:
    page: Page
    problems: list[str]  # console errors, uncaught exceptions, failed requests


@pytest.fixture
def browser_page(chromium_path: str, tmp_path: Path) -> Iterator[BrowserPage]:
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh profile every test
            executable_path=chromium_path,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1000},
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(15_000)
            problems: list[str] = []

            def on_console(m: ConsoleMessage) -> None:
                if m.type == "error":
                    problems.append(f"console error: {m.text} ({m.location.get('url')})")

            def on_response(r: Response) -> None:
                if r.status >= 400:
                    problems.append(f"HTTP {r.status}: {r.url}")

            page.on("console", on_console)
            page.on("response", on_response)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))
            yield BrowserPage(page, problems)
        finally:
            context.close()
