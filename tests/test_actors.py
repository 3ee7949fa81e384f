"""The actor runtime (actors/runtime): ordering, backpressure, timeouts, supervision,
passivation, shutdown and metrics. No database: these actors only keep notes."""

from __future__ import annotations

import asyncio
import gc
import random
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from loguru import logger
from prometheus_client import CollectorRegistry, generate_latest

from actors import (
    Actor,
    ActorStopped,
    ActorSystem,
    AskTimeout,
    Envelope,
    MailboxFull,
    Message,
    SystemClosed,
)
from server.errors import Busy, ErrorCode

pytestmark = pytest.mark.timeout(30)


# ---------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Ping(Message[int]):
    n: int


@dataclass(frozen=True, slots=True)
class Note(Message[None]):
    sender: int
    seq: int


@dataclass(frozen=True, slots=True)
class Boom(Message[None]):
    pass


@dataclass(frozen=True, slots=True)
class Bye(Message[None]):
    pass


# ---------------------------------------------------------------- helpers


@dataclass
class Probe:
    """What the actors of one test report back."""

    handled: list[Any] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    instances: int = 0
    expected: int = 0
    bounce: bool = False


@pytest.fixture
async def system() -> AsyncIterator[ActorSystem]:
    system = ActorSystem(default_ask_timeout=5.0)
    await system.start()
    yield system
    await system.stop(timeout=5.0)


async def within(seconds: float, awaitable: Any) -> Any:
    async with asyncio.timeout(seconds):
        return await awaitable


class Echo(Actor[Ping]):
    passivate_after = None

    async def receive(self, msg: Ping) -> int:
        return msg.n


# ---------------------------------------------------------------- ordering


class Recorder(Actor[Note]):
    """Notes what it handles, and whether a turn ever began while another was running."""

    mailbox_size = 10_000
    passivate_after = None

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []
        self.busy = False
        self.overlaps = 0
        self.batch_sizes: list[int] = []

    async def receive(self, msg: Note) -> None:
        self.overlaps += self.busy
        self.busy = True
        await asyncio.sleep(0)  # give other tasks a chance to send (or to overlap, if they could)
        self.seen.append((msg.sender, msg.seq))
        self.busy = False


class BatchRecorder(Recorder):
    batch_max = 16

    async def receive_batch(self, batch: Sequence[Envelope[Note]]) -> None:
        self.overlaps += self.busy
        self.busy = True
        self.batch_sizes.append(len(batch))
        await asyncio.sleep(0)
        for env in batch:
            self.seen.append((env.msg.sender, env.msg.seq))
            env.ok(None)
        self.busy = False


@pytest.mark.parametrize("kind", [Recorder, BatchRecorder])
async def test_messages_from_one_sender_are_handled_in_order_one_turn_at_a_time(
    system: ActorSystem, kind: type[Recorder]
) -> None:
    actor = kind()
    ref = system.spawn(actor)

    async def sender(sender: int) -> None:
        for seq in range(300):
            if seq % 5 == 0:
                await ref.ask(Note(sender, seq))
            else:
                ref.tell(Note(sender, seq))
        await ref.ask(Note(sender, 300))  # handled after all of this sender's tells

    await within(10, asyncio.gather(*(sender(s) for s in range(6))))

    assert actor.overlaps == 0
    for s in range(6):
        assert [seq for who, seq in actor.seen if who == s] == list(range(301))
    if kind is BatchRecorder:
        assert max(actor.batch_sizes) > 1
        assert max(actor.batch_sizes) <= BatchRecorder.batch_max


class Grader(Actor[Ping]):
    """Answers each envelope of a batch on its own: evens pass, odds fail, 0 is left unanswered."""

    batch_max = 64
    passivate_after = None

    async def receive_batch(self, batch: Sequence[Envelope[Ping]]) -> None:
        for env in batch:
            if env.msg.n == 0:
                continue
            if env.msg.n % 2:
                env.fail(ValueError(f"odd {env.msg.n}"))
            else:
                env.ok(env.msg.n * 10)


async def test_a_batch_handler_answers_each_message_on_its_own(system: ActorSystem) -> None:
    ref = system.spawn(Grader())
    results = await within(5, asyncio.gather(*(ref.ask(Ping(n)) for n in range(6)), return_exceptions=True))
    assert results[0] is None
    assert results[2] == 20 and results[4] == 40
    assert [str(r) for r in (results[1], results[3], results[5])] == ["odd 1", "odd 3", "odd 5"]
    handled = system.snapshot()["kinds"]["Grader"]["handled"]
    assert (handled["ok"], handled["error"]) == (3, 3)


