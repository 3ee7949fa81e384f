"""Cluster-wide vendor limits (server/vendors/permits.py): several VendorActors, each on
its own ActorSystem and Redis client as separate instances would be, share one fake
vendor and one real Redis. A crashed holder is a real process killed with SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from actors import ActorSystem
from server.config import Settings
from server.redis import connect_redis
from server.vendors.adapters import HttpAdapter
from server.vendors.config import VendorConfig, http_operations
from server.vendors.facade import Vendors
from server.vendors.permits import ClusterLimits, ClusterPermits
from tests.fakes.vendor import FakeVendor
from tests.test_vendor_actor import FAST, PNG

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def instances(
    make_settings: Callable[..., Settings], fake: FakeVendor
) -> AsyncIterator[Callable[..., Any]]:
    """`await start(redis_url=None, lease_ttl=5.0, expected=3, **limits)`: one more
    instance (its own actor system, Redis client and HTTP session) running the fake
    vendor as `fake` with cluster-wide limits."""
    settings = make_settings()
    async with AsyncExitStack() as stack:

        async def start(
            *, redis_url: str | None = None, lease_ttl: float = 5.0, expected: int = 3, **limits: Any
        ) -> Vendors:
            redis = connect_redis(redis_url or settings.redis_url or "", settings)
            stack.push_async_callback(redis.aclose)
            session = await stack.enter_async_context(aiohttp.ClientSession())
            system = await stack.enter_async_context(ActorSystem())
            vendors = Vendors(system, ClusterLimits(redis, lease_ttl, expected))
            stack.push_async_callback(vendors.close, 1.0)
            config = VendorConfig(
                kind="http", base_url=f"{fake.base_url}/http", operations={"echo": ["image"]}
            )
            adapter = HttpAdapter(
                session,
                f"{fake.base_url}/http",
                fake.api_key,
                http_operations("fake", config),
                poll_interval=0.005,
            )
            vendors.add("fake", adapter, replace(FAST, **limits))
            return vendors

        yield start


def echo(vendors: Vendors) -> asyncio.Task[Any]:
    return asyncio.ensure_future(vendors.call("fake", "echo", {"image": PNG}))


def permits(vendors: Vendors) -> ClusterPermits:
    held = vendors.actor("fake").permits
    assert isinstance(held, ClusterPermits)
    return held


async def until(predicate: Callable[[], bool]) -> None:
    """Wait for `predicate` about state moved by other tasks and by Redis round trips
    (not loop turns alone, so it polls every 5 ms; the test's timeout bounds it)."""
    while not predicate():  # noqa: ASYNC110 - no event to wait on across Redis round trips
        await asyncio.sleep(0.005)


async def test_three_instances_never_send_the_vendor_more_than_its_concurrency(
    instances: Callable[..., Any], fake: FakeVendor
) -> None:
    cluster = [await instances(concurrency=5) for _ in range(3)]
    fake.hold = asyncio.Event()
    calls = [echo(v) for v in cluster for _ in range(20)]
    await fake.until(lambda: fake.in_flight == 5)
    # every instance now has a call waiting for a cluster permit, not just for a local slot
    await until(lambda: all(permits(v).counts["waits"] >= 1 for v in cluster))
    assert fake.in_flight == 5
    assert sum(v.actor("fake").in_flight for v in cluster) == 5
    fake.hold.set()
    results = await asyncio.gather(*calls)
    assert all(r.data == PNG for r in results)
    assert fake.max_in_flight == 5
    assert fake.completed == 60
    assert all(not permits(v).held for v in cluster)


async def test_the_qps_limit_holds_for_the_cluster_not_per_instance(
    instances: Callable[..., Any], fake: FakeVendor
) -> None:
    cluster = [await instances(concurrency=5, qps=40.0) for _ in range(3)]
    started = time.perf_counter()
    await asyncio.gather(*(echo(v) for v in cluster for _ in range(4)))
    # 12 attempt starts 25 ms apart cluster-wide; per instance it would be 3 intervals
    assert time.perf_counter() - started >= 11 / 40 - 0.005
    assert fake.completed == 12


async def test_a_call_abandoned_while_waiting_for_a_cluster_permit_leaves_no_lease(
    instances: Callable[..., Any], fake: FakeVendor, make_settings: Callable[..., Settings]
) -> None:
    a, b = await instances(concurrency=2), await instances(concurrency=2)
    fake.hold = asyncio.Event()
    held = [echo(a), echo(a)]
    await fake.until(lambda: fake.in_flight == 2)
    waiting = echo(b)
    await until(lambda: permits(b).counts["waits"] == 1)
    waiting.cancel()
    await until(lambda: b.actor("fake").queue_depth == 0)
    assert b.actor("fake").counts["abandoned"] == 1
    assert not permits(b).held
    assert await permits(b).redis.zcard(permits(b).leases_key) == 2
    fake.hold.set()
    await asyncio.gather(*held)
    await until(lambda: not permits(a).held and not permits(a)._jobs)
    assert await permits(a).redis.zcard(permits(a).leases_key) == 0
    assert fake.calls == 2


async def test_permits_given_back_at_once_all_go_back_even_after_redis_lost_its_scripts(
    instances: Callable[..., Any], fake: FakeVendor
) -> None:
    """Releases made together go in one pipeline of EVALSHA; a Redis that lost its scripts
    (a restart) gets the script loaded again and every lease still goes back."""
    a = await instances(concurrency=5)
    held = permits(a)
    fake.hold = asyncio.Event()
    calls = [echo(a) for _ in range(5)]
    await fake.until(lambda: fake.in_flight == 5)
    assert await held.redis.zcard(held.leases_key) == 5
    await held.redis.script_flush()
    fake.hold.set()
    await asyncio.gather(*calls)
    await until(lambda: not held.held and not held._jobs)
    assert await held.redis.zcard(held.leases_key) == 0
    assert held.counts["redis_errors"] == 0 and not held.fallback


HOLDER = """
import asyncio, sys
from server.config import Settings
from server.redis import connect_redis
from server.vendors.permits import ClusterPermits

async def main() -> None:
    settings = Settings(_env_file=None, app_env="test", redis_url=sys.argv[1])
    permits = ClusterPermits(connect_redis(sys.argv[1], settings), "fake", 5, 0.0,
                             lease_ttl=float(sys.argv[2]), expected_instances=1)
    for _ in range(5):
        await permits.acquire()
    print("held", flush=True)
    seen = 0
    while True:
        await asyncio.sleep(0.01)
        if permits.counts["renewals"] != seen:
            seen = permits.counts["renewals"]
            print("renewed", seen, flush=True)

asyncio.run(main())
"""


async def test_a_live_holder_keeps_its_permits_and_a_killed_one_loses_them_after_the_lease_ttl(
    instances: Callable[..., Any], fake: FakeVendor, make_settings: Callable[..., Settings]
) -> None:
    ttl = 0.6
    url = make_settings().redis_url
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLDER,
        url or "",
        str(ttl),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert await holder.stdout.readline() == b"held\n"
        b = await instances(concurrency=5, lease_ttl=ttl)
        waiting = echo(b)
        # three renewals: more than one lease TTL has passed since the permits were taken
        while (await holder.stdout.readline()).split() != [b"renewed", b"3"]:
            pass
        assert not waiting.done()
        assert fake.calls == 0
        assert await permits(b).redis.zcard(permits(b).leases_key) == 5
        holder.send_signal(signal.SIGKILL)
        assert (await waiting).data == PNG
        assert fake.calls == 1
    finally:
        if holder.returncode is None:
            holder.kill()
        await holder.wait()


async def test_with_redis_unreachable_each_instance_uses_its_share_and_says_so(
    instances: Callable[..., Any], fake: FakeVendor, tmp_path: Path
) -> None:
    vendors = await instances(redis_url=f"unix://{tmp_path}/no-redis.sock?db=0", concurrency=5, expected=3)
    actor = vendors.actor("fake")
    assert actor.stats()["limits"]["fallback"] is False
    fake.hold = asyncio.Event()
    calls = [echo(vendors) for _ in range(4)]
    await fake.until(lambda: fake.in_flight == 1)
    await until(lambda: actor.queue_depth == 3)
    assert fake.in_flight == 1  # 5 // 3 instances
    limits = actor.stats()["limits"]
    assert limits["fallback"] is True and limits["local_limit"] == 1
    registry = vendors.system.registry
    assert registry.get_sample_value("wardrobe_vendor_cluster_limit_fallback", {"vendor": "fake"}) == 1
    fake.hold.set()
    await asyncio.gather(*calls)
    assert fake.max_in_flight == 1
    assert fake.completed == 4


async def test_a_redis_that_answers_reports_no_fallback(
    instances: Callable[..., Any], fake: FakeVendor
) -> None:
    vendors = await instances(concurrency=5)
    await echo(vendors)
    registry = vendors.system.registry
    assert registry.get_sample_value("wardrobe_vendor_cluster_limit_fallback", {"vendor": "fake"}) == 0
    assert vendors.actor("fake").stats()["limits"] == {
        **vendors.actor("fake").stats()["limits"],
        "scope": "cluster",
        "fallback": False,
        "local_limit": 5,
    }
