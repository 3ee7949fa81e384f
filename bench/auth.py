"""Authenticated GET /api/v1/me (profile cache hit) against a bare aiohttp JSON handler.

    .venv/bin/python bench/auth.py [--seconds 2] [--rounds 5] [--connections 64]

Both servers run on 127.0.0.1 in their own processes: the full app (every
middleware: request id, error envelope, metrics, access log at WARNING, auth: JWT
check, then the cached profile) and a one-route aiohttp app answering a
User-shaped JSON body with `web.json_response`. Also measured, for the breakdown:
the app's GET /healthz (its middleware alone), and GET /me in a second app process
with the in-process profile copy off, so each request reads Redis. MariaDB and
Redis are private instances (server.embedded) under ./var/bench. The load comes
from `wrk` (Debian
package `wrk`) when installed, else from an aiohttp client with N concurrent workers
in a separate process; the same tool drives both servers. With two or more CPUs the
servers are pinned to CPU 0 and the load to CPU 1. Rounds alternate between the two
servers and the best of each is kept. Prints a table, then lines for bench/RESULTS.md.
About 50 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._support import free_port, pin, services, wait_until_up  # noqa: E402

BARE_USER = {
    "id": "1",
    "phone": "138****8000",
    "nickname": "Lin",
    "avatar_url": "https://cdn.example.com/a.png",
    "gender": "female",
    "role": "user",
    "invite_code": "AB3DE5",
    "referrer_id": None,
    "profile_completed": True,
    "membership": None,
    "created_at": "2026-11-23T08:00:00Z",
}


# ------------------------------------------------------------------ the two servers


def serve_app(port: int) -> None:
    from aiohttp import web

    from server.app import create_app
    from server.config import load_settings
    from server.logging import setup_logging

    pin(0)
    settings = load_settings()
    setup_logging(settings.log_level)
    web.run_app(create_app(settings), host="127.0.0.1", port=port, access_log=None, print=None)


def serve_bare(port: int) -> None:
    from aiohttp import web

    pin(0)

    async def me(request: web.Request) -> web.Response:
        return web.json_response(BARE_USER)

    app = web.Application()
    app.router.add_get("/api/v1/me", me)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# ------------------------------------------------------------------ load


def load_python(url: str, token: str, seconds: float, connections: int) -> dict[str, float]:
    """The fallback load tool: aiohttp workers in this (separate) process."""
    import aiohttp

    pin(1)

    async def run() -> dict[str, float]:
        done = errors = 0
        deadline = time.perf_counter() + seconds
        headers = {"Authorization": f"Bearer {token}"}
        conn = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=conn, headers=headers) as session:

            async def worker() -> None:
                nonlocal done, errors
                while time.perf_counter() < deadline:
                    async with session.get(url) as resp:
                        await resp.read()
                        done += 1
                        errors += resp.status != 200

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(connections)))
            return {"rps": done / (time.perf_counter() - started), "errors": errors}

    return asyncio.run(run())


def measure(url: str, token: str, seconds: float, connections: int) -> dict[str, float]:
    wrk = shutil.which("wrk")
    if wrk:
        cpu = ["taskset", "-c", "1"] if (os.cpu_count() or 1) >= 2 and shutil.which("taskset") else []
        out = subprocess.run(
            [
                *cpu,
                wrk,
                "-t1",
                f"-c{connections}",
                f"-d{seconds}s",
                "-H",
                f"Authorization: Bearer {token}",
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 30,
        ).stdout
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        return {"rps": rps, "errors": float(bad.group(1)) if bad else 0.0}
    argv = ["--load", url, "--token", token, "--seconds", str(seconds), "--connections", str(connections)]
    out = subprocess.run(
        [sys.executable, __file__, *argv],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    ).stdout
    return dict(json.loads(out))


# ------------------------------------------------------------------ the run


def http(method: str, url: str, body: dict[str, Any] | None = None, token: str | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        raw = resp.read()
        return json.loads(raw) if raw else None


def sign_up(base: str) -> str:
    phone = "13800138000"
    http("POST", f"{base}/api/v1/auth/sms-codes", {"phone": phone, "purpose": "login"})
    code = http("GET", f"{base}/api/v1/dev/sms/{phone}")["code"]
    result = http("POST", f"{base}/api/v1/auth/login", {"phone": phone, "sms_code": code})
    token: str = result["access_token"]
    http("PATCH", f"{base}/api/v1/me", {"nickname": "Lin", "gender": "female"}, token)
    return token


def main(args: argparse.Namespace) -> None:
    if not shutil.which("wrk"):
        print(
            "warning: wrk is not installed (apt-get install wrk): the load comes from an aiohttp "
            "client, which saturates its own CPU before the servers do; the ratios below are "
            "then the client's, not the servers'",
            file=sys.stderr,
        )
    with services("bench_auth", redis_db=15) as ready:
        env = {**ready.env, "SMS_RESEND_INTERVAL": "0"}
        procs = ready.procs
        app_port, bare_port, redis_only_port = free_port(), free_port(), free_port()
        for mode, port, extra in (
            ("--serve-app", app_port, {}),
            ("--serve-bare", bare_port, {}),
            ("--serve-app", redis_only_port, {"PROFILE_LOCAL_CACHE_SIZE": "0"}),
        ):
            argv = [sys.executable, __file__, mode, "--port", str(port)]
            procs.append(subprocess.Popen(argv, env={**env, **extra}))
        app_base, bare_base = f"http://127.0.0.1:{app_port}", f"http://127.0.0.1:{bare_port}"
        redis_only_base = f"http://127.0.0.1:{redis_only_port}"
        wait_until_up(f"{app_base}/healthz", procs[0])
        wait_until_up(f"{bare_base}/api/v1/me", procs[1])
        wait_until_up(f"{redis_only_base}/healthz", procs[2])
        token = sign_up(app_base)
        for base in (app_base, redis_only_base):
            assert http("GET", f"{base}/api/v1/me", token=token)["nickname"] == "Lin"
        targets = {
            "bare": f"{bare_base}/api/v1/me",
            "healthz": f"{app_base}/healthz",
            "app": f"{app_base}/api/v1/me",
            "redis_only": f"{redis_only_base}/api/v1/me",
        }
        best = dict.fromkeys(targets, 0.0)
        errors = 0.0
        for url in targets.values():  # warm up: connections, caches, the allocator
            measure(url, token, 1, args.connections)
        for _ in range(args.rounds):
            for name, url in targets.items():
                got = measure(url, token, args.seconds, args.connections)
                best[name] = max(best[name], got["rps"])
                errors += got["errors"]
        report(best, errors, args)


ROWS = (
    ("bare", "bare aiohttp JSON handler"),
    ("healthz", "app GET /healthz (its middleware, no auth)"),
    ("app", "GET /api/v1/me, authenticated, profile hit"),
    ("redis_only", "GET /api/v1/me, local copy off (Redis GET)"),
)


def report(best: dict[str, float], errors: float, args: argparse.Namespace) -> None:
    tool = "wrk -t1" if shutil.which("wrk") else "aiohttp client (separate process)"
    print(
        f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs; "
        f"load: {tool}, {args.connections} connections, best of {args.rounds} rounds of {args.seconds} s"
    )
    print(f"{'':<46}{'req/s':>10}{'ratio':>8}")
    for key, label in ROWS:
        print(f"{label:<46}{best[key]:>10.0f}{best[key] / best['bare']:>8.2f}")
    print(f"GET /me ratio to bare: {best['app'] / best['bare']:.2f} (target >= 0.5); non-200: {errors:.0f}")
    print()
    print("For bench/RESULTS.md:")
    for key, label in ROWS:
        print(f"| {label} | {best[key]:.0f} | {best[key] / best['bare']:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--port", type=int)
    parser.add_argument("--token")
    parser.add_argument("--serve-app", action="store_true")
    parser.add_argument("--serve-bare", action="store_true")
    parser.add_argument("--load")
    ns = parser.parse_args()
    if ns.serve_app:
        serve_app(ns.port)
    elif ns.serve_bare:
        serve_bare(ns.port)
    elif ns.load:
        print(json.dumps(load_python(ns.load, ns.token, ns.seconds, ns.connections)))
    else:
        main(ns)