# ---------------------------------------------------------------- backpressure


class Blocker(Actor[Ping]):
    """Holds its first message until the probe says so."""

    passivate_after = None

    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    async def receive(self, msg: Ping) -> int:
        self.probe.started.set()
        await self.probe.release.wait()
        self.probe.handled.append(msg.n)
        if len(self.probe.handled) == self.probe.expected:
            self.probe.done.set()
        return msg.n


async def test_a_full_mailbox_rejects_at_once_with_busy() -> None:
    probe = Probe(expected=3)
    async with ActorSystem(mailbox_sizes={"Blocker": 2}) as system:
        ref = system.spawn(Blocker(probe))
        ref.tell(Ping(1))
        await within(5, probe.started.wait())  # 1 is being handled: the mailbox is empty
        ref.tell(Ping(2))
        ref.tell(Ping(3))

        with pytest.raises(MailboxFull) as caught:
            ref.tell(Ping(4))
        with pytest.raises(MailboxFull):
            await ref.ask(Ping(5))

        error = caught.value
        assert isinstance(error, Busy)
        assert error.code is ErrorCode.BUSY and error.status == 503
        assert error.retry_after == 1
        assert system.snapshot()["kinds"]["Blocker"]["handled"]["rejected"] == 2

        probe.release.set()
        await within(5, probe.done.wait())  # the mailbox has room again
        assert await within(5, ref.ask(Ping(6))) == 6
        assert probe.handled == [1, 2, 3, 6]


# ---------------------------------------------------------------- timeouts


class Late(Actor[Ping]):
    """Answers only when released; negative numbers fail."""

    passivate_after = None

    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    async def receive(self, msg: Ping) -> int:
        if msg.n < 100:
            await self.probe.release.wait()
        if msg.n < 0:
            raise ValueError("late and wrong")
        return msg.n


async def test_an_ask_that_times_out_raises_and_its_late_reply_is_dropped_quietly(
    system: ActorSystem,
) -> None:
    loop_errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    try:
        probe = Probe()
        ref = system.spawn(Late(probe))

        with pytest.raises(AskTimeout) as caught:
            await ref.ask(Ping(1), timeout=0.05)
        with pytest.raises(AskTimeout) as second:
            await ref.ask(Ping(-1), timeout=0.05)
        assert caught.value.code is ErrorCode.BUSY
        # 503 over HTTP, yet neither a Busy (retry loops skip it) nor a TimeoutError
        # (a deadline around larger work is never taken for it).
        assert not isinstance(second.value, Busy | TimeoutError)
        del second

        probe.release.set()
        assert await within(5, ref.ask(Ping(100))) == 100  # handled after both late ones
        del caught
        gc.collect()
    finally:
        loop.set_exception_handler(previous)

    assert loop_errors == []
    stats = system.snapshot()["kinds"]["Late"]
    assert stats["ask_timeouts"] == 2
    assert stats["handled"]["timeout"] == 2
    assert stats["restarts"] == 0


async def test_an_ask_whose_caller_is_cancelled_is_dropped_quietly(system: ActorSystem) -> None:
    probe = Probe()
    ref = system.spawn(Blocker(probe))
    asker = asyncio.create_task(ref.ask(Ping(1)))
    await within(5, probe.started.wait())  # the message is being handled
    asker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asker

    probe.release.set()
    assert await within(5, ref.ask(Ping(2))) == 2
    assert probe.handled == [1, 2]
    assert system.snapshot()["kinds"]["Blocker"]["handled"]["cancelled"] == 1


# ---------------------------------------------------------------- errors and supervision


class Fragile(Actor[Ping | Boom]):
    """Fails on negative pings; records the failures it is told about."""

    passivate_after = None

    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    async def receive(self, msg: Ping | Boom) -> int:
        if isinstance(msg, Boom) or msg.n < 0:
            raise ValueError(f"bad {msg}")
        return msg.n

    async def on_failure(self, msg: Ping | Boom, exc: Exception) -> None:
        self.probe.handled.append((msg, str(exc)))
        self.probe.done.set()


