"""VendorActor (actors/vendor.py) and the vendor adapters, against the in-process fake
vendor (tests/fakes/vendor.py). Synchronised on the fake's counters and on futures;
the only sleeps are the code's own backoffs and polls, set to milliseconds here."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image
from pydantic import SecretStr

from actors import ActorStopped, ActorSystem, AskTimeout, MailboxFull
from actors.vendor import VendorActor
from server.config import ConfigError
from server.errors import Busy, ErrorCode
from server.keys import vendors_key
from server.media.storage.local import LocalStorage
from server.vendors.adapters import HttpAdapter, LocalAdapter, Publish, VendorError
from server.vendors.config import VendorConfig, VendorLimits, check_vendors, http_operations, kind_of, limits
from server.vendors.dashscope import DashScopeAdapter
from server.vendors.facade import Vendors, storage_publisher
from server.vendors.resilience import CLOSED, HALF_OPEN, OPEN
from tests.fakes.vendor import FakeVendor

pytestmark = pytest.mark.timeout(30)

FAST = VendorLimits(
    timeout=5.0,
    concurrency=5,
    qps=0.0,
    retries=2,
    backoff=0.001,
    backoff_max=0.005,
    mailbox=100,
    queue_timeout=10.0,
    breaker_threshold=0,
    breaker_cooldown=30.0,
    poll_interval=0.005,
    max_result_bytes=1024 * 1024,
)


def png(color: str = "red", size: tuple[int, int] = (32, 32)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


PNG = png()


class Clock:
    """A monotonic clock the test moves by hand (for the breaker's cooldown)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def eventually(predicate: Callable[[], bool]) -> None:
    """Let the loop run until `predicate()` holds (yields only; never a timed sleep)."""
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"condition never held: {predicate.__code__.co_positions()}")


# ---------------------------------------------------------------- fixtures


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def vendors(fake: FakeVendor, session: aiohttp.ClientSession) -> AsyncIterator[Vendors]:
    """Closed before the session and the fake it uses."""
    async with ActorSystem() as system:
        vendors = Vendors(system)
        try:
            yield vendors
        finally:
            await vendors.close(1.0)


@pytest.fixture
def http_vendor(
    vendors: Vendors, fake: FakeVendor, session: aiohttp.ClientSession
) -> Callable[..., VendorActor]:
    """Spawn the `fake` vendor (generic HTTP shape, operation `echo`) with these limits."""

    def make(*, clock: Clock | None = None, **overrides: Any) -> VendorActor:
        config = VendorConfig(kind="http", base_url=f"{fake.base_url}/http", operations={"echo": ["image"]})
        adapter = HttpAdapter(
            session,
            f"{fake.base_url}/http",
            fake.api_key,
            http_operations("fake", config),
            poll_interval=0.005,
        )
        return vendors.add("fake", adapter, replace(FAST, **overrides), clock=clock)

    return make


def echo(vendors: Vendors, **kw: Any) -> asyncio.Task[Any]:
    return asyncio.ensure_future(vendors.call("fake", "echo", {"image": PNG}, **kw))


def metric(vendors: Vendors, name: str, **labels: str) -> float | None:
    return vendors.system.registry.get_sample_value(name, labels)


# ---------------------------------------------------------------- concurrency and backpressure


async def test_a_burst_of_50_calls_never_has_more_than_5_in_flight_and_all_finish(
    vendors: Vendors, fake: FakeVendor, http_vendor: Callable[..., VendorActor]
) -> None:
    actor = http_vendor(concurrency=5)
    fake.hold = asyncio.Event()
    calls = [echo(vendors) for _ in range(50)]
    await fake.until(lambda: fake.in_flight == 5)
    assert actor.in_flight == 5
    assert actor.queue_depth == 45  # 44 in the mailbox, 1 held by the actor waiting for a slot
    assert metric(vendors, "wardrobe_vendor_in_flight", vendor="fake") == 5
    assert metric(vendors, "wardrobe_vendor_queue_depth", vendor="fake") == 45
    fake.hold.set()
    results = await asyncio.gather(*calls)
    assert all(r.data == PNG and r.content_type == "image/png" for r in results)
    assert fake.max_in_flight == 5
    assert fake.completed == 50
    assert actor.stats()["calls"]["ok"] == 50
    assert metric(vendors, "wardrobe_vendor_call_seconds_count", vendor="fake", operation="echo") == 50


