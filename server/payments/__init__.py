"""Products, orders and payments (issue 12); docs/payments.md tells the design.

`payments_ctx` builds the `Payments` facade once MySQL, Redis, the event hub, auth and
the actor system are up, with one provider adapter per configured provider, and
stores it under `payments_key`. `close_stale_orders` is its cron job.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from server.keys import (
    actor_system_key,
    auth_key,
    db_key,
    hub_key,
    metrics_key,
    payments_key,
    redis_key,
    settings_key,
)
from server.payments import alipay, wechat
from server.payments.providers import Provider
from server.payments.service import Payments

__all__ = ["Payments", "close_stale_orders", "payments_ctx"]


async def payments_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx, after the actors: the facade and its providers' thread pools."""
    settings = app[settings_key]
    providers: list[Provider] = []
    if wechat.settings_complete(settings):
        providers.append(wechat.WeChatPayProvider(settings, app[metrics_key]))
    if alipay.settings_complete(settings):
        providers.append(alipay.AlipayProvider(settings, app[metrics_key]))
    payments = Payments(
        settings=settings,
        db=app[db_key],
        redis=app[redis_key],
        actors=app[actor_system_key],
        hub=app[hub_key],
        profiles=app[auth_key].profiles,
        metrics=app[metrics_key],
        providers=providers,
    )
    app[payments_key] = payments
    try:
        yield
    finally:
        await payments.close()


async def close_stale_orders(app: web.Application) -> int:
    """Cron, every minute: lost notifications (query), expired orders (close), and
    refunds still processing (query)."""
    payments = app[payments_key]
    return await payments.check_pending() + await payments.check_refunds()