async def test_a_handler_error_during_ask_goes_to_the_caller_and_the_actor_lives_on(
    system: ActorSystem,
) -> None:
    probe = Probe()
    ref = system.spawn(Fragile(probe))
    with pytest.raises(ValueError, match="bad Ping"):
        await ref.ask(Ping(-1))
    assert await ref.ask(Ping(2)) == 2
    assert probe.handled == []  # on_failure is for tells only
    assert system.snapshot()["kinds"]["Fragile"]["restarts"] == 0


async def test_a_handler_error_during_tell_is_logged_with_the_actor_id_and_reaches_on_failure(
    system: ActorSystem,
) -> None:
    records: list[Any] = []
    sink = logger.add(lambda message: records.append(message.record), level="ERROR")
    try:
        probe = Probe()
        ref = system.spawn(Fragile(probe), name="fragile")
        ref.tell(Boom())
        await within(5, probe.done.wait())
        assert await ref.ask(Ping(3)) == 3
    finally:
        logger.remove(sink)

    assert probe.handled == [(Boom(), "bad Boom()")]
    assert [r["extra"].get("actor") for r in records] == ["fragile"]
    assert "Boom failed" in records[0]["message"]
    assert isinstance(records[0]["exception"].value, ValueError)


class CrashyBatch(Actor[Ping | Boom]):
    """A batch handler that crashes (an error outside any one message) on Boom."""

    batch_max = 8
    passivate_after = None
    restart_backoff = 0.001

    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    async def on_start(self) -> None:
        self.probe.instances += 1

    async def receive_batch(self, batch: Sequence[Envelope[Ping | Boom]]) -> None:
        if any(isinstance(env.msg, Boom) for env in batch):
            raise RuntimeError("the batch went wrong")
        for env in batch:
            assert isinstance(env.msg, Ping)
            env.ok(env.msg.n)


async def test_a_crashing_actor_is_restarted_and_keeps_serving(system: ActorSystem) -> None:
    probe = Probe()
    ref = system.spawn(CrashyBatch(probe))
    with pytest.raises(RuntimeError, match="the batch went wrong"):
        await ref.ask(Boom())
    assert await within(5, ref.ask(Ping(7))) == 7
    assert probe.instances == 2  # on_start ran again after the restart
    stats = system.snapshot()["kinds"]["CrashyBatch"]
    assert stats["restarts"] == 1
    assert stats["handled"]["crashed"] == 1 and stats["handled"]["ok"] == 1


class Unlucky(Actor[Ping]):
    """Its handler awaits something that someone else cancelled."""

    passivate_after = None
    restart_backoff = 0.001

    async def receive(self, msg: Ping) -> int:
        if msg.n < 0:
            doomed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            doomed.cancel()
            await doomed
        return msg.n


async def test_a_stray_cancelled_error_from_a_handler_is_a_crash_and_not_a_cancellation(
    system: ActorSystem,
) -> None:
    ref = system.spawn(Unlucky())
    with pytest.raises(RuntimeError, match="crashed: CancelledError"):
        await ref.ask(Ping(-1))
    assert await within(5, ref.ask(Ping(1))) == 1
    assert system.snapshot()["kinds"]["Unlucky"]["restarts"] == 1


class NeverStarts(Actor[Ping]):
    max_restarts = 3
    restart_backoff = 0.001
    passivate_after = None

    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    async def on_start(self) -> None:
        self.probe.instances += 1
        raise RuntimeError("cannot start")


async def test_a_crash_loop_stops_the_actor_and_fails_pending_asks_with_actor_stopped(
    system: ActorSystem,
) -> None:
    probe = Probe()
    ref = system.spawn(NeverStarts(probe))
    results = await within(5, asyncio.gather(ref.ask(Ping(1)), ref.ask(Ping(2)), return_exceptions=True))

    assert [type(r) for r in results] == [ActorStopped, ActorStopped]
    assert probe.instances == 1 + NeverStarts.max_restarts
    stats = system.snapshot()["kinds"]["NeverStarts"]
    assert stats["restarts"] == NeverStarts.max_restarts
    assert stats["stops"]["gave_up"] == 1
    assert stats["handled"]["stopped"] == 2  # they were queued, then failed
    with pytest.raises(ActorStopped):
        ref.tell(Ping(3))
    await within(5, system.wait_empty(NeverStarts))


async def test_an_actor_that_asks_itself_gets_an_error_instead_of_a_deadlock(system: ActorSystem) -> None:
    class Narcissus(Actor[Ping]):
        passivate_after = None

        async def receive(self, msg: Ping) -> int:
            return await self.ref.ask(Ping(msg.n + 1))

    ref = system.spawn(Narcissus())
    with pytest.raises(RuntimeError, match="asked itself"):
        await ref.ask(Ping(1), timeout=1)