async def test_a_full_mailbox_answers_busy_at_once(
    vendors: Vendors, fake: FakeVendor, http_vendor: Callable[..., VendorActor]
) -> None:
    actor = http_vendor(concurrency=1, mailbox=3)
    fake.hold = asyncio.Event()
    accepted = [echo(vendors)]
    await fake.until(lambda: fake.in_flight == 1)  # one in flight
    accepted.append(echo(vendors))
    await eventually(lambda: actor.queue_depth == 1 and actor.mailbox_depth == 0)  # one held by the actor
    accepted += [echo(vendors) for _ in range(3)]
    await eventually(lambda: actor.queue_depth == 4)  # and three in the mailbox: it is full
    started = time.perf_counter()
    with pytest.raises(MailboxFull) as caught:
        await vendors.call("fake", "echo", {"image": PNG})
    assert time.perf_counter() - started < 0.1
    assert caught.value.code == ErrorCode.BUSY
    assert metric(vendors, "wardrobe_vendor_errors_total", vendor="fake", kind="busy") == 1
    fake.hold.set()
    assert len(await asyncio.gather(*accepted)) == 5
    assert vendors.stats()["fake"]["calls"]["busy"] == 1
    assert fake.max_in_flight == 1


async def test_a_call_that_waits_too_long_for_a_slot_is_busy_and_never_reaches_the_vendor(
    vendors: Vendors, fake: FakeVendor, http_vendor: Callable[..., VendorActor]
) -> None:
    actor = http_vendor(concurrency=1, queue_timeout=0.05)
    fake.hold = asyncio.Event()
    first = echo(vendors)
    await fake.until(lambda: fake.in_flight == 1)
    with pytest.raises(AskTimeout):
        await vendors.call("fake", "echo", {"image": PNG})
    fake.hold.set()
    await first
    await eventually(lambda: actor.counts["abandoned"] == 1)
    assert fake.calls == 1


# ---------------------------------------------------------------- retries and timeouts


async def test_a_500_is_retried_with_backoff_until_it_succeeds(
    vendors: Vendors, fake: FakeVendor, http_vendor: Callable[..., VendorActor]
) -> None:
    actor = http_vendor(retries=2)
    fake.fail_next(500, 500)
    result = await vendors.call("fake", "echo", {"image": PNG})
    assert result.data == PNG
    assert fake.calls == 3
    assert actor.counts["retries"] == 2
    assert actor.stats()["errors"] == {"server": 2}
    assert metric(vendors, "wardrobe_vendor_errors_total", vendor="fake", kind="server") == 2


async def test_a_429_is_retried_too(
    vendors: Vendors, fake: FakeVendor, http_vendor: Callable[..., VendorActor]
) -> None:
    http_vendor(retries=1)
    fake.fail_next(429)
    assert (await vendors.call("fake", "echo", {"image": PNG})).data == PNG
    assert fake.calls == 2


async def test_a_400_is_not_retried(
    vendors: Vendors, fake: FakeVendor, http_vendor: Callable[..., VendorActor]
) -> None:
    http_vendor(retries=3)
    fake.fail_next(400)
    with pytest.raises(VendorError) as caught:
        await vendors.call("fake", "echo", {"image": PNG})
    assert caught.value.kind == "rejected"
    assert caught.value.code == ErrorCode.UPSTREAM_FAILED
    assert fake.calls == 1


async def test_bad_inputs_or_params_fail_before_any_attempt(
    vendors: Vendors, fake: FakeVendor, http_vendor: Callable[..., VendorActor]
) -> None:
    http_vendor()
    with pytest.raises(VendorError) as caught:
        await vendors.call("fake", "echo", {"picture": PNG})
    assert caught.value.code == ErrorCode.VALIDATION_FAILED
    with pytest.raises(VendorError, match="no operation 'nope'"):
        await vendors.call("fake", "nope", {"image": PNG})
    with pytest.raises(VendorError, match="not configured"):
        await vendors.call("elsewhere", "echo", {"image": PNG})
    assert fake.calls == 0


async def test_a_vendor_that_never_answers_fails_upstream_after_its_retries(
    vendors: Vendors, fake: FakeVendor, http_vendor: Callable[..., VendorActor]
) -> None:
    actor = http_vendor(retries=1)
    fake.fail_next("timeout", "timeout")
    with pytest.raises(VendorError) as caught:
        await vendors.call("fake", "echo", {"image": PNG}, timeout=0.1)
    assert caught.value.kind == "timeout"
    assert caught.value.code == ErrorCode.UPSTREAM_FAILED
    assert fake.calls == 2
    await fake.until(lambda: fake.cancelled == 2)  # each abandoned request was really dropped
    assert actor.stats()["errors"] == {"timeout": 2}
    assert actor.stats()["last_error"]["kind"] == "timeout"


