"""WeChat Pay APIv3 through `wechatpayv3` (sync, requests), public-key mode.

Every SDK network call runs in this provider's ThreadPoolExecutor (WECHATPAY_THREADS),
never on the event loop; at most WECHATPAY_MAX_PENDING calls may be running or queued,
one more answers BUSY at once. The SDK's own timeout is (5, 15) s per HTTP request;
`asyncio.wait_for` bounds the whole call at WECHATPAY_TIMEOUT. A thread cannot be
stopped when that fires, which is safe: create, query and close are idempotent per
out_trade_no.

Notifications are verified on the loop (`callback()` is pure CPU, ≈0.05 ms) but only
after checking the serial is our platform public key id: for any other serial the SDK
would fetch platform certificates over the network, blocking. The SDK checks no
timestamp, so we refuse one more than 300 s off.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import requests
from loguru import logger
from wechatpayv3 import WeChatPay, WeChatPayType

from server.config import ConfigError, Settings
from server.errors import AppError, Busy, ErrorCode
from server.metrics import Metrics
from server.payments.providers import Notification, NotificationRefused, PayRequest, Trade, TradeStatus

_T = TypeVar("_T")

CHANNELS: tuple[str, ...] = ("wechat_native", "wechat_jsapi")
SIGNATURE_TYPE = "WECHATPAY2-SHA256-RSA2048"
MAX_SKEW = 300  # seconds a notification's timestamp may be off our clock

_STATES: dict[str, TradeStatus] = {
    "SUCCESS": "paid",
    "NOTPAY": "pending",
    "USERPAYING": "pending",
    "CLOSED": "closed",
    "REVOKED": "closed",
    "PAYERROR": "closed",
    "REFUND": "refunded",
}


def settings_complete(settings: Settings) -> bool:
    """WeChat Pay is offered only when every one of its settings is present."""
    return bool(
        settings.public_base_url
        and settings.wechatpay_mchid
        and (settings.wechatpay_appid or settings.wechat_appid)
        and settings.wechatpay_private_key
        and settings.wechatpay_cert_serial_no
        and settings.wechatpay_apiv3_key
        and settings.wechatpay_public_key
        and settings.wechatpay_public_key_id
    )


def _read(path: Path | None, name: str) -> str:
    try:
        return Path(str(path)).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc}") from exc


class WeChatPayProvider:
    name = "wechat"
    channels = CHANNELS

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        assert settings_complete(settings)
        assert settings.wechatpay_apiv3_key is not None and settings.public_base_url is not None
        self.appid = str(settings.wechatpay_appid or settings.wechat_appid)
        self.mchid = str(settings.wechatpay_mchid)
        self.public_key_id = str(settings.wechatpay_public_key_id)
        self.expected_ids: Mapping[str, str] = {"appid": self.appid, "mchid": self.mchid}
        notify_url = settings.public_base_url.rstrip("/") + "/api/v1/payments/wechat/notify"
        try:
            self._wx = WeChatPay(
                wechatpay_type=WeChatPayType.NATIVE,
                mchid=self.mchid,
                private_key=_read(settings.wechatpay_private_key, "WECHATPAY_PRIVATE_KEY"),
                cert_serial_no=settings.wechatpay_cert_serial_no,
                appid=self.appid,
                apiv3_key=settings.wechatpay_apiv3_key.get_secret_value(),
                notify_url=notify_url,
                timeout=(5, 15),
                public_key=_read(settings.wechatpay_public_key, "WECHATPAY_PUBLIC_KEY"),
                public_key_id=self.public_key_id,
            )
        except ConfigError:
            raise
        except Exception as exc:  # the SDK raises bare Exception for an unreadable key
            raise ConfigError(f"WeChat Pay settings rejected by the SDK: {exc}") from exc
        # The SDK hard-codes the real gateway; this attribute is where it keeps it.
        self._wx._core._gate_way = settings.wechatpay_api_base.rstrip("/")
        self._metrics = metrics
        self._executor = ThreadPoolExecutor(
            max_workers=settings.wechatpay_threads, thread_name_prefix="wxpay"
        )
        self._slots = threading.BoundedSemaphore(settings.wechatpay_max_pending)
        self._timeout = settings.wechatpay_timeout

    def needs_openid(self, channel: str) -> bool:
        return channel == "wechat_jsapi"

    async def close_pool(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _call(self, op: str, fn: Callable[[], _T]) -> _T:
        if not self._slots.acquire(blocking=False):
            raise Busy("WeChat Pay calls are saturated, retry shortly")
        try:
            future: Future[_T] = self._executor.submit(fn)
        except RuntimeError:
            self._slots.release()
            raise AppError(ErrorCode.UPSTREAM_FAILED, "WeChat Pay client is closed") from None
        future.add_done_callback(lambda _: self._slots.release())
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), self._timeout)
            outcome = "ok"
            return result
        except TimeoutError:
            outcome = "timeout"
            raise AppError(
                ErrorCode.UPSTREAM_FAILED, f"WeChat Pay {op} took longer than {self._timeout:g} s"
            ) from None
        except AppError:
            raise
        except (requests.RequestException, OSError) as exc:
            raise AppError(ErrorCode.UPSTREAM_FAILED, f"WeChat Pay {op} failed: {exc}") from None
        except Exception as exc:  # the SDK's bare Exception: e.g. a bad answer signature
            logger.warning("WeChat Pay {} failed: {}", op, exc)
            raise AppError(ErrorCode.UPSTREAM_FAILED, f"WeChat Pay {op} failed: {exc}") from None
        finally:
            self._metrics.payment_provider_calls.labels(self.name, op, outcome).inc()
            self._metrics.payment_provider_seconds.labels(self.name, op).observe(
                time.perf_counter() - started
            )

    # ------------------------------------------------------------ calls

    async def create(self, req: PayRequest) -> dict[str, Any]:
        jsapi = req.channel == "wechat_jsapi"

        def call() -> dict[str, Any]:
            code, text = self._wx.pay(
                description=req.description,
                out_trade_no=req.order_no,
                amount={"total": req.amount_fen, "currency": "CNY"},
                payer={"openid": req.openid} if jsapi else None,
                time_expire=req.expires_at_rfc3339,
                pay_type=WeChatPayType.JSAPI if jsapi else WeChatPayType.NATIVE,
            )
            answer = _json(text)
            if code != 200:
                raise AppError(
                    ErrorCode.UPSTREAM_FAILED,
                    f"WeChat Pay refused the order: {answer.get('code')} {answer.get('message')}",
                )
            if not jsapi:
                return {"code_url": str(answer["code_url"])}
            package = f"prepay_id={answer['prepay_id']}"
            stamp, nonce = str(int(time.time())), secrets.token_hex(16)
            sign = self._wx.sign([self.appid, stamp, nonce, package])
            return {
                "appId": self.appid,
                "timeStamp": stamp,
                "nonceStr": nonce,
                "package": package,
                "signType": "RSA",
                "paySign": sign,
            }

        return await self._call("create", call)

    async def query(self, order_no: str) -> Trade:
        def call() -> Trade:
            code, text = self._wx.query(out_trade_no=order_no)
            answer = _json(text)
            if code == 404:
                return Trade(order_no, "unknown", raw_state=str(answer.get("code", "ORDER_NOT_EXIST")))
            if code != 200:
                raise AppError(
                    ErrorCode.UPSTREAM_FAILED, f"WeChat Pay query failed: {code} {answer.get('code')}"
                )
            return _trade(answer)

        return await self._call("query", call)

    async def close(self, order_no: str) -> Trade:
        def call() -> tuple[int, dict[str, Any]]:
            code, text = self._wx.close(out_trade_no=order_no)
            return code, _json(text)

        code, answer = await self._call("close", call)
        if code in (200, 204):
            return Trade(order_no, "closed", raw_state="CLOSED")
        if answer.get("code") == "ORDERPAID":
            return await self.query(order_no)  # paid first: the query carries txn id and amount
        if answer.get("code") == "ORDER_NOT_EXIST":
            return Trade(order_no, "closed", raw_state="ORDER_NOT_EXIST")  # no prepay: nothing to pay
        raise AppError(ErrorCode.UPSTREAM_FAILED, f"WeChat Pay close failed: {code} {answer.get('code')}")

    # ------------------------------------------------------------ notifications

    def verify_notification(self, headers: Mapping[str, str], body: bytes, now: float) -> Notification:
        names = ("Signature", "Timestamp", "Nonce", "Serial", "Signature-Type")
        got = {f"Wechatpay-{n}": headers.get(f"Wechatpay-{n}", "") for n in names}
        missing = [k for k, v in got.items() if not v]
        if missing:
            raise NotificationRefused("missing headers: " + ", ".join(missing))
        if got["Wechatpay-Serial"] != self.public_key_id:
            # Checked before the SDK: for an unknown serial it would fetch certificates (blocking).
            raise NotificationRefused(f"unknown serial {got['Wechatpay-Serial'][:64]!r}")
        if got["Wechatpay-Signature-Type"] != SIGNATURE_TYPE:
            raise NotificationRefused("unsupported signature type")
        stamp = got["Wechatpay-Timestamp"]
        if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
            raise NotificationRefused("malformed timestamp")
        if abs(now - int(stamp)) > MAX_SKEW:
            raise NotificationRefused(f"timestamp {stamp} is more than {MAX_SKEW} s off")
        try:
            data = self._wx.callback(got, body)
        except Exception as exc:  # not UTF-8, not JSON, an algorithm the SDK refuses
            raise NotificationRefused(f"unreadable notification: {type(exc).__name__}") from None
        if not data:
            raise NotificationRefused("bad signature, or the resource did not decrypt")
        resource = data.get("resource")
        if not isinstance(resource, dict):
            raise NotificationRefused("no resource", verified=True)
        trade = _trade(resource)
        if data.get("event_type") != "TRANSACTION.SUCCESS" or trade.status != "paid":
            raise NotificationRefused(
                f"not a payment success: {data.get('event_type')} {trade.raw_state}",
                verified=True,
                order_no=trade.order_no,
            )
        return Notification(trade=trade, event_id=str(data.get("id") or "")[:64] or None)


def _json(text: Any) -> dict[str, Any]:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _trade(answer: Mapping[str, Any]) -> Trade:
    amount = answer.get("amount")
    total = amount.get("total") if isinstance(amount, dict) else None
    state = str(answer.get("trade_state", ""))
    return Trade(
        order_no=str(answer.get("out_trade_no", "")),
        status=_STATES.get(state, "unknown"),
        amount_fen=total if isinstance(total, int) and not isinstance(total, bool) else None,
        txn_id=str(answer["transaction_id"]) if answer.get("transaction_id") else None,
        appid=answer.get("appid"),
        mchid=answer.get("mchid"),
        raw_state=state,
    )