# ---------------------------------------------------------------- keyed actors and passivation


class Idle(Actor[Ping]):
    passivate_after = 0.05

    async def receive(self, msg: Ping) -> int:
        return msg.n


async def test_ten_thousand_keyed_actors_passivate_when_idle_and_give_their_memory_back(
    system: ActorSystem,
) -> None:
    refs: list[weakref.ref[Idle]] = []

    def make() -> Idle:
        actor = Idle()
        refs.append(weakref.ref(actor))
        return actor

    system.register(Idle, make)
    for user_id in range(10_000):
        system.ref(Idle, user_id).tell(Ping(user_id))
    assert system.alive(Idle) == 10_000

    await within(20, system.wait_empty(Idle))
    gc.collect()

    assert system.alive(Idle) == 0
    stats = system.snapshot()["kinds"]["Idle"]
    assert stats["alive"] == 0
    assert stats["handled"]["ok"] == 10_000
    assert stats["stops"]["passivated"] == 10_000
    assert len(refs) == 10_000
    assert sum(r() is not None for r in refs) == 0

    assert await system.ref(Idle, 42).ask(Ping(42)) == 42  # spawned again on its next message
    assert system.alive(Idle) == 1


class Racer(Actor[Note]):
    """Keyed; with `probe.bounce`, its first instance sends its own key a message on stopping."""

    passivate_after = 0.01

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        probe.instances += 1
        self.number = probe.instances

    async def on_start(self) -> None:
        self.probe.events.append(f"start {self.number}")

    async def receive(self, msg: Note) -> None:
        self.probe.handled.append((self.number, msg.seq))
        if len(self.probe.handled) == self.probe.expected:
            self.probe.done.set()

    async def on_stop(self) -> None:
        if self.probe.bounce and self.number == 1:
            # This instance has left the registry but its task has not ended: the
            # message must reach a fresh instance, which starts only after this one ends.
            self.system.ref(Racer, self.key).tell(Note(0, 2))
            await asyncio.sleep(0)
        self.probe.events.append(f"stop {self.number}")


async def test_a_tell_racing_with_passivation_is_not_lost(system: ActorSystem) -> None:
    probe = Probe(expected=2, bounce=True)
    system.register(Racer, lambda: Racer(probe))
    system.ref(Racer, "u1").tell(Note(0, 1))

    await within(5, probe.done.wait())

    assert probe.handled == [(1, 1), (2, 2)]
    assert probe.events[:3] == ["start 1", "stop 1", "start 2"]


async def test_tells_interleaved_with_constant_passivation_are_all_handled_in_order() -> None:
    # passivate_after=0: the actor passivates whenever it is found parked with an empty
    # mailbox. The sender yields 0-3 loop turns between tells, so many tells land just
    # after a passivation, while the old instance is still finishing.
    probe = Probe(expected=3_000)
    turns = random.Random(7)
    async with ActorSystem(passivate_after={"Racer": 0.0}, mailbox_sizes={"Racer": 3_000}) as system:
        system.register(Racer, lambda: Racer(probe))
        ref = system.ref(Racer, "u2")
        for seq in range(3_000):
            ref.tell(Note(0, seq))
            for _ in range(turns.choice((0, 0, 0, 1, 2, 3))):
                await asyncio.sleep(0)  # interleaving, not synchronisation
        await within(10, probe.done.wait())

    assert [seq for _, seq in probe.handled] == list(range(3_000))
    assert probe.instances > 100
    # One instance per key at a time: each started after its predecessor stopped.
    expected = [f"{what} {n}" for n in range(1, probe.instances + 1) for what in ("start", "stop")]
    assert probe.events == expected


class Quitter(Actor[Note | Bye]):
    """Keyed; Bye makes it stop itself, then hold until released."""

    passivate_after = None

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        probe.instances += 1
        self.number = probe.instances

    async def receive(self, msg: Note | Bye) -> None:
        if isinstance(msg, Bye):
            self.stop()
            self.probe.started.set()
            await self.probe.release.wait()
            return
        self.probe.handled.append((self.number, msg.seq))
        if msg.seq == 5:
            self.probe.done.set()


