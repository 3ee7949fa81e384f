"""Live events to 1,000 WebSocket clients: the app against a bare aiohttp broadcast loop
and python-socketio.

    .venv/bin/python bench/ws.py [--clients 1000] [--seconds 5] [--window 4] [--runs 3] [--rate 10000]

Two servers, each one process pinned to CPU 0 (with two or more CPUs):

- app: `create_app` + `web.run_app` on private MariaDB and Redis instances
  (server.embedded, under ./var/bench; Redis pinned to CPU 0 too). Every client is a
  different user on GET /api/v1/ws. An event goes: the hub's publish script (Lua:
  seq, stream, PUBLISH) → Redis pub/sub (redis-py PubSub) → the app's dispatcher → the
  user's socket (its writer task, `WebSocketResponse.send_frame`);
- bare: a one-route aiohttp app that keeps its websockets in a set; POST /round
  sends one event frame to every socket from an in-process loop (`send_str`);
- socketio: python-socketio's `AsyncServer` on aiohttp (what the old system planned
  to use); POST /round broadcasts the same event to every client (`sio.emit`, no
  Redis: the most it can do in one process).

The clients are one process on CPU 1: 1,000 minimal RFC 6455 clients (a Protocol
each; aiohttp's client costs more per frame than either server, so it would measure
itself). It drives rounds: a round is one event to every client. For the app a
publisher process (on CPU 1 too) publishes each round with the hub's own script, 100
users per redis-py pipeline; for bare and socketio, a POST /round. Each event carries `t`, time.time()
when its round started; latency is from `t` to the client reading the frame.

Two phases, each `--seconds` after a 1 s warm-up: "max", rounds back to back with at
most `--window` in flight (throughput; runs alternate bare/app/socketio, best of `--runs`),
and "paced", one round every clients/`--rate` seconds (latency at a fixed load). The
CPU each process used meanwhile is printed too. About 2 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._support import free_port, pin, services, wait_until_up  # noqa: E402

SLICE = 100  # events per pipeline of the bench's publisher
DATA = {"task_id": "tsk_3k9f02a7", "step": "tryon", "progress": 0.5, "message": "rendering"}


def raise_nofile(want: int = 65536) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# ------------------------------------------------------------------ the two servers


def serve_app(port: int) -> None:
    from aiohttp import web

    from server.app import create_app
    from server.config import load_settings
    from server.logging import setup_logging

    pin(0)
    raise_nofile()
    settings = load_settings()
    setup_logging(settings.log_level)
    web.run_app(create_app(settings), host="127.0.0.1", port=port, access_log=None, print=None, backlog=2048)


def serve_bare(port: int) -> None:
    from aiohttp import web

    pin(0)
    raise_nofile()
    sockets: set[web.WebSocketResponse] = set()

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        await ws.send_str("hello")
        sockets.add(ws)
        try:
            async for _ in ws:
                pass
        finally:
            sockets.discard(ws)
        return ws

    async def round_handler(request: web.Request) -> web.Response:
        body = await request.json()
        frame = json.dumps(
            {"type": "event", "seq": body["r"], "event": "task.progress", "data": {**DATA, **body}},
            separators=(",", ":"),
        )
        for ws in list(sockets):
            await ws.send_str(frame)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    app.router.add_post("/round", round_handler)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=2048)


def serve_socketio(port: int) -> None:
    import socketio  # a dev dependency (setup.cfg), for this comparison only
    from aiohttp import web

    pin(0)
    raise_nofile()
    sio = socketio.AsyncServer(async_mode="aiohttp")
    app = web.Application()
    sio.attach(app)

    async def round_handler(request: web.Request) -> web.Response:
        body = await request.json()
        frame = {"type": "event", "seq": body["r"], "event": "task.progress", "data": {**DATA, **body}}
        await sio.emit("event", frame)  # to every connected client
        return web.Response(status=204)

    app.router.add_post("/round", round_handler)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=2048)


# ------------------------------------------------------------------ the clients


class RawClient(asyncio.Protocol):
    """A minimal WebSocket client (RFC 6455) for the load side.

    aiohttp's client spends ~40 µs of CPU a frame, more than either server, so with
    it the bench would measure the client. This one parses frames from the bytes as
    they come and reads only `r` and `t` of each event."""

    def __init__(self, path: str, host: str, on_event: Any, sio: bool = False) -> None:
        self.path, self.host, self.on_event, self.sio = path, host, on_event, sio
        self.buf = bytearray()
        self.upgraded = False
        self.first: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        # Socket.IO: the namespace connect ("40…") after the Engine.IO open packet ("0…")
        self.joined: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def send_text(self, payload: bytes) -> None:
        """A masked text frame (small payloads only)."""
        assert self.transport is not None and len(payload) < 126
        mask = os.urandom(4)
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.transport.write(bytes([0x81, 0x80 | len(body)]) + mask + body)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            assert buf.startswith(b"HTTP/1.1 101"), bytes(buf[:200])
            self.upgraded = True
            del buf[: end + 4]
        pos, size = 0, len(buf)
        while size - pos >= 2:
            opcode, length = buf[pos] & 0x0F, buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if size - pos < head + length:
                break
            payload = bytes(buf[pos + head : pos + head + length])
            pos += head + length
            if opcode == 1:
                if not self.first.done():
                    self.first.set_result(payload)
                    if self.sio:
                        self.send_text(b"40")
                elif not self.sio or payload.startswith(b"42"):
                    self.on_event(payload)
                elif payload == b"2":  # Engine.IO ping
                    self.send_text(b"3")
                elif payload.startswith(b"40") and not self.joined.done():
                    self.joined.set_result(payload)
            elif opcode == 9 and self.transport is not None:  # ping → masked pong
                mask = os.urandom(4)
                body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                self.transport.write(bytes([0x8A, 0x80 | len(body)]) + mask + body)
            elif opcode == 8 and not self.first.done():
                self.first.set_exception(ConnectionError(f"closed: {payload!r}"))
        del buf[:pos]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _round_and_time(payload: bytes) -> tuple[int, float]:
    """`r` and `t` of `{…,"data":{…,"r":R,"t":T}}` (every server puts them last; Socket.IO
    wraps the object in `42["event",…]`)."""
    at = payload.rindex(b'"r":')
    comma = payload.index(b",", at)
    return int(payload[at + 4 : comma]), float(payload[comma + 5 :].rstrip(b"}]"))


async def publisher() -> None:
    """Reads `r t` lines on stdin and publishes round r: one event per user, with the
    hub's own script (EventStreams.script, .keys and .args, as `publish` calls it),
    SLICE EVALSHA per redis-py pipeline."""
    from server.config import load_settings
    from server.hub import RedisEventHub
    from server.redis import connect_redis

    clients = int(sys.argv[sys.argv.index("--clients") + 1])
    settings = load_settings()
    redis = connect_redis(settings.redis_url or "", settings)  # as the app connects
    streams = RedisEventHub(redis, settings).streams  # publishing only: no sockets side
    user_ids = range(1, clients + 1)
    busy = asyncio.Semaphore(4)  # rounds encoded or in Redis at once; later ones wait their turn
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await streams.publish(0, [("bench.ready", {})])  # connected, script loaded
    print("ready", flush=True)

    sha = streams.script.sha  # loaded by the publish above: EVALSHA, no SCRIPT EXISTS per pipeline

    async def publish_slice(part: range, data: dict[str, Any]) -> list[Any]:
        async with redis.pipeline(transaction=False) as pipe:
            for uid in part:
                pipe.evalsha(sha, 3, *streams.keys(uid), *streams.args(uid, [("task.progress", data)]))
            return list(await pipe.execute())

    async def publish_round(r: int, t: float) -> None:
        # In slices, concurrently: the first events are on their way while the rest are
        # encoded (each slice holds different users, so no user's events are reordered).
        data = {**DATA, "r": r, "t": t}
        slices = [user_ids[i : i + SLICE] for i in range(0, len(user_ids), SLICE)]
        async with busy:
            results = await asyncio.gather(*(publish_slice(part, data) for part in slices))
        assert all(len(seqs) == len(part) for seqs, part in zip(results, slices, strict=True))

    rounds: set[asyncio.Task[None]] = set()  # rounds overlap: encode one while Redis runs another
    while line := await reader.readline():
        r, t = line.split()
        task = asyncio.create_task(publish_round(int(r), float(t)))
        rounds.add(task)
        task.add_done_callback(rounds.discard)
    await asyncio.gather(*rounds)
    await redis.aclose()


async def drive(
    target: str, base: str, clients: int, seconds: float, window: int, rate: float, pids: dict[str, int]
) -> dict[str, Any]:
    """Rounds for `seconds`: back to back (at most `window` in flight) or, with `rate`,
    one every clients/rate seconds (the window then only caps a backlog)."""
    from server.auth.tokens import TokenIssuer
    from server.config import load_settings

    settings = load_settings()
    issuer = TokenIssuer.from_settings(settings)
    user_ids = list(range(1, clients + 1))
    received: dict[int, int] = {}
    latencies: list[float] = []
    done: dict[int, asyncio.Event] = {}
    measuring = False
    loop = asyncio.get_running_loop()
    host, port = base.removeprefix("http://").split(":")
    gate = asyncio.Semaphore(100)

    def on_event(payload: bytes) -> None:
        r, t = _round_and_time(payload)
        if measuring:
            latencies.append(time.time() - t)
        n = received[r] = received.get(r, 0) + 1
        if n == clients:
            done.pop(r).set()

    async def open_socket(uid: int) -> RawClient:
        if target == "app":
            path = f"/api/v1/ws?token={issuer.issue_access(uid, 'user', f'{uid:032x}')}"
        elif target == "socketio":
            path = "/socket.io/?EIO=4&transport=websocket"
        else:
            path = "/ws"
        async with gate:
            _, proto = await loop.create_connection(
                lambda: RawClient(path, f"{host}:{port}", on_event, sio=target == "socketio"), host, int(port)
            )
            first = await asyncio.wait_for(proto.first, 30)
            if target == "bare":  # the bare server sends a hello so every path waits the same
                assert first == b"hello", first
            elif target == "socketio":  # Engine.IO open, then the namespace's connect answer
                assert first.startswith(b"0{"), first
                await asyncio.wait_for(proto.joined, 30)
            else:
                assert json.loads(first)["type"] == "ready", first
        return proto

    sockets = await asyncio.gather(*(open_socket(uid) for uid in user_ids))
    session = aiohttp.ClientSession()
    pub = None
    if target == "app":
        pub = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--publish",
            "--clients",
            str(clients),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert pub.stdout is not None
        assert await asyncio.wait_for(pub.stdout.readline(), 30) == b"ready\n"  # no cold start in rounds

    posts: set[asyncio.Task[None]] = set()

    async def start_round(r: int) -> None:
        t = time.time()
        if pub is not None:
            assert pub.stdin is not None
            pub.stdin.write(f"{r} {t!r}\n".encode())
        else:  # not awaited here: the window, not the POST's answer, paces the rounds
            posts.add(task := asyncio.create_task(post_round(r, t)))
            task.add_done_callback(posts.discard)

    async def post_round(r: int, t: float) -> None:
        async with session.post(f"{base}/round", json={"r": r, "t": t}) as resp:
            assert resp.status == 204

    r = 0
    in_flight: list[asyncio.Event] = []
    cpu_start = time.process_time()
    cpu_before: dict[str, float] = {}
    started = time.perf_counter()
    warm_until = started + 1.0
    stop_at = warm_until + seconds
    measured_from = 0.0
    while True:
        now = time.perf_counter()
        if not measuring and now >= warm_until:
            measuring, measured_from = True, now
            cpu_start = time.process_time()
            if pub is not None:
                pids["publisher"] = pub.pid
            cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        if now >= stop_at:
            break
        if rate:
            await asyncio.sleep(max(0.0, started + r * clients / rate - now))
        while len(in_flight) >= window:
            await in_flight.pop(0).wait()
        r += 1
        done[r] = event = asyncio.Event()
        in_flight.append(event)
        await start_round(r)
    elapsed = time.perf_counter() - measured_from
    measuring = False
    cpu = {name: (cpu_seconds(pid) - cpu_before[name]) / elapsed for name, pid in pids.items()}
    cpu["client"] = (time.process_time() - cpu_start) / elapsed
    for event in in_flight:
        await asyncio.wait_for(event.wait(), 30)
    await asyncio.gather(*posts)
    for proto in sockets:
        proto.close()
    await session.close()
    if pub is not None:
        assert pub.stdin is not None
        pub.stdin.close()
        await pub.wait()
    latencies.sort()
    return {
        "rate": len(latencies) / elapsed,
        "p50": latencies[len(latencies) // 2],
        "p99": latencies[int(len(latencies) * 0.99)],
        "events": len(latencies),
        "rounds": r,
        "cpu": cpu,
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_client(
    target: str,
    base: str,
    args: argparse.Namespace,
    env: dict[str, str],
    pids: dict[str, int],
    *,
    window: int,
    rate: float = 0,
) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--drive", target, "--base", base, "--pids", json.dumps(pids)]
    argv += ["--clients", str(args.clients), "--seconds", str(args.seconds)]
    argv += ["--window", str(window), "--rate", str(rate)]
    out = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=args.seconds + 90, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"client for {target} failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# ------------------------------------------------------------------ the run


def main(args: argparse.Namespace) -> None:
    raise_nofile()
    with services("bench_ws", redis_db=14) as ready:
        env = {**ready.env, "JWT_SECRET": "bench-ws-secret-0123456789abcdef0123456789"}
        procs, redis = ready.procs, ready.redis
        ports = {name: free_port() for name in ("app", "bare", "socketio")}
        servers: dict[str, subprocess.Popen[bytes]] = {}
        for name, port in ports.items():
            argv = [sys.executable, __file__, f"--serve-{name}", "--port", str(port)]
            procs.append(servers.setdefault(name, subprocess.Popen(argv, env=env)))
        bases = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        wait_until_up(f"{bases['app']}/healthz", servers["app"])
        wait_until_up(f"{bases['bare']}/ws", servers["bare"])
        wait_until_up(f"{bases['socketio']}/socket.io/", servers["socketio"])
        redis_pid = int(redis.pid_file.read_text().strip())
        if (os.cpu_count() or 1) >= 2:
            os.sched_setaffinity(redis_pid, {0})  # with the app; the publisher runs with the clients
        best: dict[str, dict[str, Any]] = {}
        paced: dict[str, dict[str, Any]] = {}
        plan = [("max", args.window, 0.0)] * args.runs + [("paced", PACED_WINDOW, args.rate)]
        targets = [(name, bases[name]) for name in ("bare", "app", "socketio") if name in args.targets]
        for phase, window, rate in plan:
            for target, base in targets:
                pids = {"server": servers[target].pid, "redis": redis_pid}
                got = run_client(target, base, args, env, pids, window=window, rate=rate)
                busy = ", ".join(f"{k} {v:.2f}" for k, v in got["cpu"].items())
                print(
                    f"  {phase} {target}: {got['rate']:.0f} events/s, p50 {got['p50'] * 1000:.1f} ms, "
                    f"p99 {got['p99'] * 1000:.1f} ms; cores busy: {busy}",
                    flush=True,
                )
                if phase == "paced":
                    paced[target] = got
                elif target not in best or got["rate"] > best[target]["rate"]:
                    best[target] = got
        if len(targets) == 3:
            report(best, paced, args)


ROWS = (
    ("bare", "bare aiohttp broadcast loop"),
    ("app", "app: publish → Redis → hub → socket"),
    ("socketio", "python-socketio AsyncServer broadcast"),
)
PACED_WINDOW = 50  # paced rounds: only a backlog cap


def report(
    best: dict[str, dict[str, Any]], paced: dict[str, dict[str, Any]], args: argparse.Namespace
) -> None:
    bare = best["bare"]
    print(
        f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs; {args.clients} "
        f"clients; max: window {args.window} rounds, best of {args.runs} runs of {args.seconds} s; "
        f"paced: {args.rate:.0f} events/s"
    )
    print(f"{'':<42}{'events/s':>9}{'ratio':>7}{'p50 ms':>8}{'p99 ms':>8}{'server µs/ev':>13}")
    lines = []
    for phase, rows in (("max", best), ("paced", paced)):
        for key, label in ROWS:
            row = rows[key]
            cost = row["cpu"]["server"] / row["rate"] * 1e6
            ratio = row["rate"] / bare["rate"] if phase == "max" else row["rate"] / paced["bare"]["rate"]
            name = f"{label} ({phase})"
            print(
                f"{name:<42}{row['rate']:>9.0f}{ratio:>7.2f}"
                f"{row['p50'] * 1000:>8.1f}{row['p99'] * 1000:>8.1f}{cost:>13.1f}"
            )
            busy = ", ".join(f"{k} {v:.2f}" for k, v in row["cpu"].items())
            lines.append(
                f"| {name} | {row['rate']:.0f} | {ratio:.2f} | {row['p50'] * 1000:.0f} | "
                f"{row['p99'] * 1000:.0f} | {cost:.1f} | {busy} |"
            )
    app, sio = best["app"], best["socketio"]
    print(
        f"max-rate ratio {app['rate'] / bare['rate']:.2f} (target >= 0.5); "
        f"app / python-socketio {app['rate'] / sio['rate']:.2f} (target >= 3); "
        f"p99 at max {app['p99'] * 1000:.0f} ms, paced {paced['app']['p99'] * 1000:.0f} ms (target < 250)"
    )
    print()
    print("For bench/RESULTS.md:")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=10_000)
    parser.add_argument("--targets", default="bare,app,socketio", help=argparse.SUPPRESS)  # for profiling one
    parser.add_argument("--port", type=int)
    parser.add_argument("--serve-app", action="store_true")
    parser.add_argument("--serve-bare", action="store_true")
    parser.add_argument("--serve-socketio", action="store_true")
    parser.add_argument("--drive", choices=["app", "bare", "socketio"])
    parser.add_argument("--base")
    parser.add_argument("--publish", action="store_true")
    parser.add_argument("--pids", default="{}")
    ns = parser.parse_args()
    if ns.serve_app:
        serve_app(ns.port)
    elif ns.serve_bare:
        serve_bare(ns.port)
    elif ns.serve_socketio:
        serve_socketio(ns.port)
    elif ns.publish:
        pin(1)
        raise_nofile()
        asyncio.run(publisher())
    elif ns.drive:
        pin(1)
        raise_nofile()
        pids = json.loads(ns.pids)
        result = asyncio.run(drive(ns.drive, ns.base, ns.clients, ns.seconds, ns.window, ns.rate, pids))
        print(json.dumps(result))
    else:
        main(ns)
