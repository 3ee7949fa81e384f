"""Actor runtime benchmark: ask round trips against a bare asyncio.Queue loop, and memory
per idle actor.

    .venv/bin/python bench/actors.py

Each ask figure is the best of several rounds, measured in the same run as a bare
`asyncio.Queue` loop of the same shape (a request queue, a server task, a future for the
reply), rounds interleaved so both see the same machine. Throughput is counted per second
of this process's CPU time (`time.process_time`): the loop is single-threaded, so that is
its cost per round trip, and it does not swing with whatever else the machine runs.
Wall-clock figures are printed too. Prints a table, then lines for bench/RESULTS.md.
No assertions; about 30-40 s.
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import os
import platform
import resource
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import Actor, ActorSystem, Message

ROUNDS = 9
SINGLE_ASKS = 30_000
SPREAD_ACTORS = 1_000
SPREAD_ASKS_EACH = 30
IDLE_ACTORS = 10_000


@dataclass(frozen=True, slots=True)
class Ping(Message[int]):
    n: int


class Echo(Actor[Ping]):
    mailbox_size = 64

    async def receive(self, msg: Ping) -> int:
        return msg.n


# ------------------------------------------------------------------ the bare loop


async def _bare_server(queue: asyncio.Queue[tuple[int, asyncio.Future[int]]]) -> None:
    while True:
        n, reply = await queue.get()
        if not reply.done():
            reply.set_result(n)


async def _bare_client(queue: asyncio.Queue[tuple[int, asyncio.Future[int]]], count: int) -> None:
    loop = asyncio.get_running_loop()
    for n in range(count):
        reply: asyncio.Future[int] = loop.create_future()
        queue.put_nowait((n, reply))
        await reply


@dataclass(frozen=True, slots=True)
class Rate:
    cpu: float  # round trips per CPU second
    wall: float  # round trips per wall-clock second


class Clock:
    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def rate(self, ops: int) -> Rate:
        return Rate(ops / (time.process_time() - self.cpu), ops / (time.perf_counter() - self.wall))


async def bare(servers: int, each: int) -> Rate:
    """Round trips through `servers` queue+task pairs, one client per pair."""
    queues: list[asyncio.Queue[tuple[int, asyncio.Future[int]]]] = [
        asyncio.Queue(maxsize=64) for _ in range(servers)
    ]
    tasks = [asyncio.create_task(_bare_server(q)) for q in queues]
    await asyncio.sleep(0)
    try:
        clock = Clock()
        await asyncio.gather(*(_bare_client(q, each) for q in queues))
        return clock.rate(servers * each)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ------------------------------------------------------------------ the actors


async def _actor_client(system: ActorSystem, key: int, count: int) -> None:
    ref = system.ref(Echo, key)
    for n in range(count):
        await ref.ask(Ping(n))


async def actors(count: int, each: int) -> Rate:
    """Ask round trips to `count` keyed actors, one client per actor."""
    async with ActorSystem() as system:
        for key in range(count):  # spawn first: measure round trips, not spawning
            await system.ref(Echo, key).ask(Ping(0))
        clock = Clock()
        await asyncio.gather(*(_actor_client(system, key, each) for key in range(count)))
        return clock.rate(count * each)


async def measured(measure: Callable[[], Awaitable[Rate]]) -> Rate:
    gc.collect()
    return await measure()


# ------------------------------------------------------------------ memory


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _spawn_idle(system: ActorSystem, count: int) -> None:
    for key in range(count):
        await system.ref(Echo, key).ask(Ping(key))  # each parks, idle, after its answer


async def idle_memory() -> dict[str, float]:
    out: dict[str, float] = {}
    gc.collect()
    before = rss_bytes()
    async with ActorSystem() as system:
        await _spawn_idle(system, IDLE_ACTORS)
        gc.collect()
        out["rss"] = rss_bytes() - before
    gc.collect()
    tracemalloc.start()
    try:
        async with ActorSystem() as system:
            base = tracemalloc.take_snapshot()
            await _spawn_idle(system, IDLE_ACTORS)
            gc.collect()
            grown = tracemalloc.take_snapshot().compare_to(base, "filename")
            out["heap"] = sum(stat.size_diff for stat in grown)
    finally:
        tracemalloc.stop()
    return out


# ------------------------------------------------------------------ report


async def main() -> None:
    runs: dict[str, Callable[[], Awaitable[Rate]]] = {
        "bare1": lambda: bare(1, SINGLE_ASKS),
        "actor1": lambda: actors(1, SINGLE_ASKS),
        "bareN": lambda: bare(SPREAD_ACTORS, SPREAD_ASKS_EACH),
        "actorN": lambda: actors(SPREAD_ACTORS, SPREAD_ASKS_EACH),
    }
    results: dict[str, list[Rate]] = {name: [] for name in runs}
    await actors(1, 5_000)  # warm up
    began = time.perf_counter()
    for _ in range(ROUNDS):
        for name, run in runs.items():
            results[name].append(await measured(run))
    cpu = {name: max(r.cpu for r in rates) for name, rates in results.items()}
    wall = {name: max(r.wall for r in rates) for name, rates in results.items()}
    memory = await idle_memory()
    elapsed = time.perf_counter() - began

    one, spread = cpu["actor1"] / cpu["bare1"], cpu["actorN"] / cpu["bareN"]
    rss_mb = memory["rss"] / 2**20
    heap_kb = memory["heap"] / IDLE_ACTORS / 1024
    python = f"Python {platform.python_version()}"
    print(f"{python} on {platform.machine()}, {os.cpu_count()} CPUs, best of {ROUNDS} rounds")
    print()
    print(f"{'round trips':<36}{'per CPU s':>11}{'µs CPU':>8}{'ratio':>7}{'per wall s':>12}{'ratio':>7}")
    rows = [
        ("bare Queue loop, 1 server", "bare1", "bare1"),
        ("ask, 1 actor", "actor1", "bare1"),
        (f"bare Queue loop, {SPREAD_ACTORS:,} servers", "bareN", "bareN"),
        (f"ask, spread over {SPREAD_ACTORS:,} actors", "actorN", "bareN"),
    ]
    for label, name, base in rows:
        print(
            f"{label:<36}{cpu[name]:>11,.0f}{1e6 / cpu[name]:>8.1f}{cpu[name] / cpu[base]:>7.2f}"
            f"{wall[name]:>12,.0f}{wall[name] / wall[base]:>7.2f}"
        )
    print()
    each = memory["rss"] / IDLE_ACTORS
    print(f"RSS per {IDLE_ACTORS:,} idle keyed actors: {rss_mb:.1f} MiB ({each:,.0f} B each)")
    print(f"Python heap per idle actor (tracemalloc): {heap_kb:.2f} KiB")
    print(f"(ran in {elapsed:.0f} s; target: ask ratios >= 0.50)")
    print()
    print("Lines for bench/RESULTS.md:")
    today = datetime.date.today().isoformat()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"## actors ({today}, {python}, `bench/actors.py`)")
    print()
    print("| ask round trips | per CPU second | vs bare asyncio.Queue loop | wall-clock ratio |")
    print("|---|---:|---:|---:|")
    print(
        f"| 1 actor | {cpu['actor1']:,.0f} | {one:.2f}× ({cpu['bare1']:,.0f}/s) "
        f"| {wall['actor1'] / wall['bare1']:.2f}× |"
    )
    print(
        f"| spread over {SPREAD_ACTORS:,} actors | {cpu['actorN']:,.0f} "
        f"| {spread:.2f}× ({cpu['bareN']:,.0f}/s) | {wall['actorN'] / wall['bareN']:.2f}× |"
    )
    print()
    print(
        f"{IDLE_ACTORS:,} idle keyed actors: {rss_mb:.1f} MiB RSS ({each:,.0f} B each), "
        f"{heap_kb:.2f} KiB of Python heap each (tracemalloc); peak RSS of the run {maxrss:.0f} MiB."
    )


if __name__ == "__main__":
    asyncio.run(main())
