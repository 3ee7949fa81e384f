"""The payments facade: products, orders, notifications, and the one settle function.

Paying an order is `settle()`, whoever noticed the money (a notification, a query, a
close answered "already paid", the dev endpoint): one transaction, run by the buyer's
UserActor inside its credit batch (Credits.apply): the order's
conditional `pending|closed → paid`, the ledger `grant` (ref = order number), the
membership extension and the commission hook. Of any number of racers one moves the
order; the rest answer "already applied" and grant nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Literal

from loguru import logger
from redis.asyncio import Redis

from server.auth.users import Profiles
from server.config import DistributorSettings, Settings
from server.credits.facade import Credits
from server.credits.ledger import Grant, QuotaState, Read
from server.db import Conn, Database, GroupExecute, Row, is_duplicate
from server.errors import AppError, Busy, ErrorCode, NotFound, validation_failed
from server.hub.events import Event, EventHub
from server.metrics import Metrics
from server.paging import decode_cursor, encode_cursor
from server.payments import alipay, orders, wechat
from server.payments.commissions import record_commission
from server.payments.orders import PAID_STATUSES, Order
from server.payments.products import Product, Products
from server.payments.providers import NotificationRefused, PayRequest, Provider, Trade
from server.payments.refunding import Refunds
from server.payments.refunds import Refund
from server.statemachine import IllegalTransition
from server.timing import utcnow

# Order (a row's view) is part of the contract: the admin API renders it.
__all__ = ["Order", "Payments", "open_payments"]

#: Every channel the API knows; a server offers those its providers are configured for.
KNOWN_CHANNELS = ("wechat_jsapi", "wechat_native", "alipay_qr")
MEMBER_TIER = "member"
STALE_AFTER = dt.timedelta(minutes=1)  # the cron job asks about pending orders this old
STALE_BATCH = 500
NOTIFICATION_COLUMNS = "id, provider, kind, event_id, order_no, verified, outcome, reason, remote, created_at"


def request_hash(product_id: str, channel: str) -> str:
    raw = json.dumps({"product_id": product_id, "channel": channel}, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()


#: The order row in one statement, written only while the product still has the terms the
#: order was priced with (the cached Product): 0 rows → the product changed, nothing written.
INSERT_ORDER = (
    "INSERT INTO orders (order_no, user_id, product_id, product_kind, credits, membership_days, channel, "
    "amount_fen, status, pay_params, idempotency_key, request_hash, created_at, expires_at) "
    "SELECT %s, %s, id, kind, credits, membership_days, %s, price_fen, 'pending', %s, %s, %s, %s, %s "
    "FROM products WHERE id = %s AND enabled = 1 AND kind = %s AND price_fen = %s AND credits = %s "
    "AND membership_days = %s"
)


def not_on_sale(product: Product | None) -> AppError:
    what = "no such product" if product is None else "this product is not on sale"
    return validation_failed([{"field": "product_id", "message": what}])


@dataclass(frozen=True, slots=True)
class Settled:
    order: Order
    applied: bool  # False: it was paid already (a replay)
    recorded: bool = False  # the notification was recorded in the settlement transaction


@dataclass(frozen=True, slots=True)
class Received:
    """A verified notification, recorded (applied or duplicate) in the transaction that settles."""

    provider: str
    event_id: str | None
    body: bytes
    remote: str | None


NOTE_SQL = (
    "INSERT INTO payment_notifications (provider, kind, event_id, order_no, verified, outcome, reason, body, "
    "remote) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
)


@dataclass(frozen=True, slots=True)
class Note:
    """One `payment_notifications` row: a notification received, verified or not, and its outcome."""

    provider: str
    kind: str  # payment | refund
    event_id: str | None
    order_no: str | None
    verified: bool
    outcome: str  # applied | duplicate | refused | error
    reason: str | None
    body: bytes
    remote: str | None

    def args(self) -> tuple[object, ...]:
        """NOTE_SQL's parameters (the reason, body and remote cut to their columns)."""
        return (
            self.provider, self.kind, self.event_id, self.order_no, self.verified, self.outcome,
            (self.reason or "")[:200] or None, self.body[:1_000_000].decode("utf-8", "replace"),
            (self.remote or "")[:64] or None,
        )  # fmt: skip


