"""Alipay (QR, `alipay.trade.precreate`) through `python-alipay-sdk` (sync, urllib), RSA2.

Every SDK network call runs in this provider's SdkPool (ALIPAY_THREADS threads, at most
ALIPAY_MAX_PENDING running or queued, the whole call bounded by ALIPAY_TIMEOUT; each
HTTP request has the SDK's own 15 s timeout). The SDK verifies Alipay's signature on
every answer (over the exact `<method>_response` substring) and raises when it does not
verify; a business failure (`code` other than 10000) is returned, and judged here.

Money is fen inside the server; Alipay speaks yuan strings ("9.90"), converted exactly
(no floats) at this edge. Refunds are synchronous: code 10000 is a refund made.

The SDK calls urllib's `urlopen` with no TLS context, and urllib then builds a fresh one
for every connection, loading the whole CA bundle into it: 35–52 ms of CPU per Alipay
call (bench/tls.py). `share_tls_context` gives urlopen one context instead, built the way
urllib builds its own (Python's ssl docs: make one context and reuse it).
"""

from __future__ import annotations

import datetime as dt
import re
import ssl
import urllib.request
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, TypeVar
from urllib.parse import parse_qsl
from zoneinfo import ZoneInfo

from alipay import AliPay, AliPayConfig

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
    Trade,
    TradeStatus,
    read_key_file,
)

_T = TypeVar("_T")

CHANNELS: tuple[str, ...] = ("alipay_qr",)
SUCCESS = "10000"
PAID_STATES = ("TRADE_SUCCESS", "TRADE_FINISHED")
_STATES: dict[str, TradeStatus] = {
    "WAIT_BUYER_PAY": "pending",
    "TRADE_SUCCESS": "paid",
    "TRADE_FINISHED": "paid",
    "TRADE_CLOSED": "closed",
}
_YUAN = re.compile(r"^\d{1,9}(\.\d{1,2})?$")
_BEIJING = ZoneInfo("Asia/Shanghai")
#: Business failures after which the refund may still happen: the outcome is unknown.
_RETRYABLE = ("ACQ.SYSTEM_ERROR", "ACQ.REFUND_AMT_RESTRICTION", "aop.ACQ.SYSTEM_ERROR")


def yuan(fen: int) -> str:
    """990 → "9.90": exact, no floats."""
    return f"{fen // 100}.{fen % 100:02d}"


def fen_of(value: Any) -> int | None:
    """ "9.90" → 990; None for anything that is not a plain non-negative amount."""
    if not isinstance(value, str) or not _YUAN.match(value):
        return None
    return int(Decimal(value) * 100)