async def test_messages_sent_while_a_keyed_actor_drains_wait_for_it_and_keep_their_order(
    system: ActorSystem,
) -> None:
    probe = Probe()
    system.register(Quitter, lambda: Quitter(probe))
    ref = system.ref(Quitter, 7)
    for msg in (Note(0, 1), Bye(), Note(0, 2), Note(0, 3)):
        ref.tell(msg)
    await within(5, probe.started.wait())
    ref.tell(Note(0, 5))  # goes to a successor that waits for the first instance to drain
    probe.release.set()
    await within(5, probe.done.wait())

    assert probe.handled == [(1, 1), (1, 2), (1, 3), (2, 5)]


# ---------------------------------------------------------------- shutdown


async def test_shutdown_with_a_thousand_messages_queued_ends_within_its_bound() -> None:
    probe = Probe()  # never released: the Blocker hangs on its first message
    system = ActorSystem(mailbox_sizes={"Blocker": 1_000, "Recorder": 1_000}, cancel_grace=0.5)
    await system.start()
    stuck = system.spawn(Blocker(probe))
    quick = system.spawn(Recorder())
    asks: list[asyncio.Task[Any]] = [asyncio.create_task(stuck.ask(Ping(n), timeout=30)) for n in range(500)]
    asks += [asyncio.create_task(quick.ask(Note(0, n), timeout=30)) for n in range(500)]
    # Tasks take their first step in creation order: every ask is queued before stop() begins.
    stopper = asyncio.create_task(system.stop(timeout=0.5))
    loop = asyncio.get_running_loop()
    began = loop.time()
    await within(5, stopper)
    elapsed = loop.time() - began

    assert elapsed < 0.5 + 0.5 + 0.25
    results = await within(5, asyncio.gather(*asks, return_exceptions=True))
    assert all(type(r) is ActorStopped for r in results[:500])
    assert results[500:] == [None] * 500  # the quick one drained everything in time
    assert system.alive() == 0
    stats = system.snapshot()
    assert stats["closed"]
    assert stats["kinds"]["Blocker"]["stops"]["cancelled"] == 1
    assert stats["kinds"]["Recorder"]["stops"]["stopped"] == 1


async def test_tell_and_ask_after_the_system_closed_raise_system_closed() -> None:
    system = ActorSystem()
    await system.start()
    keyed = system.ref(Echo, 1)
    unkeyed = system.spawn(Echo())
    await system.stop(timeout=1)

    for ref in (keyed, unkeyed):
        with pytest.raises(SystemClosed):
            ref.tell(Ping(1))
        with pytest.raises(ActorStopped):
            await ref.ask(Ping(1))
    with pytest.raises(SystemClosed):
        system.spawn(Echo())
    await system.stop(timeout=1)  # a second stop changes nothing


# ---------------------------------------------------------------- metrics


async def test_metrics_are_exported_while_running_and_snapshot_shows_the_deepest_mailboxes() -> None:
    registry = CollectorRegistry()
    probe = Probe()
    async with ActorSystem(registry) as system:
        echo = system.ref(Echo, "e")
        for n in range(3):
            assert await echo.ask(Ping(n)) == n
        blocked = system.spawn(Blocker(probe), name="blocked")
        blocked.tell(Ping(0))
        await within(5, probe.started.wait())
        for n in range(1, 4):
            blocked.tell(Ping(n))

        text = generate_latest(registry).decode()
        assert 'wardrobe_actors_alive{kind="Echo"} 1.0' in text
        assert 'wardrobe_actor_messages_total{kind="Echo",outcome="ok"} 3.0' in text
        assert 'wardrobe_actor_mailbox_depth{kind="Blocker"} 3.0' in text
        assert 'wardrobe_actor_handler_seconds_count{kind="Echo"} 3.0' in text
        assert 'wardrobe_actor_spawns_total{kind="Blocker"} 1.0' in text
        for name in ("restarts_total", "ask_timeouts_total", "stops_total", "batch_size_bucket"):
            assert f"wardrobe_actor_{name}" in text

        snapshot = system.snapshot(top=5)
        assert snapshot["deepest"] == [{"actor": "blocked", "kind": "Blocker", "depth": 3, "capacity": 100}]
        assert snapshot["kinds"]["Echo"]["handled"]["ok"] == 3
        assert snapshot["kinds"]["Blocker"]["mailbox_depth"] == 3
        probe.release.set()

    assert "wardrobe_actor" not in generate_latest(registry).decode()
    async with ActorSystem(registry):  # the registry can serve the next system
        assert "wardrobe_actor" in generate_latest(registry).decode()
