"""Cluster-wide vendor limits (issue 15): three real server processes share one fake vendor.

    .venv/bin/python bench/cluster.py

Three `run.py serve` processes on private MariaDB + Redis (bench/_support.py), each with
the fake vendor (tests/fakes/vendor.py, in this process, every call answered after
100 ms) configured as `fake` with `concurrency` 5: the cluster-wide limit is 5 calls in
flight, i.e. 5 / 0.1 s = 50 calls a second. A feature that forks 10 branches on the
fake (join `any`) is defined through the admin API; a user posts TASKS tasks spread
round-robin over the three instances.

1. `steady`: all three live. Prints the fake's highest in-flight count (must be ≤ 5)
   and calls a second = calls / (first call → last answer), with the ratio to 50/s
   (target ≥ 0.9).
2. `kill`: the same load again; once a third of its calls are answered, one instance
   gets SIGKILL. Prints how long until its permits are gone from Redis (its leases
   expire: ≤ VENDOR_LEASE_TTL), the fake's highest in-flight count, and what became of
   every task (the killed instance's are recovered by the task-recovery cron job, once
   a minute, after TASK_LEASE_TTL; see docs/tasks.md "Leases and recovery").

Prints the figures, then lines for bench/RESULTS.md. No assertions; 1–3 minutes.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from PIL import Image

from bench._support import ROOT, free_port, services, wait_until_up
from tests.fakes.vendor import FakeVendor

INSTANCES = 3
TASKS = 30
BRANCHES = 10
LATENCY = 0.1
CONCURRENCY = 5
LIMIT = CONCURRENCY / LATENCY  # calls a second
LEASE_TTL = 10.0  # VENDOR_LEASE_TTL
TASK_LEASE_TTL = 5.0
ADMIN = ("13900000000", "bench-admin-pass-11")
USER = "13800000001"
FINISHED = {"succeeded", "failed", "cancelled"}


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), "navy").save(out, "PNG")
    return out.getvalue()


def _pipeline() -> dict[str, Any]:
    branches = [
        {"id": f"b{i}", "vendor": "fake", "operation": "enhance", "inputs": {"image": "$input.image"}}
        for i in range(BRANCHES)
    ]
    return {
        "steps": [
            {"id": "f", "type": "fork", "branches": branches},
            {"id": "j", "type": "join", "fork": "f", "mode": "any"},
        ],
        "output": "j",
    }


class Cluster:
    def __init__(self, env: dict[str, str], procs: list[subprocess.Popen[bytes]]) -> None:
        self.env = env
        self.procs = procs
        self.ports: list[int] = []

    def start(self, n: int) -> None:
        for i in range(n):
            port = free_port()
            log = open(ROOT / "var" / "bench" / f"cluster-{i}.log", "wb")  # noqa: SIM115 - lives with the process
            proc = subprocess.Popen(
                [sys.executable, "run.py", "serve", "--host", "127.0.0.1", "--port", str(port)],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            self.procs.append(proc)
            self.ports.append(port)
            wait_until_up(f"http://127.0.0.1:{port}/readyz", proc)

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"


async def _json(resp: aiohttp.ClientResponse) -> Any:
    body = await resp.json()
    if resp.status >= 400:
        raise SystemExit(f"{resp.method} {resp.url}: {resp.status} {body}")
    return body


async def _setup(http: aiohttp.ClientSession, base: str) -> tuple[dict[str, str], str]:
    """The feature through the admin API; a user with an uploaded image."""
    login = await _json(
        await http.post(f"{base}/api/v1/auth/login", json={"phone": ADMIN[0], "password": ADMIN[1]})
    )
    admin = {"Authorization": f"Bearer {login['access_token']}"}
    feature = {
        "slug": "fan-out",
        "name": "Fan out",
        "cost": 1,
        "inputs": {"image": {"type": "image"}},
        "pipeline": _pipeline(),
    }
    await _json(await http.post(f"{base}/api/v1/admin/features", json=feature, headers=admin))
    await http.post(f"{base}/api/v1/auth/sms-codes", json={"phone": USER, "purpose": "login"})
    code = (await _json(await http.get(f"{base}/api/v1/dev/sms/{USER}")))["code"]
    login = await _json(await http.post(f"{base}/api/v1/auth/login", json={"phone": USER, "sms_code": code}))
    auth = {"Authorization": f"Bearer {login['access_token']}"}
    form = aiohttp.FormData()
    form.add_field("file", _png(), filename="x.png", content_type="image/png")
    asset = await _json(await http.post(f"{base}/api/v1/assets", data=form, headers=auth))
    return auth, str(asset["id"])


async def _post_tasks(
    http: aiohttp.ClientSession,
    cluster: Cluster,
    auth: dict[str, str],
    asset: str,
    tag: str,
    spread: int = INSTANCES,
) -> dict[str, int]:
    """TASKS tasks, round-robin over the first `spread` instances: task id -> instance."""

    async def one(i: int) -> tuple[str, int]:
        where = i % spread
        resp = await http.post(
            f"{cluster.url(where)}/api/v1/tasks",
            json={"feature": "fan-out", "inputs": {"image": asset}},
            headers={**auth, "Idempotency-Key": f"{tag}-{i}"},
        )
        return str((await _json(resp))["id"]), where

    return dict(await asyncio.gather(*(one(i) for i in range(TASKS))))


async def _statuses(
    http: aiohttp.ClientSession, base: str, auth: dict[str, str], ids: dict[str, int]
) -> dict[str, dict[str, Any]]:
    out = {}
    for task_id in ids:
        async with http.get(f"{base}/api/v1/tasks/{task_id}", headers=auth) as resp:
            out[task_id] = await resp.json()
    return out


async def _until_finished(
    http: aiohttp.ClientSession, base: str, auth: dict[str, str], ids: dict[str, int], limit: float
) -> tuple[dict[str, dict[str, Any]], float]:
    started = time.perf_counter()
    while True:
        tasks = await _statuses(http, base, auth, ids)
        if all(t.get("status") in FINISHED for t in tasks.values()) or time.perf_counter() - started > limit:
            return tasks, time.perf_counter() - started
        await asyncio.sleep(0.5)


async def _calls_per_second(fake: FakeVendor, total: int) -> tuple[float, int]:
    """Wait for `total` more answered calls: their rate from the first call on, and the max in flight."""
    fake.max_in_flight = fake.in_flight
    base_calls, base_done = fake.calls, fake.completed
    await fake.until(lambda: fake.calls > base_calls)
    first = time.perf_counter()
    await fake.until(lambda: fake.completed >= base_done + total)
    return total / (time.perf_counter() - first), fake.max_in_flight


async def _live_leases(redis: aioredis.Redis, prefix: bytes) -> int:
    """Leases of the process `prefix` not expired yet: they still count against the limit
    (an expired one is dropped by the next acquire; it no longer counts)."""
    seconds, micros = await redis.time()
    now_ms = seconds * 1000 + micros // 1000
    leases = await redis.zrange("wardrobe:vendor:fake:leases", 0, -1, withscores=True)
    return sum(1 for member, expiry in leases if member.startswith(prefix) and expiry > now_ms)


async def main() -> None:
    python = f"Python {platform.python_version()} on {platform.machine()}"
    print(f"{python}, {os.cpu_count()} CPUs, {datetime.date.today()}")
    fake = FakeVendor(latency=LATENCY)
    fake_server = TestServer(fake.app(), host="127.0.0.1")
    await fake_server.start_server()
    fake.base_url = str(fake_server.make_url("")).rstrip("/")
    vendors = {
        "fake": {
            "kind": "http",
            "base_url": f"{fake.base_url}/http",
            "api_key": fake.api_key,
            "operations": {"enhance": ["image"]},
            "concurrency": CONCURRENCY,
            "queue_timeout": 300,
            "mailbox": 400,  # every branch of every task of an instance may queue at once
        }
    }
    lines: list[str] = []
    try:
        with services("bench_cluster", 9) as svc:
            env = {
                **svc.env,
                "VAR_DIR": str(ROOT / "var" / "bench" / "cluster"),
                "VENDORS": json.dumps(vendors),
                "VENDOR_LEASE_TTL": str(LEASE_TTL),
                "VENDOR_EXPECTED_INSTANCES": str(INSTANCES),
                "TASK_LEASE_TTL": str(TASK_LEASE_TTL),
                "CRON_ENABLED": "true",  # the task-recovery job
                # Every task runs at once: a run waiting for a TASK_CONCURRENCY slot longer than
                # TASK_LEASE_TTL loses its lease (it is only renewed once the run starts).
                "TASK_CONCURRENCY": str(TASKS + 2),
                "ADMIN_PHONE": ADMIN[0],
                "ADMIN_PASSWORD": ADMIN[1],
                "SIGNUP_CREDITS": "1000",
                "ARGON2_TIME_COST": "1",
                "ARGON2_MEMORY_KIB": "8",
            }
            cluster = Cluster(env, svc.procs)
            await asyncio.to_thread(cluster.start, INSTANCES)
            redis = aioredis.Redis.from_url(env["REDIS_URL"])
            async with aiohttp.ClientSession() as http:
                auth, asset = await _setup(http, cluster.url(0))
                calls = TASKS * BRANCHES

                print(f"\n[baseline] instance 0 alone: {TASKS} tasks × {BRANCHES} branches")
                measure = asyncio.ensure_future(_calls_per_second(fake, calls))
                await asyncio.sleep(0)
                ids = await _post_tasks(http, cluster, auth, asset, "alone", spread=1)
                alone, alone_peak = await measure
                await _until_finished(http, cluster.url(0), auth, ids, 60)
                print(f"  max in flight {alone_peak}; vendor calls/s: {alone:.1f}")
                print(f"  ratio to the {LIMIT:.0f}/s limit: {alone / LIMIT:.3f}")

                shape = f"{INSTANCES} instances, {TASKS} tasks × {BRANCHES} branches"
                print(f"\n[steady] {shape}, limit {CONCURRENCY} in flight")
                measure = asyncio.ensure_future(_calls_per_second(fake, calls))
                await asyncio.sleep(0)  # it takes its baseline before the first POST
                ids = await _post_tasks(http, cluster, auth, asset, "steady")
                rate, peak = await measure
                tasks, _ = await _until_finished(http, cluster.url(0), auth, ids, 60)
                outcome = Counter(t["status"] for t in tasks.values())
                print(f"  max in flight at the vendor: {peak} (limit {CONCURRENCY})")
                print(f"  vendor calls/s: {rate:.1f}; ratio to the {LIMIT:.0f}/s limit: {rate / LIMIT:.3f}")
                print(f"  ratio to one instance alone in this run: {rate / alone:.3f}")
                print(f"  tasks: {dict(outcome)}")

                print(f"\n[kill] the same load; SIGKILL to instance 2 after {calls // 3} answered calls")
                fake.max_in_flight = fake.in_flight
                done_before = fake.completed
                ids = await _post_tasks(http, cluster, auth, asset, "kill")
                await fake.until(lambda: fake.completed >= done_before + calls // 3)
                victim = cluster.procs[2]
                prefix = f"{socket.gethostname()}:{victim.pid}:".encode()
                held = [
                    m
                    for m in await redis.zrange("wardrobe:vendor:fake:leases", 0, -1)
                    if m.startswith(prefix)
                ]
                victim.send_signal(signal.SIGKILL)
                killed_at = time.perf_counter()
                victim.wait()
                while await _live_leases(redis, prefix):  # noqa: ASYNC110 - Redis has no event for it
                    await asyncio.sleep(0.05)
                returned = time.perf_counter() - killed_at
                tasks, took = await _until_finished(http, cluster.url(0), auth, ids, 240)
                by_instance: dict[int, Counter[str]] = {i: Counter() for i in range(INSTANCES)}
                for task_id, where in ids.items():
                    by_instance[where][tasks[task_id].get("status", "?")] += 1
                print(f"  leases the killed instance held: {len(held)}; expired {returned:.2f} s after it")
                print(f"  after the kill (lease TTL {LEASE_TTL:g} s)")
                print(f"  max in flight at the vendor: {fake.max_in_flight} (limit {CONCURRENCY})")
                print(f"  every task finished {took:.1f} s after the kill: {by_instance}")
                errors = [t.get("error") for t in tasks.values() if t.get("status") != "succeeded"]
                if errors:
                    print(f"  errors: {errors}")
            await redis.aclose()
        per = ", ".join(f"{i}: {dict(c)}" for i, c in by_instance.items())
        lines = [
            f"| steady: {shape} | max in flight **{peak}** (limit {CONCURRENCY}) "
            f"| **{rate:.1f}** calls/s | ratio to {LIMIT:.0f}/s: **{rate / LIMIT:.3f}** "
            f"| one instance alone: {alone:.1f} calls/s (max in flight {alone_peak}); "
            f"ratio {rate / alone:.3f} |",
            f"| kill -9 one instance mid-run | its {len(held)} lease(s) expired "
            f"**{returned:.2f} s** after it "
            f"(TTL {LEASE_TTL:g} s) | max in flight {fake.max_in_flight} "
            f"| tasks by instance: {per}; all finished {took:.0f} s after the kill | |",
        ]
    finally:
        await fake_server.close()
    print("\nFor bench/RESULTS.md:")
    for line in lines:
        print(line)


if __name__ == "__main__":
    asyncio.run(main())
