"""Vendors: the one entry point to the AI vendors, one VendorActor per configured vendor.

`open_vendors` (entered by the app's cleanup_ctx, after the actor system starts) builds
the adapters (one aiohttp ClientSession for every HTTP vendor), spawns the actors, and
on exit stops them (calls in flight get a bounded drain), closes the adapters, then
the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import math
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from loguru import logger
from redis.asyncio import Redis

from actors.errors import MailboxFull
from actors.runtime import ActorRef, ActorSystem
from actors.vendor import Call, VendorActor, VendorMetrics, call
from server.config import ConfigError, Settings
from server.media.images import EXTENSIONS
from server.media.storage import Storage
from server.vendors import OperationSpec
from server.vendors.adapters import (
    Adapter,
    HttpAdapter,
    Inputs,
    LocalAdapter,
    Publish,
    VendorError,
    VendorResult,
)
from server.vendors.config import VendorConfig, VendorLimits, check_vendors, http_operations, kind_of, limits
from server.vendors.dashscope import DashScopeAdapter
from server.vendors.permits import ClusterLimits
from server.vendors.resilience import Clock

CONNECT_TIMEOUT = 10.0
INPUT_PREFIX = "vendor-inputs"


@dataclass(frozen=True, slots=True)
class _Vendor:
    actor: VendorActor
    ref: ActorRef[Call]


class Vendors:
    """The registry of vendor actors: `ref(vendor)`, `call(...)`, `catalog()`, `stats()`."""

    def __init__(self, system: ActorSystem, cluster: ClusterLimits | None = None) -> None:
        self.system = system
        self.cluster = cluster  # None: every limit is per process
        self.metrics = VendorMetrics(system.registry)
        self._vendors: dict[str, _Vendor] = {}
        self._closed = False

    @classmethod
    def build(
        cls,
        configs: Mapping[str, VendorConfig],
        system: ActorSystem,
        *,
        session: aiohttp.ClientSession | None = None,
        publish: Publish | None = None,
        cluster: ClusterLimits | None = None,
    ) -> Vendors:
        """Adapters for every entry of VENDORS (plus `local`), then one actor each; with
        `cluster`, remote vendors' limits hold for the whole cluster."""
        configs = check_vendors(dict(configs))
        adapters = {name: _adapter(name, config, session, publish) for name, config in configs.items()}
        vendors = cls(system, cluster)
        for name, adapter in adapters.items():
            vendors.add(name, adapter, limits(configs[name], adapter.kind))
        return vendors

    def add(
        self, vendor: str, adapter: Adapter, limits: VendorLimits, *, clock: Clock | None = None
    ) -> VendorActor:
        """Spawn the actor of one vendor (tests use this with their own adapters). The
        `local` kind's limit is this process's threads, so it never takes cluster permits."""
        if vendor in self._vendors:
            raise ValueError(f"vendor {vendor!r} is already running")
        kind = VendorActor.kind_for(vendor, limits.mailbox)
        permits = (
            self.cluster.permits(vendor, limits.concurrency, limits.qps)
            if self.cluster is not None and adapter.kind != "local"
            else None
        )
        actor = (
            kind(vendor, adapter, limits, self.metrics, permits=permits)
            if clock is None
            else kind(vendor, adapter, limits, self.metrics, clock=clock, permits=permits)
        )
        ref = self.system.spawn(actor, name=f"vendor:{vendor}")
        self._vendors[vendor] = _Vendor(actor, ref)
        return actor

    def _get(self, vendor: str) -> _Vendor:
        entry = self._vendors.get(vendor)
        if entry is None:
            known = ", ".join(sorted(self._vendors))
            raise VendorError("invalid", f"Vendor {vendor!r} is not configured (configured: {known})")
        return entry

    def ref(self, vendor: str) -> ActorRef[Call]:
        return self._get(vendor).ref

    def queue_timeout(self, vendor: str) -> float:
        """The longest a call waits for one of the vendor's slots (VENDORS `queue_timeout`)."""
        return self._get(vendor).actor.limits.queue_timeout

    def actor(self, vendor: str) -> VendorActor:
        return self._get(vendor).actor

    async def call(
        self,
        vendor: str,
        operation: str,
        inputs: Inputs,
        params: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - per attempt
    ) -> VendorResult:
        """One call through the vendor's actor; errors as in `actors.vendor.call`."""
        entry = self._get(vendor)
        try:
            return await call(
                entry.ref,
                operation,
                inputs,
                params,
                timeout=timeout,
                queue_timeout=entry.actor.limits.queue_timeout,
            )
        except MailboxFull:
            entry.actor.counts["busy"] += 1
            self.metrics.errors.labels(vendor, "busy").inc()
            raise

    def catalog(self) -> dict[str, Mapping[str, OperationSpec]]:
        """vendor -> operation -> spec, for pipeline validation (server/pipeline.py)."""
        return {name: entry.actor.adapter.operations for name, entry in self._vendors.items()}

    def stats(self) -> dict[str, dict[str, Any]]:
        """Live figures per vendor, for the ops dashboard and GET /admin/vendors."""
        latency = self.latency()
        out = {}
        for name, entry in self._vendors.items():
            stats = entry.actor.stats()
            stats["calls"]["busy"] = entry.actor.counts["busy"]
            stats["latency"] = latency.get(name, _no_latency())
            out[name] = stats
        return out

    def latency(self) -> dict[str, dict[str, Any]]:
        """Per vendor, from the `wardrobe_vendor_call_seconds` histogram (every attempt of this
        process, any outcome, all operations): `attempts`, `mean_seconds`, and
        `p50_seconds`/`p99_seconds` estimated as PromQL's histogram_quantile does
        (linear within the bucket; the highest finite bound when it falls in +Inf)."""
        buckets: dict[str, dict[float, float]] = {}
        sums: dict[str, float] = {}
        for family in self.metrics.call_seconds.collect():
            for sample in family.samples:
                vendor = sample.labels["vendor"]
                if sample.name.endswith("_bucket"):
                    per = buckets.setdefault(vendor, {})
                    le = float(sample.labels["le"])
                    per[le] = per.get(le, 0.0) + sample.value
                elif sample.name.endswith("_sum"):
                    sums[vendor] = sums.get(vendor, 0.0) + sample.value
        out = {}
        for vendor, per in buckets.items():
            cumulative = sorted(per.items())
            count = cumulative[-1][1]
            if not count:
                continue
            out[vendor] = {
                "attempts": int(count),
                "mean_seconds": round(sums.get(vendor, 0.0) / count, 4),
                "p50_seconds": _quantile(0.5, cumulative),
                "p99_seconds": _quantile(0.99, cumulative),
            }
        return out

    async def close(self, drain: float = 5.0) -> None:
        """Stop every vendor actor (calls in flight may finish for `drain` seconds, then
        are cancelled; queued calls fail with ActorStopped), then close the adapters."""
        if self._closed:
            return
        self._closed = True
        for entry in self._vendors.values():
            entry.actor.shutdown(drain)
        waits = [self.system.wait_empty(type(entry.actor)) for entry in self._vendors.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), drain + 2.0)
        except TimeoutError:
            logger.warning(
                "vendor actors did not stop within {:g}s; the actor system will cancel them", drain
            )
        for name, entry in self._vendors.items():
            try:
                await entry.actor.permits.close()
                await entry.actor.adapter.close()
            except Exception:
                logger.opt(exception=True).error("closing the {} vendor adapter failed", name)
        self.metrics.close()


