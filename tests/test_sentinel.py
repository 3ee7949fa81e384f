"""Redis Sentinel (REDIS_URL=redis+sentinel://…): a primary, a replica and three
sentinels of Debian's redis-server on loopback ports; the primary is killed under a
running event stream and task load, and the server carries on with the new primary."""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import shutil
import subprocess
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis as redis_sync
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from server.app import create_app
from server.config import Settings, load_settings
from server.credits.ledger import check_all
from server.keys import db_key
from server.redis import connect_redis, derived_pool
from tests.cluster_support import Client, image_bytes
from tests.ports import free_port

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
SENTINEL = shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel"  # Debian's redis-sentinel
PASSWORD = "sentinel-test-pass"
SERVICE = "mymaster"

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        not (Path(REDIS).exists() and Path(SENTINEL).exists()),
        reason="redis-server or redis-sentinel is not installed (ops/bootstrap.sh --all)",
    ),
]

_phones = itertools.count(40_000_000)


class Topology:
    """A primary, a replica and three sentinels, each a redis-server process in `base`."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.ports = {"primary": free_port(), "replica": free_port()}
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://:{PASSWORD}@{hosts}/{SERVICE}/0"

    def _spawn(self, name: str, conf: str, binary: str = REDIS) -> None:
        work = self.base / name
        work.mkdir()
        (work / "redis.conf").write_text(conf)
        with (work / "log").open("ab") as log:
            self.procs[name] = subprocess.Popen([binary, str(work / "redis.conf")], stdout=log, stderr=log)

    def start(self) -> None:
        common = f'bind 127.0.0.1\nsave ""\nappendonly no\nrequirepass {PASSWORD}\nmasterauth {PASSWORD}\n'
        primary = self.ports["primary"]
        self._spawn("primary", f"port {primary}\n{common}dir {self.base / 'primary'}\n")
        self._spawn(
            "replica",
            f"port {self.ports['replica']}\n{common}dir {self.base / 'replica'}\n"
            f"replicaof 127.0.0.1 {primary}\n",
        )
        for n, port in enumerate(self.sentinel_ports):
            self._spawn(
                f"sentinel{n}",
                f"port {port}\nbind 127.0.0.1\ndir {self.base / f'sentinel{n}'}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n"
                f"sentinel auth-pass {SERVICE} {PASSWORD}\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 3000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n",
                SENTINEL,
            )

    def sentinel(self, n: int = 0) -> redis_sync.Redis:
        return redis_sync.Redis(port=self.sentinel_ports[n], socket_timeout=1, decode_responses=True)

    def node(self, name: str) -> redis_sync.Redis:
        return redis_sync.Redis(port=self.ports[name], password=PASSWORD, socket_timeout=1)

    async def until(self, check: Callable[[], bool], within: float = 30) -> None:
        async with asyncio.timeout(within):
            while True:
                try:
                    if check():
                        return
                except redis_sync.RedisError:
                    pass
                await asyncio.sleep(0.1)

    def settled(self) -> bool:
        """Every sentinel sees the primary, the synced replica and the two other sentinels."""
        for n in range(3):
            with self.sentinel(n) as s:
                master = s.sentinel_master(SERVICE)
                replicas = s.sentinel_slaves(SERVICE)
            if master["num-other-sentinels"] < 2 or not any(
                r["master-link-status"] == "ok" for r in replicas
            ):
                return False
        return True

    def primary_port(self) -> int:
        with self.sentinel() as s:
            return int(s.sentinel_get_master_addr_by_name(SERVICE)[1])

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.kill()
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
async def topology(tmp_path: Path) -> AsyncIterator[Topology]:
    topo = Topology(tmp_path)
    topo.start()
    try:
        await topo.until(topo.settled, within=30)
        yield topo
    finally:
        topo.stop()


def test_a_sentinel_url_is_accepted_and_a_malformed_one_is_named() -> None:
    ok = load_settings(_env_file=None, redis_url="redis+sentinel://:pw@h1:26379,h2:26379/mymaster/3")
    assert ok.redis_url
    for bad in (
        "redis+sentinel://h1/mymaster",
        "redis+sentinel://h1:26379,h2/mymaster",
        "redis+sentinel://h1:26379/",
        "redis+sentinel://h1:26379/mymaster/x",
    ):
        with pytest.raises(Exception, match="REDIS_URL must"):
            load_settings(_env_file=None, redis_url=bad)


async def test_commands_follow_the_primary_the_sentinels_name(topology: Topology, make_settings: Any) -> None:
    settings: Settings = make_settings(redis_url=topology.url)
    client = connect_redis(topology.url, settings)
    derived = Redis(connection_pool=derived_pool(client, 2))  # as the events pub/sub makes one
    try:
        await client.set("k", "v")
        assert await derived.get("k") == b"v"
        with topology.node("replica") as replica:
            await topology.until(lambda: replica.get("k") == b"v")
    finally:
        await client.aclose()
    # A call made after the close (a task still running at shutdown), on the client or on
    # a pool derived from it, fails and opens nothing: no connection, to a node or to a
    # sentinel, is left for the garbage collector to find unclosed.
    await derived.connection_pool.disconnect()  # its connection goes: the next call opens one
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(RedisConnectionError):
            await client.get("k")
        with pytest.raises(RedisConnectionError):
            await derived.get("k")
        await derived.aclose()
        del client, derived
        gc.collect()
    assert [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)] == []


class Watcher:
    """A WebSocket client as docs/websocket.md describes one: it applies each event whose
    seq is last+1, drops seqs it has applied, takes `reset` as "refetch, continue from
    L", and reconnects with `after_seq` whenever the socket ends."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base
        self.token = token
        self.last = 0
        self.applied: dict[int, str] = {}  # seq → the frame as received, since the last reset
        self.gaps: list[tuple[int, int]] = []  # (expected, got): a gap the client could not tell
        self.resets: list[dict[str, Any]] = []
        self.closes: list[int | None] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            while not self.stop.is_set():
                try:
                    async with session.ws_connect(self.base + "/api/v1/ws", heartbeat=5) as ws:
                        auth: dict[str, Any] = {"type": "auth", "token": self.token}
                        if self.last:
                            auth["after_seq"] = self.last
                        await ws.send_json(auth)
                        async for msg in ws:
                            if msg.type != aiohttp.WSMsgType.TEXT:
                                break
                            self.take(json.loads(msg.data), msg.data)
                        self.closes.append(ws.close_code)
                except aiohttp.ClientError:
                    self.closes.append(None)
                await asyncio.sleep(0.2)

    def take(self, frame: dict[str, Any], raw: str) -> None:
        if frame["type"] == "ready" and not self.last:
            self.last = int(frame["last_seq"])
        elif frame["type"] == "reset":
            self.resets.append(frame)
            self.applied.clear()
            self.last = int(frame["last_seq"])
        elif frame["type"] == "event":
            seq = int(frame["seq"])
            if seq <= self.last:
                return  # applied already
            if seq != self.last + 1:
                self.gaps.append((self.last + 1, seq))
            self.applied[seq] = raw
            self.last = seq


