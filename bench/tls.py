"""Payment SDK calls over TLS, as in production: CPU per call of the calling thread.

    .venv/bin/python bench/tls.py [--count 40]

The fake Alipay and WeChat Pay gateways (tests/fakes: they check our signatures and sign
their answers) serve HTTPS with a self-signed certificate, in a thread of this process
pinned to CPU 1, with no added latency. The calls are made one at a time from the main
thread, pinned to CPU 0, by the real SDKs; "CPU ms a call" is that thread's CPU time.
The CA store is the system's bundle plus the fakes' certificate, so a context that loads
it loads as much as in production.

- Alipay (python-alipay-sdk, urllib's `urlopen`): urllib's default, a new TLS context per
  connection, against `server.payments.alipay.share_tls_context` (one context for the
  process), which the app installs.
- WeChat Pay (wechatpayv3, `requests.post`): with REQUESTS_CA_BUNDLE naming that bundle
  (as some images and CI machines set it), `requests` loads it into a new context for
  every connection; with REQUESTS_CA_BUNDLE naming a one-certificate file, that load is
  nearly free. Unset, `requests` uses one context made at import (certifi's bundle), which
  cannot be shown here because the fakes' certificate is not in certifi's bundle.
- The same WeChat Pay call over plain HTTP, for scale: the TLS handshake's share.

Prints a table for bench/RESULTS.md. About 20 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._support import free_port, pin  # noqa: E402

SYSTEM_BUNDLE = Path(ssl.get_default_verify_paths().openssl_cafile)


def serve(apps: list[tuple[object, int, ssl.SSLContext | None]], ready: threading.Event) -> None:
    """Run the fakes' aiohttp apps in this thread (pinned to CPU 1) until the process ends."""
    from aiohttp import web

    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(threading.get_native_id(), {1})
    loop = asyncio.new_event_loop()

    async def start() -> None:
        for app, port, context in apps:
            runner = web.AppRunner(app, access_log=None)  # type: ignore[arg-type]
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
        ready.set()

    loop.run_until_complete(start())
    loop.run_forever()


def per_call(n: int, call: Callable[[int], None]) -> tuple[float, float]:
    """(CPU ms, wall ms) of this thread per call, after one untimed call."""
    call(-1)
    cpu, wall = time.thread_time(), time.perf_counter()
    for i in range(n):
        call(i)
    return 1000 * (time.thread_time() - cpu) / n, 1000 * (time.perf_counter() - wall) / n


def main(args: argparse.Namespace) -> None:
    from alipay import AliPay, AliPayConfig
    from wechatpayv3 import WeChatPay

    from server.payments.alipay import share_tls_context
    from tests.fakes.alipay import APPID as ALI_APPID
    from tests.fakes.alipay import AlipayKeys, FakeAlipay
    from tests.fakes.tls import self_signed, server_context
    from tests.fakes.wechatpay import FakeWeChatPay, Keys

    tmp = Path(tempfile.mkdtemp(prefix="bench-tls-"))
    cert = self_signed(tmp, "gateway")
    bundle = tmp / "bundle.pem"  # the system's CA bundle and the fakes' certificate
    bundle.write_bytes(SYSTEM_BUNDLE.read_bytes() + b"\n" + cert[0].read_bytes())
    os.environ["SSL_CERT_FILE"] = str(bundle)  # the store a default context loads
    os.environ.pop("SSL_CERT_DIR", None)
    ali_keys, wx_keys = AlipayKeys.generate(tmp / "alipay"), Keys.generate(tmp / "wechatpay")
    ali_port, wx_port, plain_port = free_port(), free_port(), free_port()
    context = server_context(cert)
    fakes = [
        (FakeAlipay(ali_keys).app(), ali_port, context),
        (FakeWeChatPay(wx_keys, delay=0).app(), wx_port, context),
        (FakeWeChatPay(wx_keys, delay=0).app(), plain_port, None),
    ]
    ready = threading.Event()
    threading.Thread(target=serve, args=(fakes, ready), daemon=True).start()
    ready.wait(10)
    pin(0)

    ali = AliPay(
        appid=ALI_APPID,
        app_notify_url="https://wardrobe.test/api/v1/payments/alipay/notify",
        app_private_key_string=ali_keys.app_private_pem.read_text(),
        alipay_public_key_string=ali_keys.alipay_public_pem.read_text(),
        sign_type="RSA2",
        config=AliPayConfig(timeout=15),
    )
    ali._gateway = f"https://127.0.0.1:{ali_port}/gateway.do"

    def ali_query(i: int) -> None:
        ali.api_alipay_trade_query(out_trade_no=f"tls{i}")  # "trade not found": a signed answer

    def wx_call(wx: WeChatPay) -> Callable[[int], None]:
        def call(i: int) -> None:
            code, _ = wx.query(out_trade_no=f"tls{i}")
            assert code in (200, 404), code

        return call

    default = per_call(args.count, ali_query)
    rows = [("Alipay query, urllib's default (a TLS context per connection)", default)]
    share_tls_context()
    rows.append(("Alipay query, `share_tls_context` (one context)", per_call(args.count, ali_query)))
    tls_wx = wx_call(wx_keys.sdk_client(f"https://127.0.0.1:{wx_port}"))
    os.environ["REQUESTS_CA_BUNDLE"] = str(bundle)
    rows.append(("WeChat Pay query, REQUESTS_CA_BUNDLE = the system bundle", per_call(args.count, tls_wx)))
    os.environ["REQUESTS_CA_BUNDLE"] = str(cert[0])
    rows.append(("WeChat Pay query, REQUESTS_CA_BUNDLE = one certificate", per_call(args.count, tls_wx)))
    plain_wx = wx_call(wx_keys.sdk_client(f"http://127.0.0.1:{plain_port}"))
    rows.append(("WeChat Pay query over plain HTTP", per_call(args.count, plain_wx)))
    certificates = SYSTEM_BUNDLE.read_bytes().count(b"BEGIN CERTIFICATE")
    print(f"CA bundle: {SYSTEM_BUNDLE} ({certificates} certificates)")
    print("| SDK call, one at a time | CPU ms a call | wall ms a call |")
    print("|---|---|---|")
    for name, (cpu, wall) in rows:
        print(f"| {name} | {cpu:.2f} | {wall:.2f} |")
    print(f"\n{ssl.OPENSSL_VERSION}, Python {sys.version.split()[0]}, {args.count} calls a row")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=40)
    main(parser.parse_args())
