"""An in-process fake of the WeChat Pay APIv3 gateway (public-key mode).

Like the real one it checks the merchant's `Authorization` (WECHATPAY2-SHA256-RSA2048
over `method\\nurl\\ntimestamp\\nnonce\\nbody\\n`, verified with the merchant's public
key), and signs every answer with the platform private key (`Wechatpay-Signature` over
`timestamp\\nnonce\\nbody\\n`, `Wechatpay-Serial` = the public key id). It implements
Native and JSAPI ordering, query by out-trade-no and close (204; 400 ORDERPAID once
paid). `pay()` makes a buyer pay; `notification()` builds the signed, AES-256-GCM
encrypted notification WeChat Pay would POST, for a test to deliver (or tamper with).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from wechatpayv3 import WeChatPay, WeChatPayType

MCHID = "1900000109"
APPID = "wx-test-app"  # the mini-program's appid (tests/auth_support.WECHAT_APPID)
CERT_SERIAL = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1"
PUBLIC_KEY_ID = "PUB_KEY_ID_0114232134912410000000000000000"
APIV3_KEY = "a" * 16 + "0123456789abcdef"  # 32 bytes

_AUTH = re.compile(r'(\w+)="([^"]*)"')


def _pem_private(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_public(key: rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass
class Keys:
    """A merchant key pair and a platform key pair, written as PEM files under `where`."""

    merchant: rsa.RSAPrivateKey
    platform: rsa.RSAPrivateKey
    merchant_private_pem: Path
    platform_public_pem: Path

    @classmethod
    def generate(cls, where: Path) -> Keys:
        merchant = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        platform = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        where.mkdir(parents=True, exist_ok=True)
        mpath, ppath = where / "apiclient_key.pem", where / "pub_key.pem"
        mpath.write_bytes(_pem_private(merchant))
        ppath.write_bytes(_pem_public(platform.public_key()))
        return cls(merchant, platform, mpath, ppath)

    def settings(self, api_base: str) -> dict[str, Any]:
        return {
            "public_base_url": "https://wardrobe.test",
            "wechatpay_mchid": MCHID,
            "wechatpay_private_key": self.merchant_private_pem,
            "wechatpay_cert_serial_no": CERT_SERIAL,
            "wechatpay_apiv3_key": APIV3_KEY,
            "wechatpay_public_key": self.platform_public_pem,
            "wechatpay_public_key_id": PUBLIC_KEY_ID,
            "wechatpay_api_base": api_base,
        }

    def sdk_client(self, api_base: str) -> WeChatPay:
        """The merchant's SDK client (Native) for these keys, pointed at `api_base`: what the
        benchmarks call bare."""
        wx = WeChatPay(
            wechatpay_type=WeChatPayType.NATIVE,
            mchid=MCHID,
            private_key=self.merchant_private_pem.read_text(),
            cert_serial_no=CERT_SERIAL,
            appid=APPID,
            apiv3_key=APIV3_KEY,
            notify_url="https://wardrobe.test/api/v1/payments/wechat/notify",
            timeout=(5, 15),
            public_key=self.platform_public_pem.read_text(),
            public_key_id=PUBLIC_KEY_ID,
        )
        wx._core._gate_way = api_base  # the SDK's place for it (server/payments/wechat.py)
        return wx


def sign(key: rsa.RSAPrivateKey, message: str) -> str:
    return base64.b64encode(key.sign(message.encode(), padding.PKCS1v15(), hashes.SHA256())).decode()


def verify(key: rsa.RSAPublicKey, message: str, signature: str) -> bool:
    try:
        key.verify(base64.b64decode(signature), message.encode(), padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass
class FakeWeChatPay:
    keys: Keys
    trades: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    refused: int = 0  # requests whose Authorization did not verify
    delay: float = 0.0  # seconds each answer waits (latency)
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)  # out_refund_no → refund
    refuse_refunds: str | None = None  # a code every refund is refused with (403)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v3/pay/transactions/native", self.order)
        app.router.add_post("/v3/pay/transactions/jsapi", self.order)
        app.router.add_get("/v3/pay/transactions/out-trade-no/{no}", self.query)
        app.router.add_post("/v3/pay/transactions/out-trade-no/{no}/close", self.close)
        app.router.add_post("/v3/refund/domestic/refunds", self.refund)
        app.router.add_get("/v3/refund/domestic/refunds/{no}", self.query_refund)
        return app

    # ------------------------------------------------------------ test controls

    def pay(self, order_no: str) -> dict[str, Any]:
        """The buyer pays: the trade becomes SUCCESS (no notification is sent)."""
        trade = self.trades[order_no]
        trade["trade_state"] = "SUCCESS"
        trade["transaction_id"] = "42000" + secrets.token_hex(10)
        trade["success_time"] = time.strftime("%Y-%m-%dT%H:%M:%S+08:00")
        return trade

    def notification(
        self,
        order_no: str,
        *,
        amount: int | None = None,
        appid: str | None = None,
        timestamp: int | None = None,
        resource: dict[str, Any] | None = None,
    ) -> tuple[dict[str, str], bytes]:
        """(headers, body) of the TRANSACTION.SUCCESS notification for a paid trade."""
        trade = dict(resource or self.trades[order_no])
        if amount is not None:
            trade["amount"] = {**trade["amount"], "total": amount, "payer_total": amount}
        if appid is not None:
            trade["appid"] = appid
        return self._event("TRANSACTION.SUCCESS", "transaction", trade, timestamp)

    def finish_refund(self, refund_no: str, status: str = "SUCCESS") -> dict[str, Any]:
        """The refund reaches the buyer (or fails: ABNORMAL, CLOSED); no notification is sent."""
        refund = self.refunds[refund_no]
        refund["status"] = status
        if status == "SUCCESS":
            refund["success_time"] = time.strftime("%Y-%m-%dT%H:%M:%S+08:00")
        return refund

    def refund_notification(
        self, refund_no: str, *, amount: int | None = None, mchid: str | None = None
    ) -> tuple[dict[str, str], bytes]:
        """(headers, body) of the REFUND.<status> notification for a refund."""
        refund = self.refunds[refund_no]
        resource = {
            "mchid": mchid or MCHID,
            "out_trade_no": refund["out_trade_no"],
            "transaction_id": refund["transaction_id"],
            "out_refund_no": refund_no,
            "refund_id": refund["refund_id"],
            "refund_status": refund["status"],
            "success_time": refund.get("success_time"),
            "user_received_account": "支付用户零钱",
            "amount": {
                **refund["amount"],
                "refund": refund["amount"]["refund"] if amount is None else amount,
            },
        }
        return self._event(f"REFUND.{refund['status']}", "refund", resource, None)

    def _event(
        self, event_type: str, kind: str, resource: dict[str, Any], timestamp: int | None
    ) -> tuple[dict[str, str], bytes]:
        nonce = secrets.token_hex(6)  # 12 ASCII characters, as WeChat Pay sends
        ciphertext = AESGCM(APIV3_KEY.encode()).encrypt(
            nonce.encode(), json.dumps(resource).encode(), kind.encode()
        )
        body = json.dumps(
            {
                "id": secrets.token_hex(18),
                "create_time": time.strftime("%Y-%m-%dT%H:%M:%S+08:00"),
                "resource_type": "encrypt-resource",
                "event_type": event_type,
                "summary": "支付成功" if kind == "transaction" else "退款成功",
                "resource": {
                    "original_type": kind,
                    "algorithm": "AEAD_AES_256_GCM",
                    "ciphertext": base64.b64encode(ciphertext).decode(),
                    "associated_data": kind,
                    "nonce": nonce,
                },
            },
            ensure_ascii=False,
        )
        return self._signed_headers(body, timestamp), body.encode()

    # ------------------------------------------------------------ the gateway

    def _signed_headers(self, body: str, timestamp: int | None = None) -> dict[str, str]:
        stamp, nonce = str(int(time.time()) if timestamp is None else timestamp), secrets.token_hex(16)
        return {
            "Wechatpay-Timestamp": stamp,
            "Wechatpay-Nonce": nonce,
            "Wechatpay-Signature": sign(self.keys.platform, f"{stamp}\n{nonce}\n{body}\n"),
            "Wechatpay-Serial": PUBLIC_KEY_ID,
            "Wechatpay-Signature-Type": "WECHATPAY2-SHA256-RSA2048",
            "Content-Type": "application/json",
        }

    def _answer(self, status: int, payload: dict[str, Any] | None = None) -> web.Response:
        body = "" if payload is None else json.dumps(payload)
        headers = self._signed_headers(body)
        if payload is None:
            del headers["Content-Type"]
        return web.Response(status=status, text=body if payload is not None else None, headers=headers)

    async def _authorized(self, request: web.Request) -> tuple[bool, str]:
        body = await request.text()
        if self.delay:
            await asyncio.sleep(self.delay)
        header = request.headers.get("Authorization", "")
        scheme, _, rest = header.partition(" ")
        fields = dict(_AUTH.findall(rest))
        message = (
            f"{request.method}\n{request.path_qs}\n{fields.get('timestamp', '')}\n"
            f"{fields.get('nonce_str', '')}\n{body}\n"
        )
        ok = (
            scheme == "WECHATPAY2-SHA256-RSA2048"
            and fields.get("mchid") == MCHID
            and fields.get("serial_no") == CERT_SERIAL
            and request.headers.get("Wechatpay-Serial") == PUBLIC_KEY_ID
            and verify(self.keys.merchant.public_key(), message, fields.get("signature", ""))
        )
        if not ok:
            self.refused += 1
        return ok, body

    async def order(self, request: web.Request) -> web.Response:
        ok, raw = await self._authorized(request)
        self.calls.append(f"order {request.path}")
        if not ok:
            return self._answer(401, {"code": "SIGN_ERROR", "message": "signature mismatch"})
        data = json.loads(raw)
        if data.get("mchid") != MCHID or not data.get("notify_url", "").startswith("https://"):
            return self._answer(400, {"code": "PARAM_ERROR", "message": "mchid or notify_url"})
        jsapi = request.path.endswith("/jsapi")
        if jsapi and not data.get("payer", {}).get("openid"):
            return self._answer(400, {"code": "PARAM_ERROR", "message": "payer.openid required"})
        no = data["out_trade_no"]
        trade = self.trades.setdefault(
            no,
            {
                "appid": data["appid"],
                "mchid": data["mchid"],
                "out_trade_no": no,
                "trade_type": "JSAPI" if jsapi else "NATIVE",
                "trade_state": "NOTPAY",
                "amount": {"total": data["amount"]["total"], "currency": "CNY"},
                "prepay_id": "wx" + secrets.token_hex(15),
                "payer": data.get("payer", {}),
                **({"attach": data["attach"]} if "attach" in data else {}),  # echoed back, as WeChat Pay does
            },
        )
        if jsapi:
            return self._answer(200, {"prepay_id": trade["prepay_id"]})
        return self._answer(200, {"code_url": f"weixin://wxpay/bizpayurl?pr={trade['prepay_id'][2:12]}"})

    async def query(self, request: web.Request) -> web.Response:
        ok, _ = await self._authorized(request)
        self.calls.append(f"query {request.match_info['no']}")
        if not ok:
            return self._answer(401, {"code": "SIGN_ERROR", "message": "signature mismatch"})
        trade = self.trades.get(request.match_info["no"])
        if trade is None or request.query.get("mchid") != MCHID:
            return self._answer(404, {"code": "ORDER_NOT_EXIST", "message": "no such order"})
        answer = {k: v for k, v in trade.items() if k != "prepay_id"}
        if trade["trade_state"] == "SUCCESS":
            answer["amount"] = {**trade["amount"], "payer_total": trade["amount"]["total"]}
        return self._answer(200, answer)

    async def close(self, request: web.Request) -> web.Response:
        ok, _ = await self._authorized(request)
        self.calls.append(f"close {request.match_info['no']}")
        if not ok:
            return self._answer(401, {"code": "SIGN_ERROR", "message": "signature mismatch"})
        trade = self.trades.get(request.match_info["no"])
        if trade is None:
            return self._answer(404, {"code": "ORDER_NOT_EXIST", "message": "no such order"})
        if trade["trade_state"] == "SUCCESS":
            return self._answer(400, {"code": "ORDERPAID", "message": "order paid"})
        trade["trade_state"] = "CLOSED"
        return self._answer(204)

    async def refund(self, request: web.Request) -> web.Response:
        ok, raw = await self._authorized(request)
        self.calls.append("refund")
        if not ok:
            return self._answer(401, {"code": "SIGN_ERROR", "message": "signature mismatch"})
        data = json.loads(raw)
        no = data.get("out_refund_no", "")
        if no in self.refunds:  # a repeat: the refund as it is
            return self._answer(200, self._refund_view(self.refunds[no]))
        if not data.get("notify_url", "").startswith("https://"):
            return self._answer(400, {"code": "PARAM_ERROR", "message": "notify_url"})
        if self.refuse_refunds:
            return self._answer(403, {"code": self.refuse_refunds, "message": "refused"})
        trade = self.trades.get(data.get("out_trade_no", ""))
        if trade is None or trade["trade_state"] not in ("SUCCESS", "REFUND"):
            return self._answer(404, {"code": "RESOURCE_NOT_EXISTS", "message": "no such paid order"})
        amount = data["amount"]
        done = sum(
            r["amount"]["refund"] for r in self.refunds.values() if r["out_trade_no"] == data["out_trade_no"]
        )
        if amount["total"] != trade["amount"]["total"] or amount["refund"] > amount["total"] - done:
            return self._answer(400, {"code": "INVALID_REQUEST", "message": "amount"})
        trade["trade_state"] = "REFUND"
        refund = {
            "refund_id": "50300" + secrets.token_hex(10),
            "out_refund_no": no,
            "transaction_id": trade["transaction_id"],
            "out_trade_no": data["out_trade_no"],
            "channel": "ORIGINAL",
            "status": "PROCESSING",
            "create_time": time.strftime("%Y-%m-%dT%H:%M:%S+08:00"),
            "amount": {
                "total": amount["total"],
                "refund": amount["refund"],
                "payer_total": amount["total"],
                "payer_refund": amount["refund"],
                "currency": "CNY",
            },
        }
        self.refunds[no] = refund
        return self._answer(200, self._refund_view(refund))

    async def query_refund(self, request: web.Request) -> web.Response:
        ok, _ = await self._authorized(request)
        self.calls.append(f"query_refund {request.match_info['no']}")
        if not ok:
            return self._answer(401, {"code": "SIGN_ERROR", "message": "signature mismatch"})
        refund = self.refunds.get(request.match_info["no"])
        if refund is None:
            return self._answer(404, {"code": "RESOURCE_NOT_EXISTS", "message": "no such refund"})
        return self._answer(200, self._refund_view(refund))

    @staticmethod
    def _refund_view(refund: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in refund.items() if v is not None}
