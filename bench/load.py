"""Mixed load on two server instances sharing one database: GET /me plus 10 % task creation.

    .venv/bin/python bench/load.py [--seconds 30] [--connections 300] [--users 100] [--post-share 0.1]

Starts embedded MariaDB + Redis under ./var/bench (a fresh database), two real server
processes on it (the full app, as `run.py serve` builds it), signs up `--users` users
(SMS login; each starts with SIGNUP_CREDITS) and uploads one photo each. Then, for
`--seconds`, `--connections` concurrent workers (aiohttp client, one keep-alive
connection each, half on each instance) repeat: with probability `--post-share`
POST /api/v1/tasks (feature `bg-remove` on the built-in local vendor, a fresh
Idempotency-Key each), else GET /api/v1/me.

`--rolling` (issue 15): the two instances serve on unix sockets behind a real nginx
(ops/nginx/wardrobe.conf, as tests/test_nginx.py runs it) and the load goes through
nginx; a quarter into the run the first instance gets SIGTERM (its drain) and is
started again, half-way the second. Then it waits for every task to end (the
recovery job, every minute, takes over what a stopped instance left) and checks: no
5xx other than 503, tasks in the database = 202 answers, none left unfinished, and
`check-quota` clean (no credit lost or doubled).

Prints the answers per route and status, p50/p99 per route, the POST /tasks p99 over
the GET /me p99 (target ≤ 3), the tasks in the database against the 202 answers (must
be equal), and the 500s counted in each server's /metrics (must be 0). Exit status 1 when
a check fails. `--profile DIR` runs py-spy (when installed) on both servers for the load
window and writes each server's collapsed stacks (py-spy `raw`) into DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import random
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._support import free_port, services, wait_until_up  # noqa: E402

FEATURE = "bg-remove"
ME, TASKS = "GET /api/v1/me", "POST /api/v1/tasks"
TASK_ANSWERS = {200, 202, 402, 503}  # any other POST /tasks answer is a defect
TIMEOUT_S = 120.0


def serve(port: int) -> None:
    from aiohttp import web

    from server.app import create_app
    from server.config import load_settings
    from server.logging import setup_logging

    settings = load_settings()
    setup_logging(settings.log_level)
    web.run_app(create_app(settings), host="127.0.0.1", port=port, access_log=None, print=None)


def photo() -> bytes:
    from PIL import Image

    im = Image.new("RGB", (320, 240), "white")
    im.paste(Image.new("RGB", (160, 120), "navy"), (80, 60))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ set-up


async def sign_up(session: Any, base: str, n: int) -> tuple[str, str]:
    """A user with one uploaded photo: (access token, asset id)."""
    import aiohttp

    phone = f"137{n:08d}"
    async with session.post(f"{base}/api/v1/auth/sms-codes", json={"phone": phone, "purpose": "login"}) as r:
        assert r.status in (200, 202, 204), await r.text()
    async with session.get(f"{base}/api/v1/dev/sms/{phone}") as r:
        code = (await r.json())["code"]
    async with session.post(f"{base}/api/v1/auth/login", json={"phone": phone, "sms_code": code}) as r:
        token = str((await r.json())["access_token"])
    form = aiohttp.FormData()
    form.add_field("file", photo(), filename="me.png", content_type="image/png")
    headers = {"Authorization": f"Bearer {token}"}
    async with session.post(f"{base}/api/v1/assets", data=form, headers=headers) as r:
        assert r.status == 201, await r.text()
        asset = str((await r.json())["id"])
    return token, asset


# ------------------------------------------------------------------ the load


class Tally:
    def __init__(self) -> None:
        self.answers: Counter[tuple[str, int]] = Counter()
        self.latency: dict[str, list[float]] = {ME: [], TASKS: []}
        self.odd: list[str] = []  # unexpected POST /tasks answers, first few

    def add(self, route: str, status: int, seconds: float, body: bytes) -> None:
        self.answers[(route, status)] += 1
        self.latency[route].append(seconds)
        if route == TASKS and status not in TASK_ANSWERS and len(self.odd) < 5:
            self.odd.append(f"{status} {body[:200]!r}")


async def drive(
    bases: list[str], users: list[tuple[str, str]], seconds: float, connections: int, post_share: float
) -> Tally:
    import aiohttp

    tally = Tally()
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    deadline = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        token, asset = users[i % len(users)]
        base = bases[i % len(bases)]
        headers = {"Authorization": f"Bearer {token}"}
        body = {"feature": FEATURE, "inputs": {"image": asset}}
        # One connection per worker, as a real client population would hold.
        conn = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                if random.random() < post_share:
                    route = TASKS
                    key = {"Idempotency-Key": uuid.uuid4().hex}
                    call = session.post(f"{base}/api/v1/tasks", json=body, headers={**headers, **key})
                else:
                    route = ME
                    call = session.get(f"{base}/api/v1/me", headers=headers)
                try:
                    async with call as resp:
                        raw = await resp.read()
                        status = resp.status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raw, status = repr(exc).encode(), 0  # counted as its own "status"
                tally.add(route, status, time.perf_counter() - started, raw)

    await asyncio.gather(*(worker(i) for i in range(connections)))
    return tally


# ------------------------------------------------------------------ checks and report


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def mean_of(metrics_text: str, name: str, labels: str = "") -> tuple[float, int]:
    """(mean seconds, count) of one histogram series in a /metrics text."""
    values: dict[str, float] = {}
    for suffix in ("_sum", "_count"):
        head = f"{name}{suffix}{{{labels}}}" if labels else f"{name}{suffix} "
        for line in metrics_text.splitlines():
            if line.startswith(head.rstrip()):
                values[suffix] = float(line.rsplit(" ", 1)[1])
    count = int(values.get("_count", 0))
    return (values.get("_sum", 0.0) / count if count else float("nan")), count


def server_errors(metrics_text: str, status: str = "500") -> int:
    """Answers with `status` in one server's wardrobe_http_requests_total (500: a defect)."""
    total = 0
    for line in metrics_text.splitlines():
        if line.startswith("wardrobe_http_requests_total{") and f'status="{status}"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