async def test_killing_the_primary_under_load_loses_no_credit_and_no_event_unseen(
    topology: Topology, make_settings: Any
) -> None:
    settings: Settings = make_settings(
        redis_url=topology.url,
        argon2_time_cost=1,
        argon2_memory_kib=8,
        sms_resend_interval=0,
        signup_credits=1000,
        cron_enabled=False,
        redis_timeout=1.0,
    )
    app = create_app(settings)
    server = TestServer(app)
    await server.start_server()
    base = str(server.make_url("")).rstrip("/")
    user = Client(base)
    watcher_task: asyncio.Task[None] | None = None
    try:
        phone = f"136{next(_phones):08d}"
        await user.register(phone)
        await user.login(phone)
        watcher = Watcher(base, user.token)
        watcher_task = asyncio.create_task(watcher.run())
        asset = await user.upload(image_bytes())

        created: list[str] = []
        outcomes: list[int] = []

        async def load(count: int, tag: str) -> None:
            for n in range(count):
                try:
                    status, body, _ = await user.call(
                        "POST",
                        "/api/v1/tasks",
                        json={"feature": "bg-remove", "inputs": {"image": asset}},
                        headers={"Idempotency-Key": f"{tag}-{n}"},
                    )
                except (aiohttp.ClientError, TimeoutError):
                    status, body = 0, None
                outcomes.append(status)
                if status == 202:
                    created.append(str(body["id"]))
                await asyncio.sleep(0.05)

        await load(10, "before")
        old = topology.ports["primary"]
        loading = asyncio.create_task(load(60, "during"))
        await asyncio.sleep(0.5)
        topology.kill("primary")
        await topology.until(lambda: topology.primary_port() == topology.ports["replica"], within=30)
        await loading
        # After the failover every new request works against the new primary.
        await load(10, "after")
        assert outcomes[-10:] == [202] * 10, outcomes
        assert set(outcomes) <= {202, 503}, outcomes  # an outage answers UNAVAILABLE/BUSY, never a 500
        assert old != topology.primary_port()

        for task_id in created:
            task = await user.finished(task_id, within=60)
            assert task["status"] in ("succeeded", "failed"), task

        # Every event the server has now reaches the client with no gap it could not see.
        with topology.node("replica") as primary:
            newest = int(primary.get(f"ev:{{{user.user_id}}}:seq") or 0)
            await topology.until(lambda: watcher.last >= newest, within=30)
            stream = primary.xrange(f"ev:{{{user.user_id}}}:stream")
        kept = {int(entry_id.split(b"-")[0]): fields for entry_id, fields in stream}
        assert watcher.gaps == []
        for seq, raw in watcher.applied.items():
            assert seq in kept, (seq, watcher.resets)
            assert json.loads(next(iter(kept[seq].values()))) == json.loads(raw), seq

        _, problems = await check_all(app[db_key])
        assert problems == []
        status, quota, _ = await user.call("GET", "/api/v1/me/quota")
        assert status == 200, quota
        succeeded = [t for t in created if (await user.finished(t))["status"] == "succeeded"]
        assert quota["reserved"] == 0 and quota["balance"] == 1000 - 2 * len(succeeded), quota
    finally:
        if watcher_task is not None:
            watcher.stop.set()
            watcher_task.cancel()
            await asyncio.gather(watcher_task, return_exceptions=True)
        await user.close()
        await server.close()