# ---------------------------------------------------------------- circuit breaker


async def test_the_breaker_opens_after_n_failures_then_one_probe_after_the_cooldown_closes_it(
    vendors: Vendors, fake: FakeVendor, http_vendor: Callable[..., VendorActor]
) -> None:
    clock = Clock()
    actor = http_vendor(retries=0, breaker_threshold=3, breaker_cooldown=30.0, clock=clock)
    fake.fail_next(500, 500, 500)
    for _ in range(3):
        with pytest.raises(VendorError, match="HTTP 500"):
            await vendors.call("fake", "echo", {"image": PNG})
    assert actor.breaker.state == OPEN
    assert metric(vendors, "wardrobe_vendor_breaker_state", vendor="fake") == 2

    with pytest.raises(VendorError) as caught:
        await vendors.call("fake", "echo", {"image": PNG})
    assert caught.value.kind == "breaker_open"
    assert caught.value.code == ErrorCode.UPSTREAM_FAILED
    assert fake.calls == 3  # failed fast: the vendor never saw it

    clock.now += 31.0
    fake.hold = asyncio.Event()
    probe = echo(vendors)
    await fake.until(lambda: fake.in_flight == 1)
    assert actor.breaker.state == HALF_OPEN
    with pytest.raises(VendorError, match="fail fast"):
        await vendors.call("fake", "echo", {"image": PNG})  # one probe at a time
    fake.hold.set()
    assert (await probe).data == PNG
    assert actor.breaker.state == CLOSED
    assert metric(vendors, "wardrobe_vendor_breaker_state", vendor="fake") == 0
    assert actor.stats()["breaker"] == {"state": "closed", "failures": 0, "opens": 1, "retry_in": 0.0}
    assert metric(vendors, "wardrobe_vendor_errors_total", vendor="fake", kind="breaker_open") == 2


async def test_a_failed_probe_opens_the_breaker_again(
    vendors: Vendors, fake: FakeVendor, http_vendor: Callable[..., VendorActor]
) -> None:
    clock = Clock()
    actor = http_vendor(retries=0, breaker_threshold=1, breaker_cooldown=10.0, clock=clock)
    fake.fail_next(503, 503)
    with pytest.raises(VendorError):
        await vendors.call("fake", "echo", {"image": PNG})
    clock.now += 11.0
    with pytest.raises(VendorError, match="HTTP 503"):
        await vendors.call("fake", "echo", {"image": PNG})
    assert actor.breaker.state == OPEN
    assert actor.breaker.retry_in() == 10.0


async def test_rejected_requests_do_not_open_the_breaker(
    vendors: Vendors, fake: FakeVendor, http_vendor: Callable[..., VendorActor]
) -> None:
    actor = http_vendor(retries=0, breaker_threshold=2)
    fake.fail_next(500, 400, 500)
    for _ in range(3):
        with pytest.raises(VendorError):
            await vendors.call("fake", "echo", {"image": PNG})
    assert actor.breaker.state == CLOSED  # the 400 showed the vendor alive
    assert actor.breaker.failures == 1


# ---------------------------------------------------------------- cancellation and shutdown


async def test_a_cancelled_asker_cancels_its_call_and_frees_the_slot(
    vendors: Vendors, fake: FakeVendor, http_vendor: Callable[..., VendorActor]
) -> None:
    actor = http_vendor(concurrency=1)
    fake.hold = asyncio.Event()
    running = echo(vendors)
    await fake.until(lambda: fake.in_flight == 1)
    running.cancel()
    await fake.until(lambda: fake.cancelled == 1 and fake.in_flight == 0)
    assert actor.in_flight == 0
    assert actor.counts["cancelled"] == 1
    fake.hold.set()
    assert (await vendors.call("fake", "echo", {"image": PNG})).data == PNG  # the slot is free
    assert fake.completed == 1