async def metrics_of(base: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as r:
        return await r.text()


def count_tasks(url: str) -> dict[str, int]:
    """Tasks by status, straight from the database the servers share."""
    from urllib.parse import parse_qs, unquote, urlsplit

    import pymysql

    parts = urlsplit(url)
    socket = unquote(parse_qs(parts.query)["unix_socket"][0])
    conn = pymysql.connect(unix_socket=socket, user="root", database=parts.path.lstrip("/"))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT status, COUNT(*) FROM tasks GROUP BY status")
            return {str(s): int(n) for s, n in cur.fetchall()}
    finally:
        conn.close()


def report(args: argparse.Namespace, tally: Tally, tasks: dict[str, int], errors: list[int]) -> bool:
    print(
        f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs; "
        f"2 server processes, {args.connections} connections, {args.seconds:.0f} s, "
        f"{args.users} users, {args.post_share:.0%} POST /tasks ({FEATURE}, local vendor)"
    )
    print(f"{'route':<22}{'status':>7}{'answers':>10}")
    for (route, status), n in sorted(tally.answers.items()):
        print(f"{route:<22}{status:>7}{n:>10}")
    print(f"{'route':<22}{'answers':>10}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for route, values in tally.latency.items():
        rate = len(values) / args.seconds
        p50, p99 = pct(values, 0.5) * 1000, pct(values, 0.99) * 1000
        print(f"{route:<22}{len(values):>10}{rate:>9.0f}{p50:>9.0f}{p99:>9.0f}")
    ratio = pct(tally.latency[TASKS], 0.99) / pct(tally.latency[ME], 0.99)
    accepted = tally.answers[(TASKS, 202)]
    in_db = sum(tasks.values())
    odd = sum(
        n for (route, status), n in tally.answers.items() if route == TASKS and status not in TASK_ANSWERS
    )
    print(f"POST /tasks p99 / GET /me p99: {ratio:.2f} (target <= 3)")
    print(f"tasks in the database: {in_db} {dict(sorted(tasks.items()))}; 202 answers: {accepted}")
    print(f"POST /tasks answers other than 202/200/402/503: {odd} {tally.odd}")
    print(f"500 in /metrics: {errors} (server 1, server 2)")
    ok = in_db == accepted and odd == 0 and sum(errors) == 0
    print("checks:", "OK" if ok else "FAILED")
    return ok


async def set_up_users(bases: list[str], n: int) -> list[tuple[str, str]]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        sem = asyncio.Semaphore(16)

        async def one(i: int) -> tuple[str, str]:
            async with sem:
                return await sign_up(session, bases[i % len(bases)], i)

        return list(await asyncio.gather(*(one(i) for i in range(n))))


def profile(pids: list[int], seconds: float, out: Path) -> list[subprocess.Popen[bytes]]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    out.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(int(seconds)),
                "--rate",
                "50",
                "--format",
                "raw",
                "--output",
                str(out / f"server{i + 1}.txt"),
                "--nonblocking",
            ],
        )
        for i, pid in enumerate(pids)
    ]


