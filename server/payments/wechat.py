"""WeChat Pay APIv3 through `wechatpayv3` (sync, requests), public-key mode.

Every SDK network call runs in this provider's SdkPool (server/payments/pool.py:
WECHATPAY_THREADS threads, at most WECHATPAY_MAX_PENDING running or queued, the whole
call bounded by WECHATPAY_TIMEOUT), never on the event loop. The SDK's own timeout is
(5, 15) s per HTTP request. Create, query, close and refund are idempotent per
out_trade_no / out_refund_no, so a call abandoned on timeout is harmless.

Notifications are verified on the loop (`callback()` is pure CPU, ≈0.05 ms) but only
after checking the serial is our platform public key id: for any other serial the SDK
would fetch platform certificates over the network, blocking. The SDK checks no
timestamp, so we refuse one more than 300 s off.

The SDK calls `requests.post` (a new connection, so a TLS handshake, each call). With
REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE set, requests also loads that file into a new TLS
context for each call: ~50 ms of CPU a call with a system-sized bundle, against ~5 ms
(bench/tls.py). Unset, it uses one context made at import. So the provider warns at start.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from loguru import logger
from wechatpayv3 import WeChatPay, WeChatPayType

from server.config import ConfigError, Settings
from server.errors import AppError, ErrorCode
from server.metrics import Metrics
from server.payments.pool import SdkPool
from server.payments.providers import (
    Notification,
    NotificationRefused,
    PayRequest,
    RefundRequest,
    RefundResult,
    RefundStatus,
    Trade,
    TradeStatus,
    read_key_file,
)

_T = TypeVar("_T")

CHANNELS: tuple[str, ...] = ("wechat_native", "wechat_jsapi")
SIGNATURE_TYPE = "WECHATPAY2-SHA256-RSA2048"
MAX_SKEW = 300  # seconds a notification's timestamp may be off our clock
ATTACH_BUYER = "buyer:"  # an order's attach: "buyer:<user id>" (WeChat Pay allows 128 characters)

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
        and settings.payments.wechatpay_mchid
        and (settings.payments.wechatpay_appid or settings.wechat.appid)
        and settings.payments.wechatpay_private_key
        and settings.payments.wechatpay_cert_serial_no
        and settings.payments.wechatpay_apiv3_key
        and settings.payments.wechatpay_public_key
        and settings.payments.wechatpay_public_key_id
    )


def warn_of_ca_bundle() -> None:
    """A warning when requests would load a CA bundle file into every WeChat Pay call."""
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):  # the two requests reads, in its order
        if os.environ.get(name):
            logger.warning(
                "{}={} is set: requests, under the WeChat Pay SDK, loads that file into a new TLS "
                "context on every call (~50 ms of CPU a call for a system CA bundle, bench/tls.py); "
                "unset it for the server unless WeChat Pay must be reached through a private CA",
                name,
                os.environ[name],
            )
            return


class WeChatPayProvider:
    name = "wechat"
    channels = CHANNELS

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        assert settings_complete(settings)
        assert settings.payments.wechatpay_apiv3_key is not None and settings.public_base_url is not None
        self.appid = str(settings.payments.wechatpay_appid or settings.wechat.appid)
        self.mchid = str(settings.payments.wechatpay_mchid)
        self.public_key_id = str(settings.payments.wechatpay_public_key_id)
        self.expected_ids: Mapping[str, str] = {"appid": self.appid, "mchid": self.mchid}
        notify_url = settings.public_base_url.rstrip("/") + "/api/v1/payments/wechat/notify"
        try:
            self._wx = WeChatPay(
                wechatpay_type=WeChatPayType.NATIVE,
                mchid=self.mchid,
                private_key=read_key_file(settings.payments.wechatpay_private_key, "WECHATPAY_PRIVATE_KEY"),
                cert_serial_no=settings.payments.wechatpay_cert_serial_no,
                appid=self.appid,
                apiv3_key=settings.payments.wechatpay_apiv3_key.get_secret_value(),
                notify_url=notify_url,
                timeout=(5, 15),
                public_key=read_key_file(settings.payments.wechatpay_public_key, "WECHATPAY_PUBLIC_KEY"),
                public_key_id=self.public_key_id,
            )
        except ConfigError:
            raise
        except Exception as exc:  # the SDK raises bare Exception for an unreadable key
            raise ConfigError(f"WeChat Pay settings rejected by the SDK: {exc}") from exc
        # The SDK hard-codes the real gateway; this attribute is where it keeps it.
        self._wx._core._gate_way = settings.payments.wechatpay_api_base.rstrip("/")
        warn_of_ca_bundle()
        self.refund_notify_url = (
            settings.public_base_url.rstrip("/") + "/api/v1/payments/wechat/refund-notify"
        )
        self._pool = SdkPool(
            "wechat",
            "WeChat Pay",
            threads=settings.payments.wechatpay_threads,
            max_pending=settings.payments.wechatpay_max_pending,
            timeout=settings.payments.wechatpay_timeout,
            metrics=metrics,
        )

    def needs_openid(self, channel: str) -> bool:
        return channel == "wechat_jsapi"

    async def close_pool(self) -> None:
        self._pool.shutdown()

    async def _call(self, op: str, fn: Callable[[], _T]) -> _T:
        return await self._pool.call(op, fn)

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
                attach=attach_of(req.buyer_id),
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

    async def refund(self, req: RefundRequest) -> RefundResult:
        def call() -> RefundResult:
            code, text = self._wx.refund(
                out_refund_no=req.refund_no,
                amount={"refund": req.amount_fen, "total": req.total_fen, "currency": "CNY"},
                out_trade_no=req.order_no,
                reason=req.reason[:80] or None,
                notify_url=self.refund_notify_url,
            )
            answer = _json(text)
            if code == 200:
                return _refund(answer, req.refund_no)
            if 400 <= code < 500 and answer.get("code") not in ("SYSTEM_ERROR", "FREQUENCY_LIMITED"):
                # A definite refusal (NOT_ENOUGH, INVALID_REQUEST, …): no money moved.
                return RefundResult(
                    req.refund_no, "failed", order_no=req.order_no, raw_state=str(answer.get("code", code))
                )
            raise AppError(
                ErrorCode.UPSTREAM_FAILED, f"WeChat Pay refund failed: {code} {answer.get('code')}"
            )

        return await self._call("refund", call)

    async def query_refund(self, order_no: str, refund_no: str) -> RefundResult:
        def call() -> RefundResult:
            code, text = self._wx.query_refund(out_refund_no=refund_no)
            answer = _json(text)
            if code == 404:  # never reached WeChat Pay: it cannot succeed any more
                return RefundResult(refund_no, "failed", order_no=order_no, raw_state="RESOURCE_NOT_EXISTS")
            if code != 200:
                raise AppError(
                    ErrorCode.UPSTREAM_FAILED, f"WeChat Pay refund query failed: {code} {answer.get('code')}"
                )
            return _refund(answer, refund_no)

        return await self._call("query_refund", call)

    def verify_refund_notification(
        self, headers: Mapping[str, str], body: bytes, now: float
    ) -> tuple[RefundResult, str | None]:
        """A refund notification (REFUND.SUCCESS / ABNORMAL / CLOSED), verified and decrypted,
        and its event id."""
        data = self._callback(headers, body, now)
        resource = data.get("resource")
        if not isinstance(resource, dict) or not resource.get("out_refund_no"):
            raise NotificationRefused("no refund resource", verified=True)
        result = _refund(resource, str(resource["out_refund_no"]), state_key="refund_status")
        if not str(data.get("event_type", "")).startswith("REFUND.") or result.raw_state == "":
            raise NotificationRefused(
                f"not a refund notification: {data.get('event_type')}",
                verified=True,
                order_no=result.order_no,
            )
        return result, str(data.get("id") or "")[:64] or None

    def verify_notification(self, headers: Mapping[str, str], body: bytes, now: float) -> Notification:
        data = self._callback(headers, body, now)
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

    def _callback(self, headers: Mapping[str, str], body: bytes, now: float) -> dict[str, Any]:
        """Headers, serial, freshness, then the SDK's signature check and decryption."""
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
        return dict(data)


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


