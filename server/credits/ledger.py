"""Credits: the SQL of reserve → confirm | cancel, grants, and the invariant check.

`apply_batch` applies a list of operations for ONE user inside the caller's
transaction: one round trip that locks the account row and the batch's reservations
and looks up its grant refs, the operations in order against in-memory state (a
WithEffect's SQL runs there, under a savepoint), then every write in one more round
trip (multi-statement: `Conn.fetch_sets`, `Conn.execute_all`). Each operation gets its own
outcome (a result or an `AppError`); one failing never fails the others. The
UserActor calls it with everything waiting in its mailbox (group commit); the
naive per-request path (bench/quota.py) calls it with one operation.

`plan_single` is the UserActor's path for a batch of ONE Reserve, Confirm or Cancel
(what most batches are when many users each send one operation at a time): no read
at all. The actor remembers the account row its last commit left (`AccountRow`) and
the reservations it holds; the plan writes the new row only WHERE it still has that
version, balance and reserved (the compare-and-set takes the row lock), then the
reservation (INSERT: unique task id; or UPDATE … WHERE phase = 'reserved') and the
ledger row: three writes and a commit, where `apply_batch` also reads the account
and the reservation first. Any mismatch raises `StaleAccount` (the caller rolls
back and runs `apply_batch`), so a stale memory costs a retry, never a wrong write.

Safety does not depend on the actor being unique (DESIGN.md): the row lock orders
every process's batches for a user, `quota_transactions.task_id` is unique, and a
phase only moves reserved → confirmed or reserved → cancelled.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from actors.runtime import Message
from server.db import Conn, Database, Row
from server.errors import AppError, Conflict, ErrorCode, NotFound, validation_failed
from server.hub.events import Event
from server.timing import utcnow

Phase = Literal["reserved", "confirmed", "cancelled"]
GrantKind = Literal["grant", "refund", "adjust"]


@dataclass(frozen=True, slots=True)
class QuotaState:
    balance: int
    reserved: int

    @property
    def available(self) -> int:
        return self.balance - self.reserved


@dataclass(frozen=True, slots=True)
class Reservation:
    task_id: str
    user_id: int
    amount: int
    phase: Phase
    expires_at: dt.datetime
    reason: str | None = None
    #: True on the answer to the operation that made this change (not on replays).
    changed: bool = field(default=False, compare=False)


# ---------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Reserve(Message[Reservation]):
    task_id: str
    amount: int
    ttl: float


@dataclass(frozen=True, slots=True)
class Confirm(Message[Reservation]):
    task_id: str


@dataclass(frozen=True, slots=True)
class Cancel(Message[Reservation]):
    """Return the credits. `expired_before` (the sweeper's) cancels only a
    reservation that expired before that time; otherwise it is left as it is."""

    task_id: str
    reason: str
    expired_before: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class Grant(Message[QuotaState]):
    """Add (or, for refund/adjust, remove) credits. A `ref` is applied once."""

    amount: int
    kind: GrantKind
    ref: str | None = None
    reason: str | None = None
    order_no: str | None = None


@dataclass(frozen=True, slots=True)
class EffectOutcome:
    applied: bool
    state: QuotaState


#: A SELECT a WithEffect needs: (sql, args), formatted with the transaction's connection.
Read = tuple[str, tuple[Any, ...]]

#: Another capability's SQL, run inside a user's credit batch (the account row locked
#: first). Given the user's state at that point and the rows of its WithEffect's `reads`
#: (one list per statement), it answers the grant to make with it: a Grant, None
#: (applied, nothing to grant), or False ("already applied": nothing written).
Effect = Callable[[Conn, QuotaState, Sequence[Sequence[Row]]], Awaitable[Grant | Literal[False] | None]]


@dataclass(frozen=True, slots=True)
class WithEffect(Message[EffectOutcome]):
    """Run `effect` in the batch transaction (under a savepoint), then the grant it answers.
    The caller's change (an order becoming paid, a refund succeeding) and the credits commit
    together or not at all; an AppError from the effect undoes the effect alone."""

    effect: Effect
    #: (kind, ref) of the grants the effect may answer: looked up with the account lock,
    #: in its round trip, instead of after the effect.
    grant_refs: tuple[tuple[str, str], ...] = ()
    #: SELECTs (sql, args) the effect needs, sent in the account lock's round trip too
    #: (after the lock: they see what committed before it); their rows are its third argument.
    reads: tuple[Read, ...] = ()
    #: Called after the batch committed, when the effect applied: the events to publish
    #: with the batch's `quota.changed`, in one script run (consecutive seqs).
    announce: Callable[[], Sequence[Event]] | None = None


@dataclass(frozen=True, slots=True)
class Snapshot(Message[QuotaState]):
    pass


QuotaOp = Reserve | Confirm | Cancel | Grant | WithEffect | Snapshot


@dataclass(slots=True)
class BatchResult:
    outcomes: list[Any]  # a result or an AppError, one per operation
    state: QuotaState
    changed: bool
    version: int  # quota_accounts.version after the batch


@dataclass(frozen=True, slots=True)
class AccountRow:
    """A user's quota_accounts row as a committed batch left it."""

    balance: int
    reserved: int
    version: int


class StaleAccount(Exception):
    """The account row or the reservation changed since the caller last saw it."""


# ---------------------------------------------------------------- the batch


def _reservation(row: dict[str, Any]) -> Reservation:
    return Reservation(
        task_id=str(row["task_id"]),
        user_id=int(row["user_id"]),
        amount=int(row["amount"]),
        phase=row["phase"],
        expires_at=row["expires_at"],
        reason=row["reason"],
    )


_SAVEPOINT = "SAVEPOINT grant_effect"
_LOCK = "SELECT balance, reserved, version FROM quota_accounts WHERE user_id = %s FOR UPDATE"


@dataclass(frozen=True, slots=True)
class _Locked:
    account: AccountRow
    known: dict[str, Reservation]  # the batch's reservations, locked
    applied_refs: set[tuple[str, str]]  # of the refs looked up, those in the ledger
    read: list[list[Row]]  # the rows of the effects' reads, in the batch's order


async def _lock(
    tx: Conn,
    user_id: int,
    *,
    savepoint: bool,
    task_ids: Sequence[str],
    refs: Sequence[tuple[str, str]],
    reads: Sequence[Read] = (),
) -> _Locked:
    """In ONE round trip: lock and read the account row; set the first WithEffect's
    savepoint right after it (nothing is written between the two); lock the batch's
    reservations; look up which grant refs the ledger holds; run the effects' reads."""
    statements = [tx.format(_LOCK, user_id)]
    if savepoint:
        statements.append(_SAVEPOINT)
    if task_ids:
        statements.append(
            tx.format(
                "SELECT task_id, user_id, amount, phase, expires_at, reason FROM quota_transactions "
                f"WHERE task_id IN ({','.join(['%s'] * len(task_ids))}) FOR UPDATE",
                *task_ids,
            )
        )
    if refs:
        where = " OR ".join(["(kind = %s AND ref = %s)"] * len(refs))
        statements.append(
            tx.format(f"SELECT kind, ref FROM quota_ledger WHERE {where}", *[v for kr in refs for v in kr])
        )
    statements.extend(tx.format(sql, *args) for sql, args in reads)
    sets = await tx.fetch_sets(statements)
    if not sets[0]:
        await tx.execute(
            "INSERT INTO quota_accounts (user_id) VALUES (%s) ON DUPLICATE KEY UPDATE user_id = user_id",
            user_id,
        )
        # Again after the INSERT: rolling back to the savepoint must keep the new account row.
        sets = await tx.fetch_sets(statements)
    row = sets[0][0]
    rest = sets[2:] if savepoint else sets[1:]
    known = {str(r["task_id"]): _reservation(r) for r in rest.pop(0)} if task_ids else {}
    applied = {(str(r["kind"]), str(r["ref"])) for r in rest.pop(0)} if refs else set()
    account = AccountRow(int(row["balance"]), int(row["reserved"]), int(row["version"]))
    return _Locked(account, known, applied, rest)


class _Batch:
    """In-memory application of one batch; collects the rows to write."""

    def __init__(self, user_id: int, state: AccountRow, known: dict[str, Reservation], now: dt.datetime):
        self.user_id = user_id
        self.balance = state.balance
        self.reserved = state.reserved
        self.known = known
        self.now = now
        self.inserts: dict[str, Reservation] = {}
        self.settles: dict[str, Reservation] = {}
        self.ledger: list[tuple[Any, ...]] = []
        self.seen_refs: set[tuple[str, str]] = set()

    def _log(self, kind: str, bal: int, res: int, *, task_id: str | None = None, **kw: Any) -> None:
        self.balance += bal
        self.reserved += res
        self.ledger.append(
            (
                self.user_id,
                kind,
                bal,
                res,
                self.balance,
                self.reserved,
                task_id,
                kw.get("order_no"),
                kw.get("ref"),
                kw.get("reason"),
                self.now,
            )
        )

    def _store(self, r: Reservation) -> Reservation:
        self.known[r.task_id] = r
        if r.task_id in self.inserts:
            self.inserts[r.task_id] = r
        else:
            self.settles[r.task_id] = r
        return r

    def reserve(self, op: Reserve) -> Reservation:
        if op.amount <= 0 or not op.task_id or len(op.task_id) > 64 or op.ttl <= 0:
            raise validation_failed(
                [{"field": "amount", "message": "a reservation needs a task id and amount > 0"}]
            )
        existing = self.known.get(op.task_id)
        if existing is not None:
            if existing.user_id != self.user_id or existing.amount != op.amount:
                raise Conflict(f"task {op.task_id} already holds another reservation")
            return replace(existing, changed=False)
        if self.balance - self.reserved < op.amount:
            raise AppError(
                ErrorCode.QUOTA_INSUFFICIENT,
                f"{op.amount} credits needed, {self.balance - self.reserved} available",
                details={"required": op.amount, "available": self.balance - self.reserved},
            )
        r = Reservation(
            op.task_id, self.user_id, op.amount, "reserved", self.now + dt.timedelta(seconds=op.ttl)
        )
        self.known[r.task_id] = r
        self.inserts[r.task_id] = r
        self._log("reserve", 0, op.amount, task_id=op.task_id)
        return r

    def _settle(self, task_id: str, to: Phase, reason: str | None) -> Reservation:
        r = self.known.get(task_id)
        if r is None or r.user_id != self.user_id:
            raise NotFound(f"no reservation for task {task_id}")
        if r.phase == to:
            return replace(r, changed=False)  # settled already: the recorded outcome, no change
        if r.phase != "reserved":
            raise Conflict(
                f"task {task_id} is already {r.phase}; it cannot become {to}", details={"phase": r.phase}
            )
        if to == "confirmed":
            self._log("confirm", -r.amount, -r.amount, task_id=task_id)
        else:
            self._log("cancel", 0, -r.amount, task_id=task_id, reason=reason)
        return self._store(replace(r, phase=to, reason=reason, changed=True))

    def confirm(self, op: Confirm) -> Reservation:
        return self._settle(op.task_id, "confirmed", None)

    def cancel(self, op: Cancel) -> Reservation:
        r = self.known.get(op.task_id)
        due = op.expired_before
        if due is not None and r is not None and r.phase == "reserved" and r.expires_at >= due:
            return replace(r, changed=False)  # renewed or not yet due: the sweeper leaves it
        return self._settle(op.task_id, "cancelled", op.reason[:200])

    def grant(self, op: Grant, applied_refs: set[tuple[str, str]]) -> QuotaState:
        if op.amount == 0:
            raise validation_failed([{"field": "amount", "message": "must not be zero"}])
        if op.kind == "grant" and op.amount < 0:
            raise validation_failed([{"field": "amount", "message": "a grant adds credits"}])
        if op.ref is not None:
            key = (op.kind, op.ref)
            if key in applied_refs or key in self.seen_refs:
                return QuotaState(self.balance, self.reserved)  # applied once already
            self.seen_refs.add(key)
        if self.balance + op.amount - self.reserved < 0:
            raise AppError(
                ErrorCode.QUOTA_INSUFFICIENT,
                f"removing {-op.amount} credits would leave less than zero available",
                details={"available": self.balance - self.reserved},
            )
        self._log(op.kind, op.amount, 0, ref=op.ref, reason=op.reason, order_no=op.order_no)
        return QuotaState(self.balance, self.reserved)


async def apply_batch(
    tx: Conn, user_id: int, ops: Sequence[QuotaOp], now: dt.datetime | None = None
) -> BatchResult:
    now = now or utcnow()
    # The first effect's savepoint comes with the account lock (one round trip less).
    savepoint_set = any(isinstance(op, WithEffect) for op in ops)
    task_ids = sorted({op.task_id for op in ops if isinstance(op, Reserve | Confirm | Cancel)})
    refs = {(op.kind, op.ref) for op in ops if isinstance(op, Grant) and op.ref is not None}
    checked = refs | {kr for op in ops if isinstance(op, WithEffect) for kr in op.grant_refs}
    reads = [r for op in ops if isinstance(op, WithEffect) for r in op.reads]
    locked = await _lock(
        tx, user_id, savepoint=savepoint_set, task_ids=task_ids, refs=sorted(checked), reads=reads
    )
    before, known, applied_refs, read = locked.account, locked.known, locked.applied_refs, locked.read

    batch = _Batch(user_id, before, known, now)
    outcomes: list[Any] = []
    for op in ops:
        try:
            if isinstance(op, Reserve):
                outcomes.append(batch.reserve(op))
            elif isinstance(op, Confirm):
                outcomes.append(batch.confirm(op))
            elif isinstance(op, Cancel):
                outcomes.append(batch.cancel(op))
            elif isinstance(op, Grant):
                outcomes.append(batch.grant(op, applied_refs))
            elif isinstance(op, WithEffect):
                fresh, savepoint_set = savepoint_set, False
                mine, read = read[: len(op.reads)], read[len(op.reads) :]
                outcomes.append(
                    await _with_effect(tx, batch, op, applied_refs, checked, mine, savepoint_set=fresh)
                )
            else:
                outcomes.append(QuotaState(batch.balance, batch.reserved))
        except AppError as exc:
            outcomes.append(exc)

    # Every write of the batch in one round trip (see Conn.execute_all).
    writes: list[str] = []
    if batch.inserts:
        writes.append(
            "INSERT INTO quota_transactions (task_id, user_id, amount, phase, reason, expires_at, "
            "created_at, settled_at) VALUES "
            + ", ".join(
                tx.format(
                    "(%s, %s, %s, %s, %s, %s, %s, %s)",
                    r.task_id, r.user_id, r.amount, r.phase, r.reason, r.expires_at, now,
                    None if r.phase == "reserved" else now,
                )
                for r in batch.inserts.values()
            )
        )  # fmt: skip
    writes.extend(
        tx.format(
            "UPDATE quota_transactions SET phase = %s, reason = %s, settled_at = %s "
            "WHERE task_id = %s AND phase = 'reserved'",
            r.phase, r.reason, now, r.task_id,
        )
        for r in batch.settles.values()
    )  # fmt: skip
    if batch.ledger:
        writes.append(
            "INSERT INTO quota_ledger (user_id, kind, balance_delta, reserved_delta, balance_after, "
            "reserved_after, task_id, order_no, ref, reason, created_at) VALUES "
            + ", ".join(
                tx.format("(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", *row) for row in batch.ledger
            )
        )
        writes.append(
            tx.format(
                "UPDATE quota_accounts SET balance = %s, reserved = %s, version = version + 1 "
                "WHERE user_id = %s",
                batch.balance,
                batch.reserved,
                user_id,
            )
        )
    if writes:
        await tx.execute_all(writes)
    changed = bool(batch.ledger)
    return BatchResult(outcomes, QuotaState(batch.balance, batch.reserved), changed, before.version + changed)


_INSERT_LEDGER = (
    "INSERT INTO quota_ledger (user_id, kind, balance_delta, reserved_delta, balance_after, "
    "reserved_after, task_id, order_no, ref, reason, created_at) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, NULL, NULL, %s, %s)"
)


@dataclass(frozen=True, slots=True)
class SinglePlan:
    """One Reserve, Confirm or Cancel, decided from the remembered row (see the module doc)."""

    user_id: int
    before: AccountRow
    kind: Literal["reserve", "confirm", "cancel"]
    balance_delta: int
    reserved_delta: int
    reservation: Reservation  # the answer: the reservation after the operation
    now: dt.datetime

    async def apply(self, tx: Conn) -> BatchResult:
        """Write it inside `tx`; `StaleAccount` (or a duplicate task id) means: roll back."""
        b, r = self.before, self.reservation
        balance, reserved = b.balance + self.balance_delta, b.reserved + self.reserved_delta
        if not await tx.execute(
            "UPDATE quota_accounts SET balance = %s, reserved = %s, version = version + 1 "
            "WHERE user_id = %s AND version = %s AND balance = %s AND reserved = %s",
            balance, reserved, self.user_id, b.version, b.balance, b.reserved,
        ):  # fmt: skip
            raise StaleAccount(f"the account of user {self.user_id} changed")
        if self.kind == "reserve":
            await tx.execute(
                "INSERT INTO quota_transactions (task_id, user_id, amount, phase, reason, expires_at, "
                "created_at, settled_at) VALUES (%s, %s, %s, 'reserved', NULL, %s, %s, NULL)",
                r.task_id, self.user_id, r.amount, r.expires_at, self.now,
            )  # fmt: skip
        elif not await tx.execute(
            "UPDATE quota_transactions SET phase = %s, reason = %s, settled_at = %s "
            "WHERE task_id = %s AND user_id = %s AND amount = %s AND phase = 'reserved'",
            r.phase, r.reason, self.now, r.task_id, self.user_id, r.amount,
        ):  # fmt: skip
            raise StaleAccount(f"task {r.task_id} is no longer reserved")
        await tx.execute(
            _INSERT_LEDGER,
            self.user_id, self.kind, self.balance_delta, self.reserved_delta, balance, reserved,
            r.task_id, r.reason, self.now,
        )  # fmt: skip
        return BatchResult([r], QuotaState(balance, reserved), True, b.version + 1)


def plan_single(
    user_id: int, op: QuotaOp, row: AccountRow, held: Reservation | None, now: dt.datetime | None = None
) -> SinglePlan | None:
    """The write-only plan for `op`, or None when only `apply_batch` can answer it: a
    replay, a refusal (its message needs the current row), an unknown reservation, a
    sweeper's conditional cancel, a grant or a snapshot. `held` is the reservation of
    `op.task_id` as the caller last committed it, if any."""
    now = now or utcnow()
    if isinstance(op, Reserve):
        valid = op.amount > 0 and 0 < len(op.task_id) <= 64 and op.ttl > 0
        if held is not None or not valid or row.balance - row.reserved < op.amount:
            return None
        expires = now + dt.timedelta(seconds=op.ttl)
        r = Reservation(op.task_id, user_id, op.amount, "reserved", expires)  # as apply_batch answers
        return SinglePlan(user_id, row, "reserve", 0, op.amount, r, now)
    if not isinstance(op, Confirm | Cancel) or held is None or held.phase != "reserved":
        return None
    if held.user_id != user_id or held.task_id != op.task_id:
        return None
    if isinstance(op, Confirm):
        done = replace(held, phase="confirmed", reason=None, changed=True)
        return SinglePlan(user_id, row, "confirm", -held.amount, -held.amount, done, now)
    if op.expired_before is not None:
        return None
    done = replace(held, phase="cancelled", reason=op.reason[:200], changed=True)
    return SinglePlan(user_id, row, "cancel", 0, -held.amount, done, now)


async def _with_effect(
    tx: Conn,
    batch: _Batch,
    op: WithEffect,
    applied_refs: set[tuple[str, str]],
    checked: set[tuple[str, str]],
    read: Sequence[Sequence[Row]],
    *,
    savepoint_set: bool,
) -> EffectOutcome:
    # Until here the batch has written nothing but earlier effects (the rest is written
    # at the end), so the savepoint marks exactly what this effect may undo. A SAVEPOINT
    # of the same name replaces the previous one, and COMMIT drops it: no RELEASE needed.
    if not savepoint_set:
        await tx.execute(_SAVEPOINT)
    try:
        grant = await op.effect(tx, QuotaState(batch.balance, batch.reserved), read)
        if grant is not False and grant is not None:
            key = (grant.kind, grant.ref or "")
            if (
                grant.ref is not None
                and key not in checked
                and await tx.fetchval(
                    "SELECT 1 FROM quota_ledger WHERE kind = %s AND ref = %s", grant.kind, grant.ref
                )
            ):
                applied_refs = applied_refs | {(grant.kind, grant.ref)}
            batch.grant(grant, applied_refs)
    except AppError:
        await tx.execute("ROLLBACK TO SAVEPOINT grant_effect")
        raise
    return EffectOutcome(grant is not False, QuotaState(batch.balance, batch.reserved))


# ---------------------------------------------------------------- reads


@dataclass(frozen=True, slots=True)
class Discrepancy:
    user_id: int
    what: str
    recorded: int
    expected: int


async def check_all(db: Database) -> tuple[int, list[Discrepancy]]:
    """Every user's credits against its ledger and its open reservations: (users checked, differences).

    A user without a `quota_accounts` row (never granted, never reserved) holds 0 and must
    have no ledger rows; an account whose user row is gone is checked and counted too."""
    accounts = await db.fetchall("SELECT user_id, balance, reserved FROM quota_accounts ORDER BY user_id")
    counted = await db.fetchone(
        "SELECT (SELECT COUNT(*) FROM users) + (SELECT COUNT(*) FROM quota_accounts a "
        "WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.id = a.user_id)) AS n"
    )
    ledger = {
        int(r["user_id"]): r
        for r in await db.fetchall(
            "SELECT user_id, SUM(balance_delta) AS b, SUM(reserved_delta) AS r "
            "FROM quota_ledger GROUP BY user_id"
        )
    }
    open_ = {
        int(r["user_id"]): int(r["s"])
        for r in await db.fetchall(
            "SELECT user_id, SUM(amount) AS s FROM quota_transactions "
            "WHERE phase = 'reserved' GROUP BY user_id"
        )
    }
    out: list[Discrepancy] = []
    for a in accounts:
        uid, bal, res = int(a["user_id"]), int(a["balance"]), int(a["reserved"])
        led = ledger.get(uid)
        lb, lr = (int(led["b"] or 0), int(led["r"] or 0)) if led else (0, 0)
        if bal != lb:
            out.append(Discrepancy(uid, "balance vs ledger", bal, lb))
        if res != lr:
            out.append(Discrepancy(uid, "reserved vs ledger", res, lr))
        if res != open_.get(uid, 0):
            out.append(Discrepancy(uid, "reserved vs open reservations", res, open_.get(uid, 0)))
        if bal < res or res < 0:
            out.append(Discrepancy(uid, "available below zero", bal - res, 0))
    with_account = {int(a["user_id"]) for a in accounts}
    for uid in set(ledger) - with_account:
        out.append(Discrepancy(uid, "ledger rows without an account", 0, int(ledger[uid]["b"] or 0)))
    for uid in set(open_) - with_account:
        out.append(Discrepancy(uid, "open reservations without an account", 0, open_[uid]))
    return int(counted["n"]) if counted else len(accounts), out
