"""An in-process fake of the Alipay open gateway (`gateway.do`, RSA2).

Like the real one it checks the app's signature on every request (RSA2 over the sorted
`k=v` pairs of every parameter but `sign`, verified with the app's public key) and the
app id, and answers `{"<method>_response": {...}, "sign": "..."}` where `sign` is the
Alipay private key's RSA2 signature over the exact `{...}` text of the response, as the
SDK expects. It implements precreate, query, close, refund and fastpay refund query.
`pay()` makes a buyer pay; `notification()` builds the signed, form-encoded asynchronous
notification Alipay would POST, for a test to deliver (or tamper with).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fakes.wechatpay import _pem_private, _pem_public, sign, verify

APPID = "2021000000000001"
SELLER_ID = "2088000000000001"


@dataclass
class AlipayKeys:
    """The app's key pair and Alipay's, written as PEM files under `where`."""

    app: rsa.RSAPrivateKey
    alipay: rsa.RSAPrivateKey
    app_private_pem: Path
    alipay_public_pem: Path

    @classmethod
    def generate(cls, where: Path) -> AlipayKeys:
        app = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        alipay = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        where.mkdir(parents=True, exist_ok=True)
        apath, ppath = where / "app_private_key.pem", where / "alipay_public_key.pem"
        apath.write_bytes(_pem_private(app))
        ppath.write_bytes(_pem_public(alipay.public_key()))
        return cls(app, alipay, apath, ppath)

    def settings(self, gateway: str) -> dict[str, Any]:
        return {
            "public_base_url": "https://wardrobe.test",
            "alipay_appid": APPID,
            "alipay_private_key": self.app_private_pem,
            "alipay_public_key": self.alipay_public_pem,
            "alipay_gateway": gateway,
        }


def _fen(yuan: str) -> int:
    return int(Decimal(yuan) * 100)


def _yuan(fen: int) -> str:
    return f"{fen // 100}.{fen % 100:02d}"


@dataclass
class FakeAlipay:
    keys: AlipayKeys
    trades: dict[str, dict[str, Any]] = field(default_factory=dict)
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)  # out_request_no → refund
    calls: list[str] = field(default_factory=list)
    refused: int = 0  # requests whose signature or app id did not check out
    delay: float = 0.0  # seconds each answer waits (latency)
    refuse_refunds: str | None = None  # a sub_code every refund is refused with
    refund_answer: dict[str, Any] = field(default_factory=dict)  # fields a refund's answer is changed by

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/gateway.do", self.gateway)
        return app

    # ------------------------------------------------------------ test controls

    def pay(self, order_no: str) -> dict[str, Any]:
        trade = self.trades[order_no]
        trade["trade_status"] = "TRADE_SUCCESS"
        trade["trade_no"] = "2026" + secrets.token_hex(12)
        trade["gmt_payment"] = time.strftime("%Y-%m-%d %H:%M:%S")
        return trade

    def notification(
        self,
        order_no: str,
        *,
        amount_fen: int | None = None,
        app_id: str | None = None,
        trade_status: str | None = None,
        tamper: dict[str, str] | None = None,
    ) -> bytes:
        """The form-encoded body of the trade_status_sync notification for a paid trade;
        `tamper` changes fields after signing."""
        trade = self.trades[order_no]
        fields = {
            "notify_time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "notify_type": "trade_status_sync",
            "notify_id": secrets.token_hex(16),
            "app_id": app_id or APPID,
            "charset": "utf-8",
            "version": "1.0",
            "trade_no": trade["trade_no"],
            "out_trade_no": order_no,
            "seller_id": SELLER_ID,
            "buyer_id": "2088102122524333",
            "trade_status": trade_status or trade["trade_status"],
            "total_amount": _yuan(amount_fen) if amount_fen is not None else trade["total_amount"],
            "receipt_amount": trade["total_amount"],
            "subject": trade["subject"],
            "gmt_payment": trade["gmt_payment"],
        }
        message = "&".join(f"{k}={v}" for k, v in sorted(fields.items()))
        signed = {**fields, "sign_type": "RSA2", "sign": sign(self.keys.alipay, message)}
        signed.update(tamper or {})
        return urlencode(signed).encode()

    # ------------------------------------------------------------ the gateway

    def _answer(self, method: str, payload: dict[str, Any]) -> web.Response:
        inner = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        key = method.replace(".", "_") + "_response"
        text = f'{{"{key}":{inner},"sign":"{sign(self.keys.alipay, inner)}"}}'
        return web.Response(text=text, content_type="application/json", charset="utf-8")

    def _signed_by_app(self, params: dict[str, str]) -> bool:
        signature = params.pop("sign", "")
        message = "&".join(f"{k}={v}" for k, v in sorted(params.items()))
        return (
            params.get("app_id") == APPID
            and params.get("sign_type") == "RSA2"
            and verify(self.keys.app.public_key(), message, signature)
        )

    async def gateway(self, request: web.Request) -> web.Response:
        params = dict(request.query)
        if request.method == "POST":
            params.update({k: str(v) for k, v in (await request.post()).items()})
        if self.delay:
            await asyncio.sleep(self.delay)
        method = params.get("method", "")
        self.calls.append(method)
        if not self._signed_by_app(params):
            self.refused += 1
            return self._answer(
                method,
                {"code": "40002", "msg": "Invalid Arguments", "sub_code": "isv.invalid-signature"},
            )
        biz = json.loads(params.get("biz_content") or "{}")
        handler = {
            "alipay.trade.precreate": self._precreate,
            "alipay.trade.query": self._query,
            "alipay.trade.close": self._close,
            "alipay.trade.refund": self._refund,
            "alipay.trade.fastpay.refund.query": self._refund_query,
        }.get(method)
        if handler is None:
            return self._answer(method, {"code": "40004", "msg": "Business Failed", "sub_code": "unknown"})
        return self._answer(method, handler(biz, params))

    @staticmethod
    def _not_exist() -> dict[str, Any]:
        return {"code": "40004", "msg": "Business Failed", "sub_code": "ACQ.TRADE_NOT_EXIST"}

    def _precreate(self, biz: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        no = biz["out_trade_no"]
        if not params.get("notify_url", "").startswith("https://"):
            return {"code": "40002", "msg": "Invalid Arguments", "sub_code": "isv.invalid-notify-url"}
        trade = self.trades.setdefault(
            no,
            {
                "out_trade_no": no,
                "total_amount": biz["total_amount"],
                "subject": biz["subject"],
                "trade_status": "WAIT_BUYER_PAY",
                "trade_no": None,
                "refunded_fen": 0,
            },
        )
        return {
            "code": "10000",
            "msg": "Success",
            "out_trade_no": no,
            "qr_code": f"https://qr.alipay.com/bax{hash(trade['out_trade_no']) & 0xFFFFFF:06x}",
        }

    def _query(self, biz: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        trade = self.trades.get(biz.get("out_trade_no", ""))
        if trade is None:
            return self._not_exist()
        answer = {
            "code": "10000",
            "msg": "Success",
            "out_trade_no": trade["out_trade_no"],
            "trade_status": trade["trade_status"],
            "total_amount": trade["total_amount"],
        }
        if trade["trade_no"]:
            answer["trade_no"] = trade["trade_no"]
        return answer

    def _close(self, biz: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        trade = self.trades.get(biz.get("out_trade_no", ""))
        if trade is None:
            return self._not_exist()
        if trade["trade_status"] in ("TRADE_SUCCESS", "TRADE_FINISHED"):
            return {"code": "40004", "msg": "Business Failed", "sub_code": "ACQ.TRADE_STATUS_ERROR"}
        trade["trade_status"] = "TRADE_CLOSED"
        return {"code": "10000", "msg": "Success", "out_trade_no": trade["out_trade_no"]}

    def _refund(self, biz: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        trade = self.trades.get(biz.get("out_trade_no", ""))
        if trade is None:
            return self._not_exist()
        request_no = biz.get("out_request_no") or trade["out_trade_no"]
        amount = _fen(biz["refund_amount"])
        known = self.refunds.get(request_no)
        if known is not None:  # a repeat: the same answer, no money moves
            return {**known["answer"], "fund_change": "N"}
        if self.refuse_refunds:
            return {"code": "40004", "msg": "Business Failed", "sub_code": self.refuse_refunds}
        if trade["trade_status"] != "TRADE_SUCCESS":
            return {"code": "40004", "msg": "Business Failed", "sub_code": "ACQ.TRADE_STATUS_ERROR"}
        if amount > _fen(trade["total_amount"]) - trade["refunded_fen"]:
            return {"code": "40004", "msg": "Business Failed", "sub_code": "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL"}
        trade["refunded_fen"] += amount
        if trade["refunded_fen"] == _fen(trade["total_amount"]):
            trade["trade_status"] = "TRADE_CLOSED"
        answer = {
            "code": "10000",
            "msg": "Success",
            "trade_no": trade["trade_no"],
            "out_trade_no": trade["out_trade_no"],
            "buyer_logon_id": "159****5620",
            "fund_change": "Y",
            "refund_fee": _yuan(trade["refunded_fen"]),
        }
        self.refunds[request_no] = {"amount_fen": amount, "answer": answer}
        return {**answer, **self.refund_answer}

    def _refund_query(self, biz: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        known = self.refunds.get(biz.get("out_request_no", ""))
        answer: dict[str, Any] = {"code": "10000", "msg": "Success", "out_trade_no": biz.get("out_trade_no")}
        if known is not None:
            answer["out_request_no"] = biz["out_request_no"]
            answer["refund_amount"] = _yuan(known["amount_fen"])
            answer["refund_status"] = "REFUND_SUCCESS"
        return answer
