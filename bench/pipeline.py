"""Pipeline benchmarks, one function per section.

    .venv/bin/python bench/pipeline.py             # every section
    .venv/bin/python bench/pipeline.py vendor      # one section

Sections:

- `vendor`: one VendorActor (generic HTTP adapter) against the in-process fake vendor
  (tests/fakes/vendor.py) answering every call after a fixed 100 ms, with concurrency 5:
  the limit is 5 / 0.1 s = 50 calls a second. A burst of CALLS calls goes in at once
  (the mailbox holds them all); calls per second = CALLS / (time from the first ask to
  the last answer). Target: ratio to the limit ≥ 0.95, and the fake's own highest
  in-flight count exactly 5. Best of ROUNDS rounds, interleaved with a baseline: the
  same burst through a bare `asyncio.Semaphore(5)` and the ClientSession.
- `tasks`: end-to-end tasks per second with an instant vendor: the whole app (HTTP,
  auth, credits through the UserActor, task rows, lease, runner, vendor actor, output
  asset, confirm) on private MariaDB + Redis, one user creating TASKS tasks of a
  one-call feature on the fake vendor with no latency, 20 requesters at once; tasks/s
  = TASKS / (first POST → last task succeeded). Two rounds on one app: the first meets
  a fresh process (pools filling, caches cold), the second is steady. The baseline in
  the same run is the same number of bare vendor calls through the VendorActor, so the
  ratio says what the task machinery costs around one call. BENCH_TASKS=600 gives
  steadier figures than the default 200.

Prints a table, then lines for bench/RESULTS.md. No assertions; about 20 s.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
from aiohttp.test_utils import TestServer
from loguru import logger
from PIL import Image

from actors import ActorSystem
from server.vendors.adapters import HttpAdapter
from server.vendors.config import VendorConfig, VendorLimits, http_operations
from server.vendors.facade import Vendors
from tests.fakes.vendor import FakeVendor

ROUNDS = 3
CALLS = 300
LATENCY = 0.1
CONCURRENCY = 5


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(out, "PNG")
    return out.getvalue()


async def _bare_burst(session: aiohttp.ClientSession, url: str, key: str, image: bytes) -> int:
    """The baseline: the same burst through an asyncio.Semaphore and the session alone."""
    gate = asyncio.Semaphore(CONCURRENCY)
    body = {"operation": "echo", "params": {}, "inputs": {"image": base64.b64encode(image).decode()}}

    async def one() -> bytes:
        async with gate, session.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
            return await resp.read()

    return len(await asyncio.gather(*(one() for _ in range(CALLS))))


async def _vendor_round(image: bytes, *, bare: bool) -> tuple[float, int, int]:
    """One burst: (calls per second, the fake's max in flight, calls answered)."""
    fake = FakeVendor(latency=LATENCY)
    server = TestServer(fake.app())
    await server.start_server()
    fake.base_url = str(server.make_url("")).rstrip("/")
    limits = VendorLimits(
        timeout=10.0,
        concurrency=CONCURRENCY,
        qps=0.0,
        retries=0,
        backoff=0.1,
        backoff_max=1.0,
        mailbox=CALLS,
        queue_timeout=60.0,
        breaker_threshold=0,
        breaker_cooldown=30.0,
        poll_interval=0.1,
        max_result_bytes=1024 * 1024,
    )
    config = VendorConfig(kind="http", base_url=f"{fake.base_url}/http", operations={"echo": ["image"]})
    try:
        async with aiohttp.ClientSession() as session, ActorSystem() as system:
            vendors = Vendors(system)
            adapter = HttpAdapter(
                session, f"{fake.base_url}/http", fake.api_key, http_operations("fake", config)
            )
            vendors.add("fake", adapter, limits)
            await vendors.call("fake", "echo", {"image": image})  # warm the connection pool
            fake.max_in_flight = 0
            started = time.perf_counter()
            if bare:
                answered = await _bare_burst(session, f"{fake.base_url}/http/echo", fake.api_key, image)
            else:
                calls = (vendors.call("fake", "echo", {"image": image}) for _ in range(CALLS))
                answered = len(await asyncio.gather(*calls))
            elapsed = time.perf_counter() - started
            await vendors.close(1.0)
    finally:
        await server.close()
    return CALLS / elapsed, fake.max_in_flight, answered


async def vendor() -> list[str]:
    """Calls per second through one VendorActor, as a ratio to its limit; rounds alternate
    with a bare semaphore-and-session baseline so both see the same machine."""
    image = _png()
    limit = CONCURRENCY / LATENCY
    best: dict[str, tuple[float, int]] = {"actor": (0.0, 0), "bare": (0.0, 0)}
    peaks: dict[str, int] = {"actor": 0, "bare": 0}
    for n in range(1, ROUNDS + 1):
        for target in ("bare", "actor"):
            rate, peak, answered = await _vendor_round(image, bare=target == "bare")
            peaks[target] = max(peaks[target], peak)
            best[target] = max(best[target], (rate, peak))
            print(
                f"  round {n} {target:<5}: {rate:6.2f} calls/s  ratio {rate / limit:.3f}  "
                f"max in flight {peak}  ({answered} answered)"
            )
    for target in ("bare", "actor"):
        rate = best[target][0]
        print(f"  best {target}: {rate:.2f} calls/s of a {limit:.0f}/s limit = {rate / limit:.3f}")
    head = f"fake vendor at {LATENCY * 1000:.0f} ms, concurrency {CONCURRENCY}, burst of {CALLS}"
    return [
        "| target | calls/s | limit | ratio to the limit | fake's max in flight |",
        "|---|---|---|---|---|",
        f"| bare `asyncio.Semaphore(5)` + ClientSession, {head} | {best['bare'][0]:.1f} | {limit:.0f}/s "
        f"| {best['bare'][0] / limit:.3f} | {peaks['bare']} |",
        f"| **VendorActor** (HttpAdapter), {head} | {best['actor'][0]:.1f} | {limit:.0f}/s "
        f"| **{best['actor'][0] / limit:.3f}** | **{peaks['actor']}** |",
    ]


TASKS = int(os.environ.get("BENCH_TASKS", "200"))  # more for steadier figures
REQUESTERS = 20


async def tasks() -> list[str]:
    """End-to-end tasks per second with an instant vendor."""
    import json
    import tempfile

    from server.app import create_app
    from server.config import Settings
    from server.embedded import EmbeddedMariaDB, EmbeddedRedis, ensure_database
    from server.keys import db_key, vendors_key

    image = _png()
    fake = FakeVendor()
    fake_server = TestServer(fake.app())
    await fake_server.start_server()
    fake.base_url = str(fake_server.make_url("")).rstrip("/")
    with tempfile.TemporaryDirectory(prefix="bench-tasks-") as tmp:
        mariadb, redis = EmbeddedMariaDB(Path(tmp)), EmbeddedRedis(Path(tmp), persist=False)
        mariadb.start()
        redis.start()
        try:
            ensure_database(mariadb, "bench")
            settings = Settings(  # type: ignore[call-arg]
                _env_file=None,
                app_env="test",
                database_url=mariadb.url("bench"),
                redis_url=redis.url(0),
                var_dir=Path(tmp),
                cron_enabled=False,
                signup_credits=2 * TASKS,
                argon2_time_cost=1,
                argon2_memory_kib=8,
                task_concurrency=32,
                vendors={
                    "fake": {
                        "kind": "http",
                        "base_url": f"{fake.base_url}/http",
                        "api_key": fake.api_key,
                        "operations": {"enhance": ["image"]},
                        "concurrency": 16,
                        "retries": 0,
                    }
                },
            )
            app = create_app(settings)
            server = TestServer(app)
            await server.start_server()
            base = str(server.make_url("")).rstrip("/")
            pipeline = {
                "steps": [{"id": "e", "type": "call", "vendor": "fake", "operation": "enhance",
                           "inputs": {"image": "$input.image"}}],
                "output": "e",
            }  # fmt: skip
            async with aiohttp.ClientSession() as http:
                await app[db_key].execute(
                    "INSERT INTO features (slug, name, cost, inputs, pipeline) "
                    "VALUES ('one', 'One', 1, %s, %s)",
                    json.dumps({"image": {"type": "image"}}),
                    json.dumps(pipeline),
                )
                await http.post(
                    f"{base}/api/v1/auth/sms-codes", json={"phone": "13800000001", "purpose": "login"}
                )
                code = (await (await http.get(f"{base}/api/v1/dev/sms/13800000001")).json())["code"]
                login = await (await http.post(
                    f"{base}/api/v1/auth/login", json={"phone": "13800000001", "sms_code": code}
                )).json()  # fmt: skip
                auth = {"Authorization": f"Bearer {login['access_token']}"}
                form = aiohttp.FormData()
                form.add_field("file", image, filename="x.png", content_type="image/png")
                asset = await (await http.post(f"{base}/api/v1/assets", data=form, headers=auth)).json()

                # Baseline: the same number of bare calls through the vendor actor.
                vendors = app[vendors_key]
                started = time.perf_counter()
                sem = asyncio.Semaphore(REQUESTERS)

                async def bare_one() -> None:
                    async with sem:
                        await vendors.call("fake", "enhance", {"image": image})

                await asyncio.gather(*(bare_one() for _ in range(TASKS)))
                bare_rate = TASKS / (time.perf_counter() - started)

                db = app[db_key]
                finished = busy = 0

                async def round_of(name: str) -> tuple[float, float]:
                    """TASKS tasks by REQUESTERS requesters: (tasks/s, this process's CPU ms a task)."""
                    nonlocal finished, busy
                    work = iter(range(TASKS))
                    started, cpu = time.perf_counter(), time.process_time()

                    async def requester() -> None:
                        nonlocal busy
                        for i in work:
                            while True:  # a full runner answers BUSY: the client tries again soon
                                resp = await http.post(
                                    f"{base}/api/v1/tasks",
                                    json={"feature": "one", "inputs": {"image": asset["id"]}},
                                    headers={**auth, "Idempotency-Key": f"bench-{name}-{i}"},
                                )
                                if resp.status != 503:
                                    break
                                busy += 1
                                await asyncio.sleep(0.05)
                            assert resp.status == 202, await resp.text()

                    await asyncio.gather(*(requester() for _ in range(REQUESTERS)))
                    finished += TASKS
                    while (
                        await db.fetchval("SELECT COUNT(*) FROM tasks WHERE status = 'succeeded'") < finished
                    ):
                        failed = await db.fetchval(
                            "SELECT COUNT(*) FROM tasks WHERE status IN ('failed', 'cancelled')"
                        )
                        if failed:
                            raise SystemExit(f"{failed} tasks failed")
                        await asyncio.sleep(0.01)
                    return TASKS / (time.perf_counter() - started), (time.process_time() - cpu) * 1000 / TASKS

                # The first round meets a fresh process: its pools fill (MySQL, Redis, the
                # requesters' HTTP connections) and its caches warm; the second is steady.
                rate, cpu_ms = await round_of("cold")
                warm_rate, warm_cpu_ms = await round_of("warm")
                balance = await db.fetchval("SELECT balance FROM quota_accounts")
            await server.close()
        finally:
            redis.stop()
            mariadb.stop()
            await fake_server.close()
    print(f"  bare vendor calls: {bare_rate:.0f}/s")
    for name, r, c in (("cold", rate, cpu_ms), ("warm", warm_rate, warm_cpu_ms)):
        print(
            f"  end-to-end tasks, {name}: {r:.0f}/s; ratio {r / bare_rate:.3f}; CPU of this process "
            f"(app, requesters, fake vendor) {c:.2f} ms a task"
        )
    print(f"  credits left after {2 * TASKS} tasks of cost 1: {balance} (expected 0); BUSY answers: {busy}")
    return [
        "",
        f"| end to end, instant vendor, {TASKS} tasks a round, {REQUESTERS} requesters | tasks/s "
        "| baseline: bare vendor calls/s | ratio | CPU ms a task |",
        "|---|---|---|---|---|",
        f"| POST /tasks → succeeded, first round (cold) | **{rate:.0f}** | {bare_rate:.0f} "
        f"| {rate / bare_rate:.3f} | {cpu_ms:.2f} |",
        f"| POST /tasks → succeeded, second round (warm) | **{warm_rate:.0f}** | {bare_rate:.0f} "
        f"| {warm_rate / bare_rate:.3f} | {warm_cpu_ms:.2f} |",
    ]


SECTIONS: dict[str, Callable[[], Awaitable[list[str]]]] = {"vendor": vendor, "tasks": tasks}


async def main(names: list[str]) -> None:
    logger.remove()  # a warning per failed call would drown the figures
    python = f"Python {platform.python_version()}"
    print(f"{python} on {platform.machine()}, {os.cpu_count()} CPUs, {datetime.date.today()}")
    lines: list[str] = []
    for name in names or list(SECTIONS):
        print(f"\n[{name}]")
        lines += await SECTIONS[name]()
    print("\nFor bench/RESULTS.md:")
    for line in lines:
        print(line)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
