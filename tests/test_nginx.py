"""nginx (ops/nginx/wardrobe.conf) in front of two real `run.py serve --path` instances
sharing one database and Redis: REST, the WebSocket upgrade, client addresses, request
ids, body limits, /metrics kept internal, and a rolling restart under load."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis as redis_sync

from server.config import Settings
from server.credits.ledger import check_all
from server.db import Database
from server.metrics import Metrics
from tests.cluster_support import NGINX, Client, Instance, Nginx, image_bytes

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed (ops/bootstrap.sh --all)"),
]

_phones = itertools.count(30_000_000)


def new_phone() -> str:
    return f"137{next(_phones):08d}"


class Cluster:
    def __init__(self, instances: list[Instance], nginx: Nginx, settings: Settings) -> None:
        self.instances = instances
        self.nginx = nginx
        self.settings = settings

    def redis(self) -> redis_sync.Redis:
        return redis_sync.Redis.from_url(str(self.settings.redis_url))

    async def check_quota(self) -> list[Any]:
        db = await Database.connect(self.settings.database(), self.settings, Metrics())
        try:
            _, problems = await check_all(db)
        finally:
            await db.close()
        return problems

    def explain(self) -> str:
        logs = "\n".join(f"--- {i.name}\n{i.output()[-3000:]}" for i in self.instances)
        return f"{logs}\n--- nginx error.log\n{self.nginx.error_log()[-3000:]}"


@pytest.fixture
async def cluster(make_settings: Any, tmp_path: Path) -> AsyncIterator[Cluster]:
    settings: Settings = make_settings()
    env = {
        "DATABASE_URL": str(settings.database_url),
        "REDIS_URL": str(settings.redis_url),
        "VAR_DIR": str(tmp_path / "var"),
        "TRUSTED_PROXY_HOPS": "1",
        "SMS_IP_LIMIT": "4",
        "CRON_ENABLED": "false",
        "LOG_LEVEL": "INFO",
    }
    instances = [Instance(str(n), tmp_path, env) for n in (1, 2)]
    instances[0].start()
    await instances[0].ready()  # the first one migrates; the second finds it done
    instances[1].start()
    await instances[1].ready()
    nginx = Nginx(tmp_path, [i.sock for i in instances])
    await nginx.start()
    try:
        yield Cluster(instances, nginx, settings)
    finally:
        await nginx.stop()
        for instance in instances:
            await instance.stop()


async def events_after(
    ws: aiohttp.ClientWebSocketResponse, count: int, within: float = 30
) -> list[dict[str, Any]]:
    """The next `count` event frames (other frames skipped)."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(within):
        while len(events) < count:
            frame = json.loads(await ws.receive_str())
            if frame["type"] == "event":
                events.append(frame)
    return events


async def test_a_user_journey_and_a_websocket_resume_go_through_nginx_to_both_instances(
    cluster: Cluster,
) -> None:
    user = Client(cluster.nginx.url)
    try:
        phone = new_phone()
        await user.register(phone)
        await user.login(phone)
        ws = await user.session.ws_connect(cluster.nginx.url + "/api/v1/ws")
        await ws.send_json({"type": "auth", "token": user.token})
        ready = json.loads(await ws.receive_str())
        assert ready["type"] == "ready", ready
        start = int(ready["last_seq"])

        first = await user.create_task(await user.upload(image_bytes("purple")), "journey-1")
        assert (await user.finished(first))["status"] == "succeeded", cluster.explain()
        seen = await events_after(ws, 1)
        last = seen[-1]["seq"]
        await ws.close()

        # Events published while the client is away are replayed after its last seq.
        second = await user.create_task(await user.upload(image_bytes("green")), "journey-2")
        assert (await user.finished(second))["status"] == "succeeded", cluster.explain()
        status, quota, _ = await user.call("GET", "/api/v1/me/quota")
        assert status == 200, quota
        ws = await user.session.ws_connect(cluster.nginx.url + "/api/v1/ws")
        await ws.send_json({"type": "auth", "token": user.token, "after_seq": last})
        assert json.loads(await ws.receive_str())["type"] == "ready"
        redis = cluster.redis()
        try:
            newest = int(redis.get(f"ev:{{{user.user_id}}}:seq") or 0)
        finally:
            redis.close()
        replay = await events_after(ws, newest - last)
        assert [e["seq"] for e in replay] == list(range(last + 1, newest + 1))
        assert any(e["data"].get("task_id") == second for e in replay), replay
        await ws.close()
        assert start < last < newest
    finally:
        await user.close()
    assert await cluster.check_quota() == []
    # Both instances served: nginx's log names both upstream sockets.
    used = set(re.findall(r"up=unix:(\S+)", cluster.nginx.access_log()))
    assert {str(i.sock) for i in cluster.instances} <= used