def share_tls_context() -> None:
    """Install, as urllib's default opener, one whose HTTPS connections share one TLS
    context: the default one (`ssl.create_default_context()`: the system's CA store,
    certificates and host names checked) with what http.client adds to the one it makes
    per connection (ALPN http/1.1, post-handshake auth). Process-wide, as urlopen's
    default opener is; built when the Alipay provider is, so a CA store changed since
    takes effect at the next start."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    if context.post_handshake_auth is not None:
        context.post_handshake_auth = True
    urllib.request.install_opener(urllib.request.build_opener(urllib.request.HTTPSHandler(context=context)))


def settings_complete(settings: Settings) -> bool:
    """Alipay is offered only when every one of its settings is present."""
    return bool(
        settings.public_base_url
        and settings.payments.alipay_appid
        and settings.payments.alipay_private_key
        and settings.payments.alipay_public_key
    )


class AlipayProvider:
    name = "alipay"
    channels = CHANNELS

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        assert settings_complete(settings) and settings.public_base_url is not None
        self.appid = str(settings.payments.alipay_appid)
        self.expected_ids: Mapping[str, str] = {"appid": self.appid}
        try:
            self._ali = AliPay(
                appid=self.appid,
                app_notify_url=settings.public_base_url.rstrip("/") + "/api/v1/payments/alipay/notify",
                app_private_key_string=read_key_file(
                    settings.payments.alipay_private_key, "ALIPAY_PRIVATE_KEY"
                ),
                alipay_public_key_string=read_key_file(
                    settings.payments.alipay_public_key, "ALIPAY_PUBLIC_KEY"
                ),
                sign_type="RSA2",
                config=AliPayConfig(timeout=15),
            )
        except ConfigError:
            raise
        except Exception as exc:  # an unreadable key: ValueError from pycryptodome
            raise ConfigError(f"Alipay settings rejected by the SDK: {exc}") from exc
        self._ali._gateway = settings.payments.alipay_gateway  # the SDK's documented place for it
        share_tls_context()
        self._pool = SdkPool(
            "alipay",
            "Alipay",
            threads=settings.payments.alipay_threads,
            max_pending=settings.payments.alipay_max_pending,
            timeout=settings.payments.alipay_timeout,
            metrics=metrics,
        )

    def needs_openid(self, channel: str) -> bool:
        return False

    async def close_pool(self) -> None:
        self._pool.shutdown()

    async def _call(self, op: str, fn: Callable[[], _T]) -> _T:
        return await self._pool.call(op, fn)

    # ------------------------------------------------------------ calls

    async def create(self, req: PayRequest) -> dict[str, Any]:
        expires = dt.datetime.fromisoformat(req.expires_at_rfc3339).astimezone(_BEIJING)

        def call() -> dict[str, Any]:
            answer = self._ali.api_alipay_trade_precreate(
                subject=req.description,
                out_trade_no=req.order_no,
                total_amount=yuan(req.amount_fen),
                time_expire=expires.strftime("%Y-%m-%d %H:%M:%S"),
            )
            if answer.get("code") != SUCCESS or not answer.get("qr_code"):
                raise AppError(ErrorCode.UPSTREAM_FAILED, f"Alipay refused the order: {_why(answer)}")
            return {"qr_code": str(answer["qr_code"])}

        return await self._call("create", call)

    async def query(self, order_no: str) -> Trade:
        def call() -> Trade:
            answer = self._ali.api_alipay_trade_query(out_trade_no=order_no)
            if answer.get("code") != SUCCESS:
                if answer.get("sub_code") == "ACQ.TRADE_NOT_EXIST":  # nobody scanned the code yet
                    return Trade(order_no, "unknown", raw_state="ACQ.TRADE_NOT_EXIST")
                raise AppError(ErrorCode.UPSTREAM_FAILED, f"Alipay query failed: {_why(answer)}")
            # A signed answer to our own app's request: the app id is ours by construction.
            return _trade(answer, appid=self.appid)

        return await self._call("query", call)

    async def close(self, order_no: str) -> Trade:
        def call() -> dict[str, Any]:
            return dict(self._ali.api_alipay_trade_close(out_trade_no=order_no))

        answer = await self._call("close", call)
        sub_code = answer.get("sub_code")
        if answer.get("code") == SUCCESS or sub_code == "ACQ.TRADE_NOT_EXIST":
            return Trade(order_no, "closed", raw_state=str(sub_code or "TRADE_CLOSED"))
        if sub_code == "ACQ.TRADE_STATUS_ERROR":  # paid (or finished) first
            return await self.query(order_no)
        raise AppError(ErrorCode.UPSTREAM_FAILED, f"Alipay close failed: {_why(answer)}")

    async def refund(self, req: RefundRequest) -> RefundResult:
        def call() -> RefundResult:
            answer = self._ali.api_alipay_trade_refund(
                refund_amount=yuan(req.amount_fen),
                out_trade_no=req.order_no,
                out_request_no=req.refund_no,
                refund_reason=req.reason[:200],
            )
            if answer.get("code") == SUCCESS:
                return RefundResult(
                    req.refund_no,
                    "succeeded",
                    order_no=str(answer.get("out_trade_no") or req.order_no),
                    amount_fen=req.amount_fen,
                    provider_refund_id=answer.get("trade_no"),
                    raw_state=str(answer.get("fund_change", "")),
                )
            if answer.get("code") == "40004" and answer.get("sub_code") not in _RETRYABLE:
                return RefundResult(
                    req.refund_no, "failed", order_no=req.order_no, raw_state=str(answer.get("sub_code"))
                )
            raise AppError(ErrorCode.UPSTREAM_FAILED, f"Alipay refund failed: {_why(answer)}")

        return await self._call("refund", call)

    async def query_refund(self, order_no: str, refund_no: str) -> RefundResult:
        def call() -> RefundResult:
            answer = self._ali.api_alipay_trade_fastpay_refund_query(
                out_request_no=refund_no, out_trade_no=order_no
            )
            if answer.get("code") != SUCCESS:
                raise AppError(ErrorCode.UPSTREAM_FAILED, f"Alipay refund query failed: {_why(answer)}")
            amount = fen_of(answer.get("refund_amount"))
            if answer.get("refund_status", "REFUND_SUCCESS") == "REFUND_SUCCESS" and amount:
                return RefundResult(refund_no, "succeeded", order_no=order_no, amount_fen=amount)
            # Alipay answers 10000 without an amount for a refund it never made.
            return RefundResult(refund_no, "failed", order_no=order_no, raw_state="NOT_REFUNDED")

        return await self._call("query_refund", call)

    # ------------------------------------------------------------ notifications

    def verify_notification(self, headers: Mapping[str, str], body: bytes, now: float) -> Notification:
        """A form-encoded asynchronous notification: RSA2 over the sorted fields (not
        `sign`, `sign_type`), checked with Alipay's public key by the SDK. Pure CPU."""
        del headers, now
        try:
            data = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        except (UnicodeDecodeError, ValueError):
            raise NotificationRefused("unreadable notification") from None
        signature = data.pop("sign", "")
        if not signature:
            raise NotificationRefused("no sign")
        order_no = data.get("out_trade_no", "")[:64] or None
        try:
            ok = self._ali.verify(dict(data), signature)  # verify() pops sign_type: give it a copy
        except Exception as exc:  # an unknown sign_type, a signature that is not base64
            raise NotificationRefused(f"unverifiable: {type(exc).__name__}", order_no=order_no) from None
        if not ok:
            raise NotificationRefused("bad signature", order_no=order_no)
        trade = _trade(data, appid=data.get("app_id"))
        if data.get("trade_status") not in PAID_STATES:
            raise NotificationRefused(
                f"not a payment success: {data.get('trade_status')}", verified=True, order_no=order_no
            )
        if trade.amount_fen is None:
            raise NotificationRefused("unreadable total_amount", verified=True, order_no=order_no)
        return Notification(trade=trade, event_id=data.get("notify_id", "")[:64] or None)

    def verify_refund_notification(
        self, headers: Mapping[str, str], body: bytes, now: float
    ) -> tuple[RefundResult, str | None]:
        raise NotificationRefused("Alipay refunds are synchronous: it sends no refund notification")


def _why(answer: Mapping[str, Any]) -> str:
    return (
        f"{answer.get('code')} {answer.get('sub_code', '')} {answer.get('sub_msg') or answer.get('msg', '')}"
    )


def _trade(answer: Mapping[str, Any], *, appid: str | None) -> Trade:
    state = str(answer.get("trade_status", ""))
    return Trade(
        order_no=str(answer.get("out_trade_no", "")),
        status=_STATES.get(state, "unknown"),
        amount_fen=fen_of(answer.get("total_amount")),
        txn_id=str(answer["trade_no"]) if answer.get("trade_no") else None,
        appid=appid,
        raw_state=state,
    )
