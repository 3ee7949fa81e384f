"""The settlement transaction's SQL shape (server/credits/ledger.py WithEffect, server/db.py
transactions): what folding statements into fewer round trips must not change — the
isolation level, and an effect that fails undoing its own writes and nothing else."""

from __future__ import annotations

import itertools
from typing import Any, Literal

import pymysql
import pytest

from server.credits.ledger import Grant, QuotaState, WithEffect, apply_batch, check_all
from server.db import Conn, Database, is_duplicate
from server.errors import Conflict
from server.keys import db_key
from server.payments.commissions import record_commission
from server.payments.orders import Order
from server.timing import utcnow
from tests.conftest import Services

_users = itertools.count(7000)
NOTE = (
    "INSERT INTO payment_notifications (provider, kind, outcome, verified, body) "
    "VALUES ('t', 'payment', 'error', 0, %s)"
)


def effect_writing(
    body: str, grant: Grant | None, *, fail: bool = False
) -> Any:  # an Effect: writes one row, then answers `grant` or fails
    async def effect(tx: Conn, _: QuotaState, __: object) -> Grant | Literal[False] | None:
        await tx.execute(NOTE, body)
        if fail:
            raise Conflict(f"{body} fails after writing")
        return grant

    return effect


def notes(services: Services, database: str, prefix: str) -> list[str]:
    rows = services.query(
        database, "SELECT body FROM payment_notifications WHERE body LIKE %s ORDER BY id", prefix + "%"
    )
    return [str(r["body"]) for r in rows]


async def run_batch(db: Database, user_id: int, ops: list[Any]) -> list[Any]:
    async with db.transaction("READ COMMITTED") as tx:
        return (await apply_batch(tx, user_id, ops)).outcomes


async def reads_twice_around_a_commit(db: Database, tx: Conn, mark: str) -> tuple[int, int]:
    """A plain read, a row committed by another connection, the same read again."""
    sql = "SELECT COUNT(*) FROM payment_notifications WHERE body = %s"
    first = int(await tx.fetchval(sql, mark))
    await db.execute(NOTE, mark)
    return first, int(await tx.fetchval(sql, mark))


async def test_a_settlement_transaction_runs_at_read_committed_and_the_next_one_does_not(
    client: Any,
) -> None:
    db: Database = client.app[db_key]
    user = next(_users)
    seen: list[tuple[int, int]] = []

    async def effect(tx: Conn, _: QuotaState, __: object) -> None:
        seen.append(await reads_twice_around_a_commit(db, tx, f"u{user}-in-settlement"))

    await run_batch(db, user, [WithEffect(effect)])
    async with db.transaction() as tx:  # the default level again: a repeatable read
        seen.append(await reads_twice_around_a_commit(db, tx, f"u{user}-after"))
    assert seen == [(0, 1), (0, 0)]


async def test_a_failing_effect_for_a_new_account_undoes_its_writes_and_keeps_the_rest_of_the_batch(
    client: Any, services: Services, database: str
) -> None:
    db: Database = client.app[db_key]
    user = next(_users)  # no quota_accounts row yet: the batch creates it
    outcomes = await run_batch(
        db,
        user,
        [
            WithEffect(effect_writing(f"u{user}-first", Grant(5, "grant", ref=f"u{user}-a"), fail=True)),
            Grant(7, "grant", ref=f"u{user}-b"),
            WithEffect(effect_writing(f"u{user}-second", Grant(11, "grant", ref=f"u{user}-c"))),
        ],
    )
    assert isinstance(outcomes[0], Conflict)
    assert outcomes[2].applied and outcomes[2].state == QuotaState(18, 0)
    assert notes(services, database, f"u{user}-") == [f"u{user}-second"]
    assert services.query(database, "SELECT balance FROM quota_accounts WHERE user_id = %s", user) == [
        {"balance": 18}
    ]
    _, differences = await check_all(db)
    assert differences == []