def order_grant(order: Order) -> Grant | None:
    """The credits a paid order grants (ref = the order number: granted once)."""
    if order.credits <= 0:
        return None
    return Grant(
        order.credits, "grant", ref=order.order_no, reason=f"order {order.order_no}", order_no=order.order_no
    )


async def pay_order(
    tx: Conn,
    order: Order,
    *,
    paid_at: dt.datetime,
    txn_id: str | None,
    source: str,
    received: Received | None,
    terms: DistributorSettings,
) -> bool:
    """The settlement SQL, run in the buyer's credit transaction before `order_grant`: the
    conditional `pending|closed → paid`, the notification row with its outcome, and when
    this call moved the order, the membership and the commission hook. True: it moved it."""
    try:
        moved = await orders.transition(
            tx, order.order_no, "paid", paid_at=paid_at, provider_txn_id=txn_id, paid_source=source
        )
    except IllegalTransition as exc:
        if exc.current not in PAID_STATUSES:
            raise
        moved = False  # paid and then refunded already
    writes: list[str] = []
    if received is not None:
        outcome = "applied" if moved else "duplicate"
        note = Note(
            received.provider, "payment", received.event_id, order.order_no, True, outcome, None,
            received.body, received.remote,
        )  # fmt: skip
        writes.append(tx.format(NOTE_SQL, *note.args()))
    if not moved:
        if writes:
            await tx.execute_all(writes)
        return False
    if order.membership_days:
        writes.append(
            tx.format(
                "UPDATE users SET membership_tier = %s, membership_expires_at = DATE_ADD("
                "GREATEST(COALESCE(membership_expires_at, %s), %s), INTERVAL %s DAY) WHERE id = %s",
                MEMBER_TIER, paid_at, paid_at, order.membership_days, order.user_id,
            )
        )  # fmt: skip
    # The notification row and the membership go in the commission lookup's round trip.
    await record_commission(tx, order, terms, along=writes)
    return True


def _amount_differs(amount_fen: int | None, order: Order) -> str | None:
    if amount_fen != order.amount_fen:
        return f"amount {amount_fen} differs from the order's {order.amount_fen}"
    return None


class Settlement:
    """One settlement's effect in the buyer's credit transaction (Credits.apply): the
    order read in the account lock's round trip when the caller has not read it, the
    caller's checks, `pay_order`, the grant; and, once committed, the `order.paid` event
    (published by the UserActor with the batch's `quota.changed`, in one script run).
    `bench/payments.py` runs the same object bare."""

    def __init__(
        self,
        order_no: str,
        buyer_id: int,
        order: Order | None,
        check: Callable[[Order], str | None],
        *,
        paid_at: dt.datetime,
        txn_id: str | None,
        source: str,
        received: Received | None,
        terms: DistributorSettings,
    ) -> None:
        self.order_no = order_no
        self.buyer_id = buyer_id
        self.order = order
        self.check = check
        self.paid_at = paid_at
        self.txn_id = txn_id
        self.source = source
        self.received = received
        self.terms = terms
        self.refused: str | None = None
        self._paid: Order | None = None
        self.grant_refs = (("grant", order_no),)  # order_grant's ref: looked up with the lock
        self.reads: tuple[Read, ...] = ()
        if order is None:
            self.reads = ((f"SELECT {orders.SETTLE_COLUMNS} FROM orders WHERE order_no = %s", (order_no,)),)

    async def effect(
        self, tx: Conn, _: QuotaState, read: Sequence[Sequence[Row]]
    ) -> Grant | Literal[False] | None:
        if self.order is None:  # read here, so checked here (the caller checked an order it gave)
            self.refused = self._adopt(read[0])
            if self.refused is not None:
                return False
        order = self.order
        assert order is not None
        moved = await pay_order(
            tx, order, paid_at=self.paid_at, txn_id=self.txn_id, source=self.source, received=self.received,
            terms=self.terms,
        )  # fmt: skip
        return order_grant(order) if moved else False

    def _adopt(self, rows: Sequence[Row]) -> str | None:
        """Take the order read in the transaction: why it must not be paid, or None."""
        if not rows:
            return "unknown order"
        order = self.order = Order.of(rows[0])
        why = self.check(order)
        if why is None and order.user_id != self.buyer_id:
            why = f"the order is not user {self.buyer_id}'s"
        return why

    def paid(self) -> Order:
        """The order as this settlement left it (when it applied)."""
        if self._paid is None:
            assert self.order is not None
            self._paid = replace(self.order, status="paid", paid_at=self.paid_at, provider_txn_id=self.txn_id)
        return self._paid

    def announce(self) -> list[Event]:
        """`order.paid` for a credit pack. A membership's waits for the buyer's cached
        profile to be dropped (Payments.settle publishes it): a client reading GET /me on
        the event must see the membership."""
        assert self.order is not None
        return [] if self.order.membership_days else [("order.paid", self.paid().public())]


