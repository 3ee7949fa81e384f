"""What every payment provider adapter offers the facade (WeChat Pay, Alipay).

A provider owns one or more channels (`wechat_native`, `wechat_jsapi`, `alipay_qr`, …),
turns an order into the parameters a client pays with, asks the provider about an
order, closes one, and verifies an asynchronous notification. Amounts are fen here;
an adapter converts to its provider's format (Alipay's yuan strings) at its edge.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from server.config import ConfigError

TradeStatus = Literal["paid", "pending", "closed", "refunded", "unknown"]
RefundStatus = Literal["processing", "succeeded", "failed"]


@dataclass(frozen=True, slots=True)
class Trade:
    """A provider's view of one order, from a query, a close or a notification."""

    order_no: str
    status: TradeStatus
    amount_fen: int | None = None
    txn_id: str | None = None
    appid: str | None = None
    mchid: str | None = None
    raw_state: str = ""
    #: The buyer's user id as we gave it when creating the order and the provider echoes
    #: it (WeChat Pay's `attach`): lets a notification go to the buyer's credit actor
    #: without reading the order first. None when absent (older orders, Alipay).
    buyer_id: int | None = None


@dataclass(frozen=True, slots=True)
class PayRequest:
    order_no: str
    channel: str
    amount_fen: int
    description: str
    expires_at_rfc3339: str
    openid: str | None = None
    buyer_id: int | None = None  # echoed back in notifications where the provider allows


@dataclass(frozen=True, slots=True)
class RefundRequest:
    order_no: str
    refund_no: str
    amount_fen: int
    total_fen: int  # the order's amount
    reason: str


@dataclass(frozen=True, slots=True)
class RefundResult:
    """A provider's view of one refund, from the refund call, a query or a notification.

    `failed` only when the provider said so (no money moved); a call whose outcome is
    unknown (timeout, network) raises AppError instead and the refund stays processing."""

    refund_no: str
    status: RefundStatus
    order_no: str | None = None
    amount_fen: int | None = None
    provider_refund_id: str | None = None
    mchid: str | None = None
    raw_state: str = ""


class NotificationRefused(Exception):
    """A notification that must not be applied; the message says why (it is recorded)."""

    def __init__(self, reason: str, *, verified: bool = False, order_no: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.verified = verified
        self.order_no = order_no


@dataclass(frozen=True, slots=True)
class Notification:
    """A verified, decrypted notification: the trade it reports and its event id."""

    trade: Trade
    event_id: str | None


class Provider(Protocol):
    name: str
    channels: tuple[str, ...]
    #: The appid/mchid every answer and notification must carry (checked against the order).
    expected_ids: Mapping[str, str]

    def needs_openid(self, channel: str) -> bool: ...

    async def create(self, req: PayRequest) -> dict[str, Any]:
        """The channel's `pay_params`; raises AppError(UPSTREAM_FAILED) on a provider error."""
        ...

    async def query(self, order_no: str) -> Trade: ...

    async def close(self, order_no: str) -> Trade:
        """Close at the provider: `closed`, or `paid` when the buyer paid first."""
        ...

    async def refund(self, req: RefundRequest) -> RefundResult:
        """Ask for a refund (idempotent per refund_no): processing, succeeded or failed."""
        ...

    async def query_refund(self, order_no: str, refund_no: str) -> RefundResult: ...

    def verify_notification(self, headers: Mapping[str, str], body: bytes, now: float) -> Notification:
        """Signature, freshness, decryption; raises NotificationRefused. Pure CPU."""
        ...

    def verify_refund_notification(
        self, headers: Mapping[str, str], body: bytes, now: float
    ) -> tuple[RefundResult, str | None]:
        """A refund notification and its event id; raises NotificationRefused. Pure CPU."""
        ...

    async def close_pool(self) -> None: ...


def read_key_file(path: Path | None, name: str) -> str:
    """A provider's PEM file named by setting `name`; ConfigError saying which when unreadable."""
    try:
        return Path(str(path)).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc}") from exc
