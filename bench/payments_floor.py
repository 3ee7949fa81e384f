"""Payments: the app against the floor of its own stack, for both measurements of
bench/payments.py.

    .venv/bin/python bench/payments_floor.py [--rounds 5] [--notifications 1000] [--orders 600]

bench/payments.py compares the app with the bare work: the settlement SQL, and the SDK
call. This script adds a third side to each, "the floor": a minimal aiohttp app (its own
process, pinned to CPU 0 like the app) made of the same libraries and doing the same
work, with none of ours around it. It has no middleware (request id, error envelope,
metrics, CORS, auth), no actor, no events, and no checks but the SDK's.
- Orders, POST /api/v1/orders: the SDK's `pay()` with the app's fields, in a 50-thread pool;
  then the app's own INSERT_ORDER (one statement); then 201 with the `code_url`.
- Notifications, POST /api/v1/payments/wechat/notify: the SDK's `callback()` (signature
  and AES-GCM), then bench/payments.py's bare settlement (the app's `Settlement` effect, one
  transaction), then 204.

The fake gateway, the load, MariaDB and Redis run on CPU 1, as in bench/payments.py. Each
round runs bare, then the app, then the floor. Printed for each: its rate, its rate over
the bare run of the same round (median over rounds), and its server CPU ms per operation
(median). The floor over bare is the best ratio these libraries give on this machine; the
app's CPU minus the floor's is what our own layers cost. About three minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import payments as bp  # noqa: E402
from bench._support import free_port, pin, wait_until_up  # noqa: E402

SIDES = ("bare", "app", "floor")


def serve_floor(port: int, keys_dir: Path, gateway: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from aiohttp import web
    from wechatpayv3 import WeChatPayType

    from server.config import load_settings
    from server.db import Database
    from server.metrics import Metrics
    from server.payments.facade import INSERT_ORDER, request_hash
    from server.payments.orders import new_order_no
    from server.payments.wechat import ATTACH_BUYER, attach_of

    pin(0)
    settings = load_settings()
    wx = bp.load_keys(keys_dir).sdk_client(gateway)
    threads = ThreadPoolExecutor(bp.BUYERS, thread_name_prefix="wechat")
    buyers = itertools.cycle(range(1, bp.BUYERS + 1))
    state: dict[str, Any] = {}  # the database, the settler, the product's terms

    async def opened(app: web.Application) -> Any:
        db = await Database.connect(settings.database(), settings, Metrics())
        state["db"], state["settle"] = db, bp.bare_settler(db)
        terms = "SELECT id, kind, price_fen, credits, membership_days, name FROM products WHERE id = %s"
        product = await db.fetchone(terms, "credits-100")
        if product is None:
            raise SystemExit("the seeded product credits-100 is missing")
        state["product"] = tuple(product)
        yield
        threads.shutdown(wait=False, cancel_futures=True)
        await db.close()

    async def create_order(request: web.Request) -> web.Response:
        body = await request.json()
        product_id, kind, price, credits, days, name = state["product"]
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0)
        expires = now + dt.timedelta(hours=2)
        order_no, buyer = new_order_no(now), next(buyers)

        def call() -> dict[str, str]:
            code, text = wx.pay(
                description=name[:40],
                out_trade_no=order_no,
                amount={"total": price, "currency": "CNY"},
                time_expire=expires.isoformat() + "+00:00",
                attach=attach_of(buyer),
                pay_type=WeChatPayType.NATIVE,
            )
            if code != 200:
                raise RuntimeError(f"{code} {text}")
            return {"code_url": str(json.loads(text)["code_url"])}

        pay_params = await asyncio.wrap_future(threads.submit(call))
        await state["db"].execute(
            INSERT_ORDER,
            order_no, buyer, body["channel"], json.dumps(pay_params), order_no,
            request_hash(body["product_id"], body["channel"]), now, expires,
            product_id, kind, price, credits, days,
        )  # fmt: skip
        return web.json_response({"order_no": order_no, "pay_params": pay_params}, status=201)

    async def notified(request: web.Request) -> web.Response:
        body = await request.read()
        data = wx.callback(request.headers, body)
        if not data:
            return web.Response(status=401)
        resource = data["resource"]
        buyer = int(resource["attach"].removeprefix(ATTACH_BUYER))
        await state["settle"](resource["out_trade_no"], buyer, body, resource["transaction_id"])
        return web.Response(status=204)

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.cleanup_ctx.append(opened)
    app.router.add_post("/api/v1/orders", create_order)
    app.router.add_post("/api/v1/payments/wechat/notify", notified)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


async def rounds(
    args: argparse.Namespace, env: dict[str, str], keys: Any, tmp: Path, gateway: str, bases: dict[str, str],
    pids: dict[str, int], tokens: list[str],
) -> dict[str, dict[str, dict[str, list[float]]]]:  # fmt: skip
    """{"notifications"|"orders": {"rate"|"cpu": {side: [each round]}}}"""
    from server.config import Settings
    from server.db import Database
    from server.metrics import Metrics
    from tests.fakes.wechatpay import FakeWeChatPay

    settings = Settings(_env_file=None, database_url=env["DATABASE_URL"], db_pool_max=2 * bp.BUYERS)  # type: ignore[call-arg]
    db = await Database.connect(settings.database(), settings, Metrics())
    signer = FakeWeChatPay(keys)
    got: dict[str, dict[str, dict[str, list[float]]]] = {
        what: {"rate": {s: [] for s in SIDES}, "cpu": {s: [] for s in SIDES}}
        for what in ("notifications", "orders")
    }

    def keep(what: str, side: str, rate: float, cpu_ms: float) -> None:
        got[what]["rate"][side].append(rate)
        got[what]["cpu"][side].append(cpu_ms)

    try:
        for side in ("app", "floor"):
            await bp.warm_up(db, signer, bases[side], tokens)
        for r in range(args.rounds):
            keep(
                "notifications",
                "bare",
                *await asyncio.to_thread(bp.bare, "settle", args.notifications, env, tmp, gateway),
            )
            for side in ("app", "floor"):
                notes = bp.signed_notifications(
                    signer, await bp.insert_orders(db, args.notifications, f"{side}{r}")
                )
                before = bp.cpu_seconds(pids[side])
                rate = await bp.app_notifications(bases[side], notes)
                keep("notifications", side, rate, 1000 * (bp.cpu_seconds(pids[side]) - before) / len(notes))
        for _ in range(args.rounds):
            keep(
                "orders", "bare", *await asyncio.to_thread(bp.bare, "orders", args.orders, env, tmp, gateway)
            )
            for side in ("app", "floor"):
                before = bp.cpu_seconds(pids[side])
                rate = await bp.app_orders(bases[side], tokens, args.orders)
                keep("orders", side, rate, 1000 * (bp.cpu_seconds(pids[side]) - before) / args.orders)
    finally:
        await db.close()
    return got


def report(got: dict[str, dict[str, dict[str, list[float]]]], args: argparse.Namespace) -> None:
    print("| measurement | side | per second, each round | median of rate / bare | server CPU ms each |")
    print("|---|---|---|---|---|")
    for what, seen in got.items():
        bare = seen["rate"]["bare"]
        for side in SIDES:
            rates = seen["rate"][side]
            ratio = statistics.median(a / b for a, b in zip(rates, bare, strict=True))
            each = " ".join(f"{r:.0f}" for r in rates)
            cpu = statistics.median(seen["cpu"][side])
            print(f"| {what} | {side} | {each} | {ratio:.2f} | {cpu:.2f} |")
    print(
        f"{args.notifications} notifications and {args.orders} orders a round, {args.rounds} rounds, "
        f"{dt.date.today()}"
    )


def main(args: argparse.Namespace) -> None:
    with bp.set_up(args) as s:
        port = free_port()
        serve = ["--serve-floor", "--port", str(port), "--keys", str(s.tmp), "--gateway", s.gateway]
        floor = subprocess.Popen([sys.executable, __file__, *serve], env=s.env)  # pins itself to CPU 0
        s.procs.append(floor)  # stopped with the others
        floor_base = f"http://127.0.0.1:{port}"
        wait_until_up(f"{floor_base}/healthz", floor)
        bases = {"app": s.base, "floor": floor_base}
        pids = {"app": s.app_pid, "floor": floor.pid}
        got = asyncio.run(rounds(args, s.env, s.keys, s.tmp, s.gateway, bases, pids, s.tokens))
    report(got, args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notifications", type=int, default=1000)
    parser.add_argument("--orders", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--delay", type=float, default=0.05, help="the fake gateway's latency (s)")
    parser.add_argument("--serve-floor", action="store_true")
    parser.add_argument("--port", type=int)
    parser.add_argument("--keys", type=Path)
    parser.add_argument("--gateway")
    ns = parser.parse_args()
    if ns.serve_floor:
        serve_floor(ns.port, ns.keys, ns.gateway)
    else:
        main(ns)