def _no_latency() -> dict[str, Any]:
    return {"attempts": 0, "mean_seconds": None, "p50_seconds": None, "p99_seconds": None}


def _quantile(q: float, cumulative: list[tuple[float, float]]) -> float:
    """The q-quantile of a histogram given as sorted (upper bound, cumulative count)."""
    rank = q * cumulative[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if math.isinf(bound):
                return lower  # the highest finite bound, as histogram_quantile answers
            inside = count - below
            return round(lower + (bound - lower) * ((rank - below) / inside if inside else 1.0), 4)
        lower, below = bound, count
    return lower


def _adapter(
    name: str, config: VendorConfig, session: aiohttp.ClientSession | None, publish: Publish | None
) -> Adapter:
    kind = kind_of(name, config)
    lim = limits(config, kind)
    if kind == "local":
        return LocalAdapter(lim.concurrency)
    if session is None:
        raise ConfigError(f"vendor {name!r} ({kind}) needs an HTTP session")
    api_key = config.api_key.get_secret_value() if config.api_key else None
    if kind == "dashscope":
        if publish is None:
            raise ConfigError(f"vendor {name!r} (dashscope) needs a way to publish input images as URLs")
        assert api_key is not None  # check_vendors
        return DashScopeAdapter(
            session,
            api_key,
            publish,
            base_url=config.base_url,
            model=config.model,
            poll_interval=lim.poll_interval,
            max_result_bytes=lim.max_result_bytes,
        )
    assert config.base_url is not None  # check_vendors
    return HttpAdapter(
        session,
        config.base_url,
        api_key,
        http_operations(name, config),
        poll_interval=lim.poll_interval,
        max_result_bytes=lim.max_result_bytes,
    )


def storage_publisher(storage: Storage, ttl: int) -> Publish:
    """Publish vendor inputs through the storage's signed URLs, under `vendor-inputs/`
    (the orphan-file cleanup may delete them once `ttl` has passed)."""
    probe = storage.url(f"{INPUT_PREFIX}/probe.png", ttl)
    if not probe.startswith(("http://", "https://")):
        raise ConfigError(
            "DashScope fetches input images by URL, but storage URLs are relative: "
            "set PUBLIC_BASE_URL (local storage) or use STORAGE_BACKEND=cos"
        )

    async def publish(data: bytes, content_type: str) -> str:
        day = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d")
        key = f"{INPUT_PREFIX}/{day}/{uuid.uuid4().hex}.{EXTENSIONS.get(content_type, 'bin')}"
        await storage.put(key, data, content_type)
        return storage.url(key, ttl)

    return publish


@contextlib.asynccontextmanager
async def open_vendors(
    settings: Settings, system: ActorSystem, storage: Storage | None, redis: Redis | None = None
) -> AsyncIterator[Vendors]:
    """The vendor actors on `system`, stopped on exit; dashscope publishes its inputs on
    `storage`; with `redis`, remote vendors' limits hold cluster-wide (docs/vendors.md)."""
    configs = check_vendors(dict(settings.vendors))
    kinds = {name: kind_of(name, config) for name, config in configs.items()}
    remote = [name for name, kind in kinds.items() if kind != "local"]
    publish: Publish | None = None
    if "dashscope" in kinds.values():
        if storage is None:
            raise ConfigError("a dashscope vendor needs the storage to publish its inputs")
        publish = storage_publisher(storage, settings.vendor.input_url_ttl)
    session: aiohttp.ClientSession | None = None
    if remote:
        connections = sum(limits(configs[n], kinds[n]).concurrency for n in remote)
        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT),
            connector=aiohttp.TCPConnector(limit=2 * connections + 8),
        )
    try:
        cluster = (
            None
            if redis is None
            else ClusterLimits(redis, settings.vendor.lease_ttl, settings.vendor.expected_instances)
        )
        vendors = Vendors.build(configs, system, session=session, publish=publish, cluster=cluster)
    except BaseException:
        if session is not None:
            await session.close()
        raise
    logger.info("vendors: {}", ", ".join(f"{n} ({kinds[n]})" for n in configs))
    try:
        yield vendors
    finally:
        try:
            await vendors.close(settings.actors.stop_timeout)
        finally:
            if session is not None:
                await session.close()