async def test_per_ip_limits_count_the_address_nginx_saw_not_one_the_client_claims(cluster: Cluster) -> None:
    """SMS_IP_LIMIT=4: the fifth code from 127.0.0.2 is refused whatever X-Forwarded-For it
    sends, on either instance, while 127.0.0.3 still gets one."""
    spoofer = Client(cluster.nginx.url, source="127.0.0.2")
    other = Client(cluster.nginx.url, source="127.0.0.3")
    try:
        statuses = []
        for n in range(5):
            status, body, _ = await spoofer.call(
                "POST",
                "/api/v1/auth/sms-codes",
                json={"phone": new_phone(), "purpose": "register"},
                headers={"X-Forwarded-For": f"203.0.113.{n}"},
            )
            statuses.append((status, body["error"]["code"] if status >= 400 else None))
        assert statuses == [(202, None)] * 4 + [(429, "RATE_LIMITED")]
        status, body, _ = await other.call(
            "POST", "/api/v1/auth/sms-codes", json={"phone": new_phone(), "purpose": "register"}
        )
        assert status == 202, body
    finally:
        await spoofer.close()
        await other.close()
    redis = cluster.redis()
    try:
        assert redis.exists("auth:sms:ip:127.0.0.2") and redis.exists("auth:sms:ip:127.0.0.3")
        assert not redis.keys("auth:sms:ip:203.0.113.*")
    finally:
        redis.close()


async def test_request_ids_pass_through_and_nginx_gives_one_to_a_request_without(cluster: Cluster) -> None:
    user = Client(cluster.nginx.url)
    try:
        _, _, resp = await user.call("GET", "/api/v1/features", headers={"X-Request-ID": "client-chosen-1"})
        assert resp.headers["X-Request-ID"] == "client-chosen-1"
        _, _, resp = await user.call("GET", "/api/v1/features")
        rid = resp.headers["X-Request-ID"]
        assert re.fullmatch(r"[0-9a-f]{32}", rid)
    finally:
        await user.close()
    async with asyncio.timeout(5):  # nginx writes the line once the answer is sent
        # nginx's own id, the one the app saw   (noqa: a file, not an event)
        while f"rid={rid}" not in cluster.nginx.access_log():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_metrics_are_refused_publicly_and_served_on_the_internal_port(cluster: Cluster) -> None:
    user = Client(cluster.nginx.url)
    try:
        status, body, _ = await user.call("GET", "/metrics")
        assert status == 404 and body["error"]["code"] == "NOT_FOUND"
        async with user.session.get(f"http://127.0.0.1:{cluster.nginx.internal_port}/metrics") as resp:
            assert resp.status == 200
            assert "wardrobe_" in await resp.text()
    finally:
        await user.close()


async def test_a_body_over_12_mib_gets_the_error_envelope_from_nginx(cluster: Cluster) -> None:
    user = Client(cluster.nginx.url)
    try:
        status, body, _ = await user.call(
            "POST",
            "/api/v1/assets",
            data=io.BytesIO(b"x" * (13 * 1024 * 1024)),
            headers={"Content-Type": "application/octet-stream"},
        )
        assert status == 413 and body["error"]["code"] == "PAYLOAD_TOO_LARGE"
    finally:
        await user.close()