def main(args: argparse.Namespace) -> int:
    with services("bench_load", redis_db=14) as ready:
        env = {
            **ready.env,
            "SMS_RESEND_INTERVAL": "0",
            "SMS_IP_LIMIT": "1000000",
            "SMS_DAILY_CAP": "1000000",
            "SIGNUP_CREDITS": "100000",
            **dict(kv.split("=", 1) for kv in args.set),
        }
        ports = [free_port(), free_port()]
        for port in ports:
            argv = [sys.executable, __file__, "--serve", "--port", str(port)]
            ready.procs.append(subprocess.Popen(argv, env=env))
        bases = [f"http://127.0.0.1:{p}" for p in ports]
        for base, proc in zip(bases, ready.procs, strict=True):
            wait_until_up(f"{base}/healthz", proc)
        users = asyncio.run(set_up_users(bases, args.users))
        spies = profile([p.pid for p in ready.procs], args.seconds, args.profile) if args.profile else []
        tally = asyncio.run(drive(bases, users, args.seconds, args.connections, args.post_share))
        for spy in spies:
            spy.wait(60)
        tasks = count_tasks(env["DATABASE_URL"])
        texts = [asyncio.run(metrics_of(base)) for base in bases]
        errors = [server_errors(t) for t in texts]
        ok = report(args, tally, tasks, errors)
        for i, text in enumerate(texts, 1):
            duration = "wardrobe_http_request_duration_seconds"
            me = mean_of(text, duration, 'method="GET",route="/api/v1/me"')
            post = mean_of(text, duration, 'method="POST",route="/api/v1/tasks"')
            acquire = mean_of(text, "wardrobe_db_pool_acquire_seconds")
            print(
                f"server {i} (its own clock): GET /me mean {me[0] * 1000:.1f} ms, POST /tasks mean "
                f"{post[0] * 1000:.0f} ms, MySQL pool acquire mean {acquire[0] * 1000:.1f} ms "
                f"over {acquire[1]}"
            )
        return 0 if ok else 1


# ------------------------------------------------------------------ rolling restart (issue 15)


async def restart_each(instances: list[Any], seconds: float) -> list[str]:
    """SIGTERM and restart each instance in turn, a quarter and a half into the run."""
    done = []
    for instance in instances:
        await asyncio.sleep(seconds / 4)
        began = time.perf_counter()
        code = await instance.stop()  # SIGTERM: the drain
        instance.start()
        await instance.ready()
        done.append(f"{instance.name}: exit {code}, back in {time.perf_counter() - began:.1f} s")
    return done