async def test_a_call_cancelled_while_queued_never_reaches_the_vendor(
    vendors: Vendors, fake: FakeVendor, http_vendor: Callable[..., VendorActor]
) -> None:
    actor = http_vendor(concurrency=1)
    fake.hold = asyncio.Event()
    first = echo(vendors)
    await fake.until(lambda: fake.in_flight == 1)
    queued = [echo(vendors) for _ in range(2)]
    await eventually(lambda: actor.queue_depth == 2)
    for task in queued:
        task.cancel()
    await eventually(lambda: actor.queue_depth == 0)  # the held one left at once
    fake.hold.set()
    await first
    await eventually(lambda: actor.counts["abandoned"] == 2)
    assert fake.calls == 1
    assert actor.counts["started"] == 1


async def test_shutdown_drains_then_cancels_calls_in_flight_and_refuses_queued_ones(
    vendors: Vendors, fake: FakeVendor, http_vendor: Callable[..., VendorActor]
) -> None:
    actor = http_vendor(concurrency=1)
    fake.hold = asyncio.Event()
    running, queued = echo(vendors), echo(vendors)
    await fake.until(lambda: fake.in_flight == 1)
    await eventually(lambda: actor.queue_depth == 1)
    await vendors.close(drain=0.05)
    for task in (running, queued):
        with pytest.raises(ActorStopped) as caught:
            await task
        assert caught.value.code == ErrorCode.BUSY
    await fake.until(lambda: fake.cancelled == 1)
    assert fake.calls == 1
    assert metric(vendors, "wardrobe_vendor_in_flight", vendor="fake") is None  # unregistered


# ---------------------------------------------------------------- QPS


async def test_the_qps_limit_spaces_attempt_starts(
    vendors: Vendors, fake: FakeVendor, http_vendor: Callable[..., VendorActor]
) -> None:
    http_vendor(concurrency=5, qps=50.0)
    started = time.perf_counter()
    await asyncio.gather(*(echo(vendors) for _ in range(6)))
    assert time.perf_counter() - started >= 5 / 50 - 0.005  # 5 intervals of 20 ms


# ---------------------------------------------------------------- adapters


async def test_the_generic_http_vendor_may_answer_json_or_a_task_to_poll(
    vendors: Vendors, fake: FakeVendor, http_vendor: Callable[..., VendorActor]
) -> None:
    http_vendor()
    fake.reply = "json"
    assert (await vendors.call("fake", "echo", {"image": PNG})).data == PNG
    fake.reply, fake.task_polls = "task", 2
    assert (await vendors.call("fake", "echo", {"image": PNG})).data == PNG
    assert sum(r.startswith("GET /http/tasks/") for r in fake.requests) == 3


@pytest.fixture
def dashscope(
    vendors: Vendors, fake: FakeVendor, session: aiohttp.ClientSession
) -> Callable[..., VendorActor]:
    def make(api_key: str | None = None, publish: Publish | None = None, **overrides: Any) -> VendorActor:
        adapter = DashScopeAdapter(
            session,
            api_key or fake.api_key,
            publish or fake.publish,
            base_url=fake.base_url,
            poll_interval=0.005,
        )
        return vendors.add("dashscope", adapter, replace(FAST, **overrides))

    return make


async def test_dashscope_tryon_submits_a_task_polls_it_and_downloads_the_image(
    vendors: Vendors, fake: FakeVendor, dashscope: Callable[..., VendorActor]
) -> None:
    dashscope()
    person, garment = png("blue", (40, 60)), png("green")
    result = await vendors.call("dashscope", "tryon", {"person": person, "garment": garment})
    assert result.data == person  # the fake "dresses" the person by returning them
    assert result.content_type == "image/png"
    assert [d for d, _ in fake.published.values()] == [person, garment]
    assert fake.requests[0] == "POST /api/v1/services/aigc/image2image/image-synthesis"
    assert fake.requests[1].startswith("GET /api/v1/tasks/")
    assert fake.completed == 1


async def test_dashscope_with_a_wrong_key_fails_upstream_without_retrying(
    vendors: Vendors, fake: FakeVendor, dashscope: Callable[..., VendorActor]
) -> None:
    dashscope(api_key="sk-wrong", retries=3)
    with pytest.raises(VendorError) as caught:
        await vendors.call("dashscope", "tryon", {"person": PNG, "garment": PNG})
    assert caught.value.code == ErrorCode.UPSTREAM_FAILED
    assert caught.value.kind == "auth"
    assert "InvalidApiKey" in caught.value.message
    assert fake.requests == ["POST /api/v1/services/aigc/image2image/image-synthesis"]


