"""Admin: vendors, live (GET /api/v1/admin/vendors): limits, load, breaker, latency, errors.

The figures are this process's (each instance has its own vendor actors), read from
`Vendors.stats()`, the same source as the ops dashboard; see docs/vendors.md.
"""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, Field

from server.keys import vendors_key
from server.routing import RouteTable
from server.timing import rfc3339

routes = RouteTable(tags=["admin"], auth="admin")


class Breaker(BaseModel):
    state: Literal["closed", "half_open", "open"]
    failures: int = Field(description="unhealthy attempts in a row")
    opens: int = Field(description="times it opened since the process started")
    retry_in: float = Field(description="seconds until an open breaker lets a probe through")


class Calls(BaseModel):
    started: int
    ok: int
    failed: int = Field(description="failed after their retries")
    cancelled: int = Field(description="cancelled while running (asker gone or shutdown)")
    abandoned: int = Field(description="their asker left while they were queued")
    refused: int = Field(description="failed fast on an open breaker")
    retries: int
    busy: int = Field(description="refused at once: the mailbox was full")


class Limits(BaseModel):
    scope: Literal["process", "cluster"] = Field(
        description="cluster: `limit` and `qps` hold for all instances together (permits in Redis)"
    )
    fallback: bool = Field(description="Redis is unreachable: this process uses its share of the limit")
    local_limit: int = Field(description="calls this process may have in flight now")


class Latency(BaseModel):
    """From the `vendor_call_seconds` histogram: every attempt since the process started."""

    attempts: int
    mean_seconds: float | None
    p50_seconds: float | None = Field(description="estimated from the histogram buckets")
    p99_seconds: float | None = Field(description="estimated from the histogram buckets")


class LastError(BaseModel):
    kind: str
    message: str
    at: str = Field(description="RFC 3339 UTC")


class AdminVendor(BaseModel):
    name: str
    kind: str = Field(description="local | dashscope | http")
    operations: list[str]
    limit: int = Field(description="calls in flight at most (`concurrency`)")
    qps: float = Field(description="attempt starts per second at most; 0: no limit")
    limits: Limits
    in_flight: int
    queued: int = Field(description="calls waiting for a slot: the mailbox, plus the one the actor holds")
    mailbox_capacity: int
    breaker: Breaker
    latency: Latency
    calls: Calls
    errors: dict[str, int] = Field(description="failed attempts and refusals by kind")
    last_error: LastError | None

    @classmethod
    def of(cls, name: str, s: dict[str, Any]) -> AdminVendor:
        last = s["last_error"]
        return cls(
            name=name,
            kind=s["kind"],
            operations=s["operations"],
            limit=s["concurrency"],
            qps=s["qps"],
            limits=Limits(
                scope=s["limits"]["scope"],
                fallback=s["limits"]["fallback"],
                local_limit=s["limits"]["local_limit"],
            ),
            in_flight=s["in_flight"],
            queued=s["queue_depth"],
            mailbox_capacity=s["mailbox"],
            breaker=Breaker(**s["breaker"]),
            latency=Latency(**s["latency"]),
            calls=Calls(**s["calls"]),
            errors=s["errors"],
            last_error=None
            if last is None
            else LastError(
                kind=last["kind"],
                message=last["message"],
                at=rfc3339(float(last["at"])),
            ),
        )


@routes.get("/api/v1/admin/vendors", response=list[AdminVendor])
async def all_vendors(request: web.Request) -> list[AdminVendor]:
    """Every configured vendor with its live figures in this process, by name."""
    return [AdminVendor.of(name, s) for name, s in sorted(request.app[vendors_key].stats().items())]