def quota_problems(url: str) -> list[str]:
    from server.config import Settings
    from server.credits.ledger import check_all
    from server.db import Database
    from server.metrics import Metrics

    async def go() -> list[str]:
        settings = Settings(_env_file=None, app_env="test", database_url=url)  # type: ignore[call-arg]
        db = await Database.connect(settings.database(), settings, Metrics())
        try:
            _, problems = await check_all(db)
            return [str(p) for p in problems]
        finally:
            await db.close()

    return asyncio.run(go())


def rolling(args: argparse.Namespace) -> int:
    import tempfile

    from tests.cluster_support import Instance, Nginx

    with services("bench_rolling", redis_db=13) as ready:
        env = {
            **ready.env,
            "SMS_RESEND_INTERVAL": "0",
            "SMS_IP_LIMIT": "1000000",
            "SMS_DAILY_CAP": "1000000",
            "SIGNUP_CREDITS": "100000",
            "TRUSTED_PROXY_HOPS": "1",
            "CRON_ENABLED": "true",  # task recovery takes over what a stopped instance left
            "SHUTDOWN_TIMEOUT": "10",
            **dict(kv.split("=", 1) for kv in args.set),
        }
        base = Path(tempfile.mkdtemp(prefix="rolling-"))
        instances = [Instance(f"instance{n}", base, env) for n in (1, 2)]

        async def run() -> tuple[Tally, list[str]]:
            for instance in instances:
                instance.start()
            await asyncio.gather(*(i.ready() for i in instances))
            nginx = Nginx(base, [i.sock for i in instances])
            await nginx.start()
            try:
                users = await set_up_users([nginx.url], args.users)
                roll = asyncio.ensure_future(restart_each(instances, args.seconds))
                tally = await drive([nginx.url], users, args.seconds, args.connections, args.post_share)
                return tally, await roll
            finally:
                await nginx.stop()

        try:
            tally, restarts = asyncio.run(run())
            deadline = time.monotonic() + 150
            tasks = count_tasks(env["DATABASE_URL"])
            while any(tasks.get(s, 0) for s in ("new", "queued", "running")) and time.monotonic() < deadline:
                time.sleep(2)
                tasks = count_tasks(env["DATABASE_URL"])
        finally:

            async def stop_all() -> None:
                await asyncio.gather(*(i.stop() for i in instances))

            asyncio.run(stop_all())
        problems = quota_problems(env["DATABASE_URL"])
    fives = {s: n for (_, s), n in tally.answers.items() if 500 <= s < 600 and s != 503}
    unfinished = sum(tasks.get(s, 0) for s in ("new", "queued", "running"))
    print(f"rolling restart behind nginx: {args.connections} connections, {args.seconds:.0f} s")
    for line in restarts:
        print("  restarted", line)
    print(f"{'route':<22}{'status':>7}{'answers':>10}")
    for (route, status), n in sorted(tally.answers.items()):
        print(f"{route:<22}{status:>7}{n:>10}")
    accepted = tally.answers[(TASKS, 202)]
    print(f"5xx other than 503: {sum(fives.values())} {fives}")
    print(
        f"tasks in the database: {sum(tasks.values())} {dict(sorted(tasks.items()))}; 202 answers: {accepted}"
    )
    print(f"tasks left unfinished: {unfinished}; check-quota differences: {len(problems)} {problems[:3]}")
    ok = not fives and sum(tasks.values()) == accepted and not unfinished and not problems
    print("checks:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--post-share", type=float, default=0.1)
    parser.add_argument(
        "--profile", type=Path, help="py-spy collapsed stacks of both servers into this folder"
    )
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="server setting")
    parser.add_argument("--rolling", action="store_true", help="restart each instance behind nginx")
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--port", type=int)
    ns = parser.parse_args()
    if ns.serve:
        serve(ns.port)
    else:
        sys.exit(rolling(ns) if ns.rolling else main(ns))