def attach_of(buyer_id: int | None) -> str | None:
    """The `attach` of an order: WeChat Pay echoes it in the notification and the query."""
    return None if buyer_id is None else f"{ATTACH_BUYER}{buyer_id}"


def _buyer(attach: Any) -> int | None:
    if isinstance(attach, str) and attach.startswith(ATTACH_BUYER):
        digits = attach[len(ATTACH_BUYER) :]
        if digits.isascii() and digits.isdigit() and len(digits) <= 18:
            return int(digits)
    return None


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
        buyer_id=_buyer(answer.get("attach")),
    )


_REFUND_STATES: dict[str, RefundStatus] = {
    "SUCCESS": "succeeded",
    "PROCESSING": "processing",
    "CLOSED": "failed",
    "ABNORMAL": "failed",  # the buyer's account cannot take it; an operator must act
}


def _refund(answer: Mapping[str, Any], refund_no: str, state_key: str = "status") -> RefundResult:
    amount = answer.get("amount")
    refund = amount.get("refund") if isinstance(amount, dict) else None
    state = str(answer.get(state_key, ""))
    return RefundResult(
        refund_no=str(answer.get("out_refund_no") or refund_no),
        status=_REFUND_STATES.get(state, "processing"),
        order_no=str(answer["out_trade_no"]) if answer.get("out_trade_no") else None,
        amount_fen=refund if isinstance(refund, int) and not isinstance(refund, bool) else None,
        provider_refund_id=str(answer["refund_id"]) if answer.get("refund_id") else None,
        mchid=answer.get("mchid"),
        raw_state=state,
    )