async def test_a_failing_second_effect_undoes_its_own_writes_only(
    client: Any, services: Services, database: str
) -> None:
    db: Database = client.app[db_key]
    user = next(_users)
    await run_batch(db, user, [Grant(1, "grant", ref=f"u{user}-open")])  # the account exists
    outcomes = await run_batch(
        db,
        user,
        [
            WithEffect(effect_writing(f"u{user}-first", Grant(5, "grant", ref=f"u{user}-a"))),
            WithEffect(effect_writing(f"u{user}-second", Grant(7, "grant", ref=f"u{user}-b"), fail=True)),
            WithEffect(effect_writing(f"u{user}-third", None)),
        ],
    )
    assert outcomes[0].applied and outcomes[0].state == QuotaState(6, 0)
    assert isinstance(outcomes[1], Conflict)
    assert outcomes[2].applied and outcomes[2].state == QuotaState(6, 0)
    assert notes(services, database, f"u{user}-") == [f"u{user}-first", f"u{user}-third"]
    _, differences = await check_all(db)
    assert differences == []


async def test_a_batch_writes_a_reason_with_quotes_percent_signs_and_backslashes_as_given(
    client: Any, services: Services, database: str
) -> None:
    db: Database = client.app[db_key]
    user = next(_users)
    reason = '100% o\'clock \\ "refund" %s; DROP TABLE x -- 退款'
    await run_batch(db, user, [Grant(3, "grant", ref=f"u{user}-r1", reason=reason), Grant(4, "grant")])
    rows = services.query(
        database, "SELECT reason, balance_after FROM quota_ledger WHERE user_id = %s ORDER BY id", user
    )
    assert rows == [{"reason": reason, "balance_after": 3}, {"reason": None, "balance_after": 7}]


async def test_statements_sent_in_one_round_trip_stop_at_the_first_that_fails(client: Any) -> None:
    db: Database = client.app[db_key]
    user = next(_users)
    row = (
        "INSERT INTO quota_ledger (user_id, kind, balance_delta, reserved_delta, balance_after, "
        "reserved_after, ref) VALUES (%s, 'grant', 1, 0, 1, 0, %s)"
    )
    async with db.transaction() as tx:
        first = tx.format(row, user, f"u{user}-same")
        with pytest.raises(pymysql.err.IntegrityError) as failed:
            await tx.execute_all([first, first, tx.format(row, user, f"u{user}-after")])
        assert is_duplicate(failed.value)
        refs = await tx.fetchall("SELECT ref FROM quota_ledger WHERE user_id = %s", user)
        await tx.raw.rollback()
    assert refs == [{"ref": f"u{user}-same"}]


async def test_a_statement_sent_along_the_commission_lookup_that_fails_raises(client: Any) -> None:
    db: Database = client.app[db_key]
    user = next(_users)
    row = (
        "INSERT INTO quota_ledger (user_id, kind, balance_delta, reserved_delta, balance_after, "
        "reserved_after, ref) VALUES (%s, 'grant', 1, 0, 1, 0, %s)"
    )
    order = Order(
        order_no=f"o{user}", user_id=user, product_id="credits-100", product_kind="credits", credits=100,
        membership_days=0, channel="wechat_native", amount_fen=990, status="paid", pay_params=None,
        request_hash="", provider_txn_id=None, refunded_fen=0, created_at=utcnow(), expires_at=utcnow(),
        paid_at=utcnow(),
    )  # fmt: skip
    async with db.transaction() as tx:
        twice = tx.format(row, user, f"u{user}-same")
        with pytest.raises(pymysql.err.IntegrityError):
            await record_commission(tx, order, along=[twice, twice])
        await tx.raw.rollback()


async def test_an_effects_grant_whose_ref_is_in_the_ledger_is_not_granted_again_with_or_without_the_hint(
    client: Any,
) -> None:
    db: Database = client.app[db_key]
    user = next(_users)
    await run_batch(db, user, [Grant(5, "grant", ref=f"u{user}-paid")])
    again = Grant(5, "grant", ref=f"u{user}-paid")
    hinted = WithEffect(effect_writing(f"u{user}-hinted", again), grant_refs=(("grant", f"u{user}-paid"),))
    unhinted = WithEffect(effect_writing(f"u{user}-unhinted", again))
    fresh = WithEffect(effect_writing(f"u{user}-fresh", Grant(2, "grant", ref=f"u{user}-new")))
    outcomes = await run_batch(db, user, [hinted, unhinted, fresh])
    assert [o.state for o in outcomes] == [QuotaState(5, 0), QuotaState(5, 0), QuotaState(7, 0)]
    _, differences = await check_all(db)
    assert differences == []