class Payments:
    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        redis: Redis,
        credits: Credits,
        hub: EventHub,
        profiles: Profiles,
        metrics: Metrics,
        providers: list[Provider],
    ) -> None:
        self.settings = settings
        self.db = db
        self.redis = redis
        self.credits = credits
        self.hub = hub
        self.profiles = profiles
        self.metrics = metrics
        self.products = Products(db)
        self._insert_order = GroupExecute(db, INSERT_ORDER)  # orders made at once share a round trip
        self.providers = {p.name: p for p in providers}
        self._by_channel = {c: p for p in providers for c in p.channels}
        self.refunds = Refunds(
            db=db,
            credits=credits,
            hub=hub,
            profiles=profiles,
            metrics=metrics,
            provider_for=self.provider_for,
        )

    async def close(self) -> None:
        for provider in self.providers.values():
            await provider.close_pool()

    def channels(self) -> list[str]:
        return [c for c in KNOWN_CHANNELS if c in self._by_channel]

    def provider_for(self, channel: str) -> Provider | None:
        return self._by_channel.get(channel)

    # ------------------------------------------------------------ orders

    async def _load(self, order_no: str) -> Order | None:
        async with self.db.connection() as conn:
            return await orders.load(conn, order_no)

    async def _own(self, user_id: int, order_no: str) -> Order:
        order = await self._load(order_no)
        if order is None or order.user_id != user_id:
            raise NotFound(f"No order {order_no}")
        return order

    async def _by_key(self, user_id: int, key: str, digest: str) -> Order | None:
        """The order this Idempotency-Key made (read in one statement), if the body is the same."""
        row = await self.db.fetchone(
            f"SELECT {orders.ORDER_COLUMNS} FROM orders WHERE user_id = %s AND idempotency_key = %s",
            user_id,
            key,
        )
        return None if row is None else self._answer_repeat(Order.of(row), digest)

    def _answer_repeat(self, order: Order, digest: str) -> Order:
        """The order an Idempotency-Key made, if this request's body is the same."""
        if order.request_hash != digest:
            raise AppError(
                ErrorCode.IDEMPOTENCY_CONFLICT, "This Idempotency-Key was used with a different request body"
            )
        return order

    async def _refuse(self, user_id: int, key: str, digest: str, error: AppError) -> tuple[Order, bool]:
        """Raise `error`, unless this key made an order already: then that order answers (or
        409 for another body), as when the key was looked up before every check. Only
        refusals pay for this read; the happy path lets the INSERT's unique key decide."""
        found = await self._by_key(user_id, key, digest)
        if found is None:
            raise error
        return found, False

    async def _openid(self, user_id: int) -> str | None:
        openid = await self.db.fetchval("SELECT wechat_openid FROM users WHERE id = %s", user_id)
        return str(openid) if openid else None

    async def create_order(self, user_id: int, key: str, product_id: str, channel: str) -> tuple[Order, bool]:
        """(order, created). A repeat of a key with the same body answers the first order.

        MySQL round trips on the happy path: one (the INSERT, shared with the orders made at
        the same moment: `GroupExecute`) for Native and Alipay, two for JSAPI (the buyer's
        openid first), once the product is in `Products`' cache. The
        key is not looked up first: the unique key (user_id, idempotency_key) decides at
        the INSERT, so a repeat costs a provider call whose prepay is thrown away (never
        handed to anyone; it expires at the provider at our `expires_at`). Every refusal
        checks the key first (`_refuse`), so a repeat is answered whatever changed since."""
        digest = request_hash(product_id, channel)
        provider = self.provider_for(channel)
        if provider is None:
            offered = ", ".join(self.channels()) or "none"
            message = f"{channel} is not configured on this server (offered: {offered})"
            return await self._refuse(
                user_id, key, digest, validation_failed([{"field": "channel", "message": message}])
            )
        product = await self.products.for_sale(product_id)
        if product is None or not product.enabled:
            return await self._refuse(user_id, key, digest, not_on_sale(product))
        openid = None
        if provider.needs_openid(channel):
            openid = await self._openid(user_id)
            if not openid:
                message = f"{channel} needs an account signed in with WeChat"
                return await self._refuse(
                    user_id, key, digest, validation_failed([{"field": "channel", "message": message}])
                )
        for attempt in (1, 2):
            made = await self._make_order(user_id, key, digest, channel, provider, product, openid)
            if made is not None:
                return made
            # The product's terms changed (or it was disabled) since this instance cached
            # it: nothing was written. Read it again; still on sale → one more order, with
            # a new order number and a new provider call (the first prepay just expires).
            fresh = await self.products.get(product.id)  # and so replaces, or drops, the cached one
            if fresh is None or not fresh.enabled:
                return await self._refuse(user_id, key, digest, not_on_sale(fresh))
            if attempt == 2:
                # Changed again within one provider call: nothing written; the same request
                # (same key) may simply be sent again.
                raise Busy(f"product {product.id} changed twice while this order was made; retry")
            logger.info("product {} changed since it was cached; ordering at its current terms", product.id)
            product = fresh
        raise AssertionError("unreachable")

    async def _make_order(
        self,
        user_id: int,
        key: str,
        digest: str,
        channel: str,
        provider: Provider,
        product: Product,
        openid: str | None,
    ) -> tuple[Order, bool] | None:
        """Ask the provider, then write the order in ONE statement that re-checks the
        product's terms (None: they changed; nothing written). The Order is returned as
        inserted, without reading it back."""
        now = utcnow().replace(microsecond=0)
        expires = now + dt.timedelta(seconds=self.settings.payments.order_ttl)
        order_no = orders.new_order_no(now)
        try:
            pay_params = await provider.create(
                PayRequest(
                    order_no=order_no,
                    channel=channel,
                    amount_fen=product.price_fen,
                    description=product.name[:40],
                    expires_at_rfc3339=expires.isoformat() + "+00:00",
                    openid=openid,
                    buyer_id=user_id,
                )
            )
        except AppError as exc:  # UPSTREAM_FAILED, BUSY: nothing written; a repeat still answers
            return await self._refuse(user_id, key, digest, exc)
        try:
            inserted = await self._insert_order(
                order_no, user_id, channel, json.dumps(pay_params), key, digest, now, expires,
                product.id, product.kind, product.price_fen, product.credits, product.membership_days,
            )  # fmt: skip
        except Exception as exc:
            if not is_duplicate(exc):
                raise
            # This key made an order already (a repeat, or a racing request that won): that
            # order is the answer, or 409 for another body. Our prepay expires unused.
            found = await self._by_key(user_id, key, digest)
            assert found is not None
            return found, False
        if not inserted:
            return None
        self.metrics.child(self.metrics.orders, channel, "pending").inc()
        order = Order(
            order_no=order_no,
            user_id=user_id,
            product_id=product.id,
            product_kind=product.kind,
            credits=product.credits,
            membership_days=product.membership_days,
            channel=channel,
            amount_fen=product.price_fen,
            status="pending",
            pay_params=pay_params,
            request_hash=digest,
            provider_txn_id=None,
            refunded_fen=0,
            created_at=now,
            expires_at=expires,
            paid_at=None,
        )  # fmt: skip  (what was just inserted: no need to read it back)
        return order, True

    async def list_orders(
        self, user_id: int, cursor: str | None, limit: int
    ) -> tuple[list[Order], str | None]:
        after = decode_cursor(cursor, str, accept=orders.is_order_no)
        rows = await self.db.fetchall(
            f"SELECT {orders.ORDER_COLUMNS} FROM orders WHERE user_id = %s AND order_no < %s "
            "ORDER BY order_no DESC LIMIT %s",
            user_id,
            after[0] if after else "~",
            limit + 1,
        )
        items = [Order.of(r) for r in rows[:limit]]
        more = len(rows) > limit and items
        return items, encode_cursor(items[-1].order_no) if more else None

    async def get_order(self, user_id: int, order_no: str) -> Order:
        """The caller's order; a pending one old enough asks the provider (throttled)."""
        order = await self._own(user_id, order_no)
        interval = self.settings.payments.order_query_interval
        if order.status != "pending" or utcnow() - order.created_at < dt.timedelta(seconds=interval):
            return order
        provider = self.provider_for(order.channel)
        if provider is None:
            return order
        if not await self.redis.set(f"order:query:{order_no}", b"1", nx=True, px=int(interval * 1000)):
            return order
        try:
            trade = await provider.query(order_no)
        except AppError as exc:
            logger.warning("query of order {} failed: {}", order_no, exc.message)
            return order
        return await self._apply_trade(order, trade, "query")

    async def close_order(self, user_id: int, order_no: str) -> Order:
        order = await self._own(user_id, order_no)
        if order.status == "closed":
            return order
        if order.status != "pending":
            raise IllegalTransition("order", order_no, order.status, "closed")
        return await self._close(order, "close")

    async def _close(self, order: Order, source: str) -> Order:
        """Close at the provider first; one that answers "already paid" makes the order paid."""
        provider = self.provider_for(order.channel)
        if provider is not None:
            trade = await provider.close(order.order_no)
            if trade.status == "paid":
                return await self._apply_trade(order, trade, source)
        async with self.db.transaction() as tx:
            try:
                moved = await orders.transition(tx, order.order_no, "closed", closed_at=utcnow())
            except IllegalTransition as exc:
                if exc.current not in PAID_STATUSES:
                    raise
                moved = False  # paid meanwhile: paid wins
        if moved:
            self.metrics.orders.labels(order.channel, "closed").inc()
        reloaded = await self._load(order.order_no)
        assert reloaded is not None
        return reloaded

    def _refusal(self, provider: Provider, trade: Trade, order: Order) -> str | None:
        """Why a verified notification must not pay this order, or None."""
        if order.channel not in provider.channels:
            return f"order {order.order_no} is a {order.channel} order"
        return self._mismatch(order, trade)

    def _mismatch(self, order: Order, trade: Trade) -> str | None:
        """Why a provider's answer does not belong to this order, or None when it does."""
        provider = self.provider_for(order.channel)
        if provider is None:
            return f"no provider for channel {order.channel}"
        for name, expected in provider.expected_ids.items():
            got = getattr(trade, name)
            if got != expected:
                return f"{name} {str(got)[:40]!r} is not ours"
        if trade.order_no != order.order_no:
            return "order number differs"
        if trade.amount_fen != order.amount_fen:
            return f"amount {trade.amount_fen} differs from the order's {order.amount_fen}"
        return None

    async def _apply_trade(self, order: Order, trade: Trade, source: str) -> Order:
        if trade.status != "paid":
            return order
        why = self._mismatch(order, trade)
        if why is not None:
            logger.error("{} answer for order {} refused: {}", source, order.order_no, why)
            return order
        return (
            await self.settle(
                order.order_no, source, txn_id=trade.txn_id, amount_fen=trade.amount_fen, order=order
            )
        ).order

    # ------------------------------------------------------------ settlement

    async def settle(
        self,
        order_no: str,
        source: str,
        *,
        txn_id: str | None,
        amount_fen: int | None,
        order: Order | None = None,
        buyer_id: int | None = None,
        check: Callable[[Order], str | None] | None = None,
        received: Received | None = None,
    ) -> Settled:
        """Pay the order once: see the module docstring. Callers have verified the money.

        `order`: the order as the caller just read it (its terms never change; its status
        is re-checked inside the transaction), to save reading it again. Without it,
        `buyer_id` (the provider echoed it back) lets the transaction read the order in its
        first round trip instead; without either, it is read first. `check`: why the
        order must not be paid by this caller's news (a notification's ids and amount), or
        None; a refusal raises NotificationRefused and writes nothing. `received`: the
        notification to record (applied or duplicate) in the same transaction."""
        if order is not None and order.order_no != order_no:
            order = None
        if order is None and buyer_id is None:
            order = await self._load(order_no)
            if order is None:
                raise NotFound(f"No order {order_no}")
        refuse = check is not None  # the caller's check refuses a notification; ours is a conflict
        check = check or partial(_amount_differs, amount_fen)
        if order is not None:
            why = check(order)
            if why is not None and refuse:
                raise NotificationRefused(why, verified=True, order_no=order_no)
            if why is not None:
                raise AppError(ErrorCode.CONFLICT, why)
            if order.status in PAID_STATUSES:
                return Settled(order, applied=False)
            buyer_id = order.user_id
        assert buyer_id is not None
        run = Settlement(
            order_no, buyer_id, order, check, paid_at=utcnow(), txn_id=txn_id, source=source,
            received=received, terms=self.settings.distributors,
        )  # fmt: skip
        outcome = await self.credits.apply(
            buyer_id, run.effect, grant_refs=run.grant_refs, reads=run.reads, announce=run.announce
        )
        if run.refused is not None:
            raise NotificationRefused(run.refused, verified=True, order_no=order_no)
        assert run.order is not None
        paid = run.order
        if outcome.applied:  # this call moved it: no need to read it back
            reloaded = run.paid()
            self.metrics.child(self.metrics.orders, paid.channel, "paid").inc()
            self.metrics.child(self.metrics.paid_fen, paid.channel).inc(paid.amount_fen)
            logger.info("order {} paid ({}), {} credits granted", order_no, source, paid.credits)
            if paid.membership_days:  # the cached profile goes first, then the news (not announced)
                await self.profiles.invalidate(paid.user_id)
                await self.hub.publish(paid.user_id, "order.paid", reloaded.public())
        else:
            found = await self._load(order_no)
            assert found is not None
            reloaded = found
        return Settled(reloaded, outcome.applied, recorded=received is not None)

    async def dev_paid(self, order_no: str) -> Order:
        """The dev endpoint: pay an order as a verified notification would."""
        order = await self._load(order_no)
        if order is None:
            raise NotFound(f"No order {order_no}")
        settled = await self.settle(
            order_no, "dev", txn_id=f"dev-{order_no}", amount_fen=order.amount_fen, order=order
        )
        return settled.order

    # ------------------------------------------------------------ notifications

    async def wechat_notification(
        self, headers: Mapping[str, str], body: bytes, remote: str | None
    ) -> tuple[int, str]:
        """(HTTP status, message): 204 when applied or applied before; else 4xx/5xx (WeChat retries)."""
        return await self._payment_notification("wechat", headers, body, remote)

    async def alipay_notification(self, body: bytes, remote: str | None) -> bool:
        """True (answer `success`) when applied or applied before; False (`failure`: Alipay retries)."""
        status, _ = await self._payment_notification("alipay", {}, body, remote)
        return status == 204

    async def _payment_notification(
        self, provider_name: str, headers: Mapping[str, str], body: bytes, remote: str | None
    ) -> tuple[int, str]:
        """Verify, check against the order, settle, record: (204 | 4xx refused | 5xx error, reason)."""
        provider = self.providers.get(provider_name)
        verified, order_no, event_id = False, None, None
        try:
            if provider is None:
                raise NotificationRefused(f"{provider_name} is not configured")
            note = provider.verify_notification(headers, body, time.time())
            verified, order_no, event_id = True, note.trade.order_no[:64], note.event_id
            if not orders.is_order_no(order_no):  # else read inside the buyer's batch transaction
                raise NotificationRefused("unknown order")
            order = None
            if note.trade.buyer_id is None:  # else read in the settlement's first round trip
                async with self.db.connection() as conn:
                    order = await orders.load_for_settlement(conn, order_no)
                if order is None:
                    raise NotificationRefused("unknown order")
            settled = await self.settle(
                order_no,
                "notify",
                txn_id=note.trade.txn_id,
                amount_fen=note.trade.amount_fen,
                order=order,
                buyer_id=note.trade.buyer_id,
                check=partial(self._refusal, provider, note.trade),
                received=Received(provider_name, event_id, body, remote),
            )
            outcome, reason, status = ("applied" if settled.applied else "duplicate"), None, 204
            if settled.recorded:
                self.metrics.child(self.metrics.notifications, provider_name, outcome).inc()
                return status, ""
        except NotificationRefused as exc:
            verified = verified or exc.verified
            order_no = order_no or exc.order_no
            outcome, reason, status = "refused", exc.reason, 400
        except AppError as exc:
            outcome, reason, status = "error", exc.message, 500 if exc.status < 500 else exc.status
        except Exception as exc:
            logger.opt(exception=True).error("{} payment notification failed", provider_name)
            outcome, reason, status = "error", type(exc).__name__, 500
        await self._record(
            Note(provider_name, "payment", event_id, order_no, verified, outcome, reason, body, remote)
        )
        if outcome == "refused":
            logger.warning("{} payment notification refused ({}): {}", provider_name, order_no, reason)
        return status, reason or ""

    async def wechat_refund_notification(
        self, headers: Mapping[str, str], body: bytes, remote: str | None
    ) -> tuple[int, str]:
        """A WeChat Pay refund notification, with the pay notification's rules and answers."""
        provider = self.providers.get("wechat")
        verified, order_no, event_id = False, None, None
        try:
            if provider is None:
                raise NotificationRefused("WeChat Pay is not configured")
            applied, order_no, event_id = await self.refunds.wechat_notification(
                provider, headers, body, time.time()
            )
            verified = True
            outcome, reason, status = ("applied" if applied else "duplicate"), None, 204
        except NotificationRefused as exc:
            verified = verified or exc.verified
            order_no = order_no or exc.order_no
            outcome, reason, status = "refused", exc.reason, 400
        except AppError as exc:
            verified = True
            outcome, reason, status = "error", exc.message, 500 if exc.status < 500 else exc.status
        except Exception as exc:
            logger.opt(exception=True).error("WeChat Pay refund notification failed")
            outcome, reason, status = "error", type(exc).__name__, 500
        note = Note("wechat", "refund", event_id, order_no, verified, outcome, reason, body, remote)
        await self._record(note)
        if outcome == "refused":
            logger.warning("WeChat Pay refund notification refused ({}): {}", order_no, reason)
        return status, reason or ""

    async def _record(self, note: Note) -> None:
        self.metrics.child(self.metrics.notifications, note.provider, note.outcome).inc()
        try:
            await self.db.execute(NOTE_SQL, *note.args())
        except Exception:
            logger.opt(exception=True).error(
                "could not record a {} notification ({})", note.provider, note.outcome
            )

    # ------------------------------------------------------------ admin views

    async def admin_orders(
        self, status: str | None, user_id: int | None, cursor: str | None, limit: int
    ) -> tuple[list[Order], str | None]:
        """Every order (or those of one status / one user), newest first."""
        after = decode_cursor(cursor, str, accept=orders.is_order_no)
        where, args = ["order_no < %s"], [after[0] if after else "~"]
        if status is not None:
            where.append("status = %s")
            args.append(status)
        if user_id is not None:
            where.append("user_id = %s")
            args.append(str(user_id))
        rows = await self.db.fetchall(
            f"SELECT {orders.ORDER_COLUMNS} FROM orders WHERE {' AND '.join(where)} "
            "ORDER BY order_no DESC LIMIT %s",
            *args,
            limit + 1,
        )
        items = [Order.of(r) for r in rows[:limit]]
        more = len(rows) > limit and items
        return items, encode_cursor(items[-1].order_no) if more else None

    async def admin_order(self, order_no: str) -> tuple[Order, list[Refund], list[Row]]:
        """An order, its refunds, and every notification received about it (newest first)."""
        order = await self._load(order_no)
        if order is None:
            raise NotFound(f"No order {order_no}")
        notes = await self.db.fetchall(
            f"SELECT {NOTIFICATION_COLUMNS} FROM payment_notifications WHERE order_no = %s "
            "ORDER BY id DESC LIMIT 200",
            order_no,
        )
        return order, await self.refunds.of_order(order_no), notes

    async def order_counts(self) -> list[Row]:
        """Orders by channel and status, with their money (the ops dashboard)."""
        return await self.db.fetchall(
            "SELECT channel, status, COUNT(*) AS n, COALESCE(SUM(amount_fen), 0) AS fen, "
            "COALESCE(SUM(refunded_fen), 0) AS refunded_fen FROM orders GROUP BY channel, status "
            "ORDER BY channel, status"
        )

    async def latest_notifications(self, limit: int) -> list[Row]:
        return await self.db.fetchall(
            f"SELECT {NOTIFICATION_COLUMNS} FROM payment_notifications ORDER BY id DESC LIMIT %s", limit
        )

    # ------------------------------------------------------------ the cron jobs

    async def check_refunds(self) -> int:
        """Query refunds still processing; apply what the provider answers."""
        return await self.refunds.check_processing()

    async def check_pending(self) -> int:
        """Ask about every pending order a minute old or older; close those past ORDER_TTL."""
        now = utcnow()
        rows = await self.db.fetchall(
            f"SELECT {orders.ORDER_COLUMNS} FROM orders WHERE status = 'pending' AND created_at <= %s "
            "ORDER BY created_at LIMIT %s",
            now - STALE_AFTER,
            STALE_BATCH,
        )
        done = 0
        for order in (Order.of(r) for r in rows):
            provider = self.provider_for(order.channel)
            try:
                after = order
                if provider is not None:
                    after = await self._apply_trade(order, await provider.query(order.order_no), "cron")
                if after.status == "pending" and order.expires_at <= now:
                    after = await self._close(order, "cron")
                done += after.status != "pending"
            except AppError as exc:
                logger.warning("pending order {}: {}", order.order_no, exc.message)
        return done


@contextlib.asynccontextmanager
async def open_payments(
    settings: Settings,
    db: Database,
    redis: Redis,
    credits: Credits,
    hub: EventHub,
    profiles: Profiles,
    metrics: Metrics,
) -> AsyncIterator[Payments]:
    """The facade with one provider per configured provider; their thread pools close on exit."""
    providers: list[Provider] = []
    if wechat.settings_complete(settings):
        providers.append(wechat.WeChatPayProvider(settings, metrics))
    if alipay.settings_complete(settings):
        providers.append(alipay.AlipayProvider(settings, metrics))
    payments = Payments(
        settings=settings,
        db=db,
        redis=redis,
        credits=credits,
        hub=hub,
        profiles=profiles,
        metrics=metrics,
        providers=providers,
    )
    try:
        yield payments
    finally:
        await payments.close()
