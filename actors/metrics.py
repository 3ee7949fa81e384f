"""Actor metrics: cheap counters on the hot path, exported to Prometheus at scrape time.

A message costs a few integer increments and one `bisect` here; prometheus_client's own
metric objects take a lock per update, which would cost more than the mailbox itself.
`ActorCollector` turns the counters into metric families when the registry is scraped,
and `ActorSystem.snapshot()` turns the same counters into plain dicts for the dashboard.

Metric names (label `kind` is the actor class name):

- `wardrobe_actors_alive{kind}` gauge: actors running now.
- `wardrobe_actor_mailbox_depth{kind}` gauge: messages waiting, summed over the kind.
- `wardrobe_actor_messages_total{kind,outcome}` counter, one count per message:
  ok, error (handler raised), timeout (handled after its ask timed out; reply dropped),
  cancelled (handled after its asker was cancelled), crashed (in a batch whose handler
  crashed), stopped (never handled: failed with ActorStopped), rejected (mailbox full).
- `wardrobe_actor_handler_seconds{kind}` histogram: one observation per `receive`
  call or per `receive_batch` call.
- `wardrobe_actor_batch_size{kind}` histogram: messages per `receive_batch` call.
- `wardrobe_actor_restarts_total{kind}` counter: loop restarts by the supervisor.
- `wardrobe_actor_ask_timeouts_total{kind}` counter: asks that raised AskTimeout.
- `wardrobe_actor_spawns_total{kind}` counter.
- `wardrobe_actor_stops_total{kind,reason}` counter: stopped, passivated, gave_up, cancelled.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, TypedDict

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
OUTCOMES: tuple[str, ...] = ("ok", "error", "timeout", "cancelled", "crashed", "stopped", "rejected")
STOP_REASONS: tuple[str, ...] = ("stopped", "passivated", "gave_up", "cancelled")


class Buckets:
    """A histogram without locks: the event loop is the only writer."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last slot is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        running = 0
        out: list[tuple[str, float]] = []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == math.inf else repr(float(bound)), running))
        return out


class KindStats:
    """Counters for one actor kind, shared by all its instances."""

    __slots__ = (
        "alive",
        "ask_timeouts",
        "batch",
        "kind",
        "latency",
        "outcomes",
        "restarts",
        "spawns",
        "stops",
    )

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.alive = 0
        self.spawns = 0
        self.restarts = 0
        self.ask_timeouts = 0
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.stops: dict[str, int] = dict.fromkeys(STOP_REASONS, 0)
        self.latency = Buckets(LATENCY_BUCKETS)
        self.batch = Buckets(BATCH_BUCKETS)


class KindSnapshot(TypedDict):
    alive: int
    mailbox_depth: int
    handled: dict[str, int]
    restarts: int
    ask_timeouts: int
    spawns: int
    stops: dict[str, int]


class MailboxSnapshot(TypedDict):
    actor: str
    kind: str
    depth: int
    capacity: int


class SystemSnapshot(TypedDict):
    closed: bool
    kinds: dict[str, KindSnapshot]
    deepest: list[MailboxSnapshot]


def kind_snapshot(stats: KindStats, mailbox_depth: int) -> KindSnapshot:
    return KindSnapshot(
        alive=stats.alive,
        mailbox_depth=mailbox_depth,
        handled=dict(stats.outcomes),
        restarts=stats.restarts,
        ask_timeouts=stats.ask_timeouts,
        spawns=stats.spawns,
        stops=dict(stats.stops),
    )


class StatsSource(Protocol):
    def kind_stats(self) -> Iterable[KindStats]: ...

    def mailbox_depths(self) -> Mapping[str, int]: ...


class _Families:
    """The metric families of one scrape, typed so each can take its samples."""

    def __init__(self) -> None:
        kind = ["kind"]
        self.alive = GaugeMetricFamily("wardrobe_actors_alive", "Actors running now.", labels=kind)
        self.depth = GaugeMetricFamily(
            "wardrobe_actor_mailbox_depth", "Messages waiting in mailboxes.", labels=kind
        )
        self.messages = CounterMetricFamily(
            "wardrobe_actor_messages", "Messages by final outcome.", labels=["kind", "outcome"]
        )
        self.latency = HistogramMetricFamily(
            "wardrobe_actor_handler_seconds", "Time in receive or receive_batch.", labels=kind
        )
        self.batch = HistogramMetricFamily(
            "wardrobe_actor_batch_size", "Messages per receive_batch call.", labels=kind
        )
        self.restarts = CounterMetricFamily(
            "wardrobe_actor_restarts", "Loop restarts by the supervisor.", labels=kind
        )
        self.timeouts = CounterMetricFamily(
            "wardrobe_actor_ask_timeouts", "Asks that raised AskTimeout.", labels=kind
        )
        self.spawns = CounterMetricFamily("wardrobe_actor_spawns", "Actors started.", labels=kind)
        self.stops = CounterMetricFamily(
            "wardrobe_actor_stops", "Actors stopped, by reason.", labels=["kind", "reason"]
        )

    def all(self) -> list[Metric]:
        return [
            self.alive,
            self.depth,
            self.messages,
            self.latency,
            self.batch,
            self.restarts,
            self.timeouts,
            self.spawns,
            self.stops,
        ]


class ActorCollector:
    """A prometheus_client collector reading an actor system's counters at scrape time."""

    def __init__(self, source: StatsSource) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        return _Families().all()

    def collect(self) -> Iterable[Metric]:
        f = _Families()
        depths = self._source.mailbox_depths()
        for stats in list(self._source.kind_stats()):
            kind = stats.kind
            f.alive.add_metric([kind], stats.alive)
            f.depth.add_metric([kind], depths.get(kind, 0))
            for outcome, count in stats.outcomes.items():
                f.messages.add_metric([kind, outcome], count)
            f.latency.add_metric([kind], stats.latency.cumulative(), stats.latency.total)
            f.batch.add_metric([kind], stats.batch.cumulative(), stats.batch.total)
            f.restarts.add_metric([kind], stats.restarts)
            f.timeouts.add_metric([kind], stats.ask_timeouts)
            f.spawns.add_metric([kind], stats.spawns)
            for reason, count in stats.stops.items():
                f.stops.add_metric([kind, reason], count)
        return f.all()


__all__ = [
    "ActorCollector",
    "Buckets",
    "KindSnapshot",
    "KindStats",
    "MailboxSnapshot",
    "SystemSnapshot",
    "kind_snapshot",
]