async def test_a_failed_dashscope_task_is_reported_and_a_5xx_submit_retried(
    vendors: Vendors, fake: FakeVendor, dashscope: Callable[..., VendorActor]
) -> None:
    dashscope(retries=2)
    fake.fail_next(500, "task_failed")
    with pytest.raises(VendorError) as caught:
        await vendors.call(
            "dashscope", "tryon", {"person": PNG, "garment": PNG}, params={"garment_type": "bottom"}
        )
    assert caught.value.kind == "task_failed"
    assert "InternalError.Algo" in caught.value.message
    assert fake.requests.count("POST /api/v1/services/aigc/image2image/image-synthesis") == 2


async def test_a_storage_failure_while_publishing_inputs_is_retried_and_not_held_against_the_vendor(
    vendors: Vendors, fake: FakeVendor, dashscope: Callable[..., VendorActor]
) -> None:
    failures = [Busy("storage queue full"), Busy("storage queue full")]

    async def flaky(data: bytes, content_type: str) -> str:
        if failures:
            raise failures.pop()
        return await fake.publish(data, content_type)

    actor = dashscope(publish=flaky, retries=2, breaker_threshold=1)
    result = await vendors.call("dashscope", "tryon", {"person": PNG, "garment": PNG})
    assert result.data == PNG
    assert actor.stats()["errors"] == {"publish": 2}
    assert actor.breaker.state == CLOSED


async def test_dashscope_inputs_are_published_through_signed_storage_urls(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PUBLIC_BASE_URL"):
        storage_publisher(LocalStorage(tmp_path, b"secret"), 600)
    storage = LocalStorage(tmp_path, b"secret", base_url="https://wardrobe.example")
    url = await storage_publisher(storage, 600)(PNG, "image/png")
    assert url.startswith("https://wardrobe.example/files/vendor-inputs/")
    key = url.removeprefix("https://wardrobe.example/files/").partition("?")[0]
    assert key.endswith(".png")
    assert await storage.get(key) == PNG


async def test_the_local_adapter_runs_a_real_operation_in_its_thread_pool(vendors: Vendors) -> None:
    vendors.add("local", LocalAdapter(2), replace(FAST, concurrency=2))
    result = await vendors.call("local", "resize", {"image": png(size=(64, 48))}, {"width": 16})
    with Image.open(io.BytesIO(result.data)) as image:
        assert image.size == (16, 12)
    assert result.content_type == "image/png"
    with pytest.raises(VendorError) as caught:
        await vendors.call("local", "resize", {"image": b"not an image"}, {"width": 16})
    assert caught.value.code == ErrorCode.VALIDATION_FAILED
    assert "local" in vendors.catalog() and "resize" in vendors.catalog()["local"]


# ---------------------------------------------------------------- settings and the app


def test_vendor_settings_fill_kind_defaults_and_always_include_local() -> None:
    vendors = check_vendors(
        {
            "dashscope": VendorConfig(api_key=SecretStr("sk-1")),
            "up": VendorConfig(
                kind="http", base_url="https://up.example", operations={"upscale": ["image", "refs[]"]}
            ),
        }
    )
    assert set(vendors) == {"dashscope", "up", "local"}
    assert kind_of("dashscope", vendors["dashscope"]) == "dashscope"
    dash = limits(vendors["dashscope"], "dashscope")
    assert (dash.concurrency, dash.qps) == (5, 10.0)
    ops = http_operations("up", vendors["up"])
    assert [(i.name, i.many) for i in ops["upscale"].inputs] == [("image", False), ("refs", True)]
    for bad, message in [
        ({"dashscope": VendorConfig()}, "needs an api_key"),
        ({"x": VendorConfig(kind="http", base_url="https://x")}, "needs operations"),
        ({"x": VendorConfig(base_url="https://x")}, "set its kind"),
        ({"Bad Name": VendorConfig(kind="local")}, "must match"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_vendors(bad)


async def test_the_app_runs_the_local_vendor_and_exports_its_metrics(client: Any) -> None:
    vendors = client.app[vendors_key]
    assert "local" in vendors.catalog()
    assert vendors.stats()["local"]["breaker"]["state"] == "closed"
    result = await vendors.call("local", "resize", {"image": PNG}, {"width": 8})
    assert result.content_type == "image/png"
    body = await (await client.get("/metrics")).text()
    assert 'wardrobe_vendor_in_flight{vendor="local"} 0.0' in body
    assert 'wardrobe_vendor_call_seconds_count{operation="resize",vendor="local"} 1.0' in body
