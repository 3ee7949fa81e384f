"""Real processes for the deployment tests (tests/test_nginx.py, tests/test_sentinel.py):
`run.py serve` instances on unix sockets, nginx running ops/nginx/wardrobe.conf, and a
client that goes through them as a user would."""

from __future__ import annotations

import asyncio
import getpass
import io
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp
from PIL import Image

from tests.conftest import ROOT
from tests.ports import free_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
# Cheap argon2 and no SMS resend gap, so a test makes accounts quickly.
FAST_ENV = {"ARGON2_TIME_COST": "1", "ARGON2_MEMORY_KIB": "8", "SMS_RESEND_INTERVAL": "0"}


class Instance:
    """One `python run.py serve --path <sock>` process; its output goes to a log file."""

    def __init__(self, name: str, base: Path, env: dict[str, str]) -> None:
        self.name = name
        self.sock = base / f"{name}.sock"
        self.log = base / f"{name}.log"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_", "ADMIN_"))}
        env.update({"APP_ENV": "test", "SHUTDOWN_TIMEOUT": "3", **FAST_ENV, **self.env})
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "run.py"), "serve", "--path", str(self.sock)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    async def ready(self, within: float = 60) -> None:
        """Until GET /readyz on the socket answers 200."""
        assert self.proc is not None
        async with asyncio.timeout(within):
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()}")
                try:
                    connector = aiohttp.UnixConnector(path=str(self.sock))
                    async with (
                        aiohttp.ClientSession(connector=connector) as session,
                        session.get("http://instance/readyz") as resp,
                    ):
                        if resp.status == 200:
                            return
                except (OSError, aiohttp.ClientError):
                    pass
                await asyncio.sleep(0.1)

    async def stop(self, sig: int = signal.SIGTERM, within: float = 20) -> int:
        """Send `sig` and wait for the exit (SIGKILL after `within`); the exit code."""
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(sig)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(None, proc.wait), within)
        except TimeoutError:
            proc.kill()
            await loop.run_in_executor(None, proc.wait)
        self.proc = None
        return proc.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Nginx:
    """nginx (Debian's) in the foreground as the current user, on ops/nginx/wardrobe.conf
    with its upstream sockets, public port and internal port rewritten for a temp dir."""

    def __init__(self, base: Path, sockets: Iterable[Path]) -> None:
        self.base = base
        self.port = free_port()
        self.internal_port = free_port()
        self.proc: asyncio.subprocess.Process | None = None
        site = (ROOT / "ops" / "nginx" / "wardrobe.conf").read_text()
        upstreams = "".join(f"    server unix:{s} max_fails=1 fail_timeout=5s;\n" for s in sockets)
        site, n = re.subn(r"(?m)^    server unix:/run/wardrobe/.*\n", "", site)
        assert n >= 1, "ops/nginx/wardrobe.conf lists no unix:/run/wardrobe/ upstream"
        site = site.replace("upstream wardrobe {\n", "upstream wardrobe {\n" + upstreams, 1)
        site = site.replace("    listen 80;", f"    listen 127.0.0.1:{self.port};", 1)
        site = site.replace("    listen 127.0.0.1:9180;", f"    listen 127.0.0.1:{self.internal_port};", 1)
        (base / "wardrobe.conf").write_text(site)
        temp = "\n".join(
            f"    {kind}_temp_path {base / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (base / "nginx.conf").write_text(
            f"""user {getpass.getuser()};
daemon off;
worker_processes 1;
pid {base / "nginx.pid"};
error_log {base / "error.log"} info;
events {{ worker_connections 512; }}
http {{
{temp}
    include {base / "wardrobe.conf"};
    log_format wardrobe '$remote_addr "$request" $status rid=$wardrobe_request_id up=$upstream_addr';
    access_log {base / "access.log"} wardrobe;
}}
"""
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        conf = self.base / "nginx.conf"
        args = [NGINX, "-p", str(self.base), "-c", str(conf), "-e", str(self.base / "error.log")]
        check = await asyncio.create_subprocess_exec(*args, "-t", stderr=asyncio.subprocess.PIPE)
        _, err = await check.communicate()
        assert check.returncode == 0, err.decode()
        self.proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        async with asyncio.timeout(10):
            while True:
                if self.proc.returncode is not None:
                    raise AssertionError(f"nginx exited:\n{self.error_log()}")
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    writer.close()
                    return
                except OSError:
                    await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.proc = None

    def error_log(self) -> str:
        path = self.base / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def access_log(self) -> str:
        path = self.base / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""


def image_bytes(color: str = "purple", size: tuple[int, int] = (120, 160)) -> bytes:
    im = Image.new("RGB", size, "white")
    im.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), color), (size[0] // 4, size[1] // 4))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


class Client:
    """A user of the public API at `base` (nginx), from the local address `source`."""

    def __init__(self, base: str, source: str = "127.0.0.1") -> None:
        self.base = base
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(local_addr=(source, 0), force_close=False),
            timeout=aiohttp.ClientTimeout(total=30),
        )
        self.headers: dict[str, str] = {}
        self.user_id = ""
        self.token = ""

    async def close(self) -> None:
        await self.session.close()

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        async with self.session.request(method, self.base + path, headers=headers, **kwargs) as resp:
            body = (
                await resp.json(content_type=None)
                if resp.content_type.endswith("json")
                else await resp.text()
            )
            return resp.status, body, resp

    async def register(self, phone: str, password: str = "s3cret-pass") -> None:
        status, body, _ = await self.call(
            "POST", "/api/v1/auth/sms-codes", json={"phone": phone, "purpose": "register"}
        )
        assert status == 202, body
        status, sent, _ = await self.call("GET", f"/api/v1/dev/sms/{phone}")
        assert status == 200, sent
        status, body, _ = await self.call(
            "POST",
            "/api/v1/auth/register",
            json={"phone": phone, "password": password, "sms_code": str(sent["code"])},
        )
        assert status == 201, body

    async def login(self, phone: str, password: str = "s3cret-pass") -> None:
        status, body, _ = await self.call(
            "POST", "/api/v1/auth/login", json={"phone": phone, "password": password}
        )
        assert status == 200, body
        self.token = str(body["access_token"])
        self.user_id = str(body["user"]["id"])
        self.headers = {"Authorization": f"Bearer {self.token}"}

    async def upload(self, data: bytes) -> str:
        form = aiohttp.FormData()
        form.add_field("file", data, filename="photo.png", content_type="image/png")
        status, body, _ = await self.call("POST", "/api/v1/assets", data=form)
        assert status == 201, body
        return str(body["id"])

    async def create_task(self, asset: str, key: str, feature: str = "bg-remove") -> str:
        status, body, _ = await self.call(
            "POST",
            "/api/v1/tasks",
            json={"feature": feature, "inputs": {"image": asset}},
            headers={"Idempotency-Key": key},
        )
        assert status in (200, 201, 202), body
        return str(body["id"])

    async def finished(self, task_id: str, within: float = 60) -> dict[str, Any]:
        async with asyncio.timeout(within):
            while True:
                status, body, _ = await self.call("GET", f"/api/v1/tasks/{task_id}")
                assert status == 200, body
                if body["status"] in ("succeeded", "failed", "cancelled"):
                    return dict(body)
                await asyncio.sleep(0.1)
