"""The `Distributors` facade: applications, decisions, identity reads (permission-gated
and audited), crypto-shredding, commissions seen by their distributor, key rotation.

The identity (real name, ID number) is sealed per row (server/pii/envelope.py) under
its own data key; the row also holds the blind index of the number (duplicates are
found by it, without decrypting) and the masked forms, computed when it is written.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from loguru import logger

from server.auth.accounts import mask_phone
from server.config import DistributorSettings
from server.db import Database, Row, is_duplicate
from server.distributors.states import MACHINE
from server.errors import AppError, ErrorCode, NotFound, validation_failed
from server.paging import decode_cursor, page_of
from server.payments.commissions import settle_due
from server.pii import audit
from server.pii.audit import Access, as_json
from server.pii.envelope import DecryptError, seal, unseal
from server.pii.identity import IdentityInvalid, blind_index, check_id, check_name, mask_id, mask_name
from server.pii.kms import Kms, KmsError

# Access (who asks, why) and as_json (an audit row's wire shape) are part of the contract.
__all__ = ["COLUMNS", "PII_READ", "TABLE", "Access", "Caller", "Distributors", "RotationReport", "as_json"]

TABLE = "distributors"
PII_READ = "pii:read"
COLUMNS = (
    "user_id, status, real_name_masked, id_card_masked, commission_rate, decided_at, decision_reason, "
    "identity_deleted_at, created_at"
)


@dataclass(frozen=True, slots=True)
class Caller:
    """The admin or user asking, as the token says (role and permissions)."""

    user_id: int
    is_admin: bool
    perms: frozenset[str]


@dataclass(frozen=True, slots=True)
class RotationReport:
    rewrapped: int
    already: int
    failed: int


# Binary values are written as hex through UNHEX(): the PyMySQL this aiomysql runs on
# cannot escape a bytes parameter.


class Distributors:
    def __init__(self, db: Database, kms: Kms, blind_key: bytes, terms: DistributorSettings) -> None:
        self.db = db
        self.kms = kms
        self.blind_key = blind_key
        self.terms = terms

    # ------------------------------------------------------------ applying

    async def apply(self, user_id: int, real_name: str, id_card_no: str) -> Row:
        """A pending application; 422 for a bad number or name, 409 for a number another
        distributor uses (found by the blind index) or a second application."""
        try:
            name = check_name(real_name)
        except IdentityInvalid as exc:
            raise validation_failed([{"field": "real_name", "message": str(exc)}]) from None
        try:
            number = check_id(id_card_no)
        except IdentityInvalid as exc:
            raise validation_failed([{"field": "id_card_no", "message": str(exc)}]) from None
        bidx = blind_index(self.blind_key, number)
        await self._refuse_duplicate(user_id, bidx)
        sealed = await seal(self.kms, TABLE, user_id, {"real_name": name, "id_card": number})
        try:
            await self.db.execute(
                "INSERT INTO distributors (user_id, status, real_name_ct, id_card_ct, data_key, kek_version, "
                "id_card_bidx, real_name_masked, id_card_masked) "
                "VALUES (%s, 'pending', UNHEX(%s), UNHEX(%s), UNHEX(%s), %s, UNHEX(%s), %s, %s)",
                user_id, sealed.columns["real_name"].hex(), sealed.columns["id_card"].hex(),
                sealed.wrapped_key.hex(), sealed.kek_version, bidx.hex(), mask_name(name), mask_id(number),
            )  # fmt: skip
        except Exception as exc:
            if is_duplicate(exc):  # a racing application won
                await self._refuse_duplicate(user_id, bidx)
                raise AppError(ErrorCode.CONFLICT, "This application conflicts with another") from None
            raise
        logger.info("user {} applied to be a distributor", user_id)
        return await self.get(user_id)

    async def _refuse_duplicate(self, user_id: int, bidx: bytes) -> None:
        rows = await self.db.fetchall(
            "SELECT user_id FROM distributors WHERE user_id = %s OR id_card_bidx = UNHEX(%s)",
            user_id,
            bidx.hex(),
        )
        for r in rows:
            if int(r["user_id"]) == user_id:
                raise AppError(ErrorCode.CONFLICT, "You have applied already")
            raise AppError(ErrorCode.CONFLICT, "This ID number is already used by another distributor")

    # ------------------------------------------------------------ reading

    async def get(self, user_id: int) -> Row:
        row = await self.db.fetchone(f"SELECT {COLUMNS} FROM distributors WHERE user_id = %s", user_id)
        if row is None:
            raise NotFound("No distributor application for this user")
        return self._public(row)

    def _public(self, row: Row) -> Row:
        rate = row["commission_rate"]
        return {
            **row,
            "commission_rate": str(Decimal(rate) if rate is not None else self.terms.commission_rate),
        }

    async def me(self, user_id: int) -> Row:
        """The distributor with its earnings and number of referrals."""
        out = await self.get(user_id)
        sums = await self.db.fetchall(
            "SELECT status, COALESCE(SUM(amount_fen), 0) AS fen FROM commissions "
            "WHERE distributor_id = %s GROUP BY status",
            user_id,
        )
        by = {r["status"]: int(r["fen"]) for r in sums}
        out["earnings"] = {
            "pending_fen": by.get("pending", 0),
            "settled_fen": by.get("settled", 0),
            "reversed_fen": by.get("reversed", 0),
        }
        out["referrals"] = int(
            await self.db.fetchval("SELECT COUNT(*) FROM users WHERE referrer_id = %s", user_id) or 0
        )
        return out

    async def commissions(self, user_id: int, cursor: str | None, limit: int) -> tuple[list[Row], str | None]:
        after = decode_cursor(cursor, int)
        rows = await self.db.fetchall(
            "SELECT c.id, c.order_no, c.kind, c.amount_fen, c.status, c.settles_at, u.phone AS buyer_phone "
            "FROM commissions c JOIN users u ON u.id = c.buyer_id "
            "WHERE c.distributor_id = %s AND c.id < %s ORDER BY c.id DESC LIMIT %s",
            user_id, after[0] if after else 2**63, limit + 1,
        )  # fmt: skip
        items, next_cursor = page_of(rows, limit, lambda r: (int(r["id"]),))
        for r in items:
            r["buyer"] = mask_phone(r.pop("buyer_phone"))
        return items, next_cursor

    async def search(
        self, status: str | None, cursor: str | None, limit: int
    ) -> tuple[list[Row], str | None]:
        after = decode_cursor(cursor, int)
        where, args = ["user_id < %s"], [after[0] if after else 2**63]
        if status is not None:
            where.append("status = %s")
            args.append(status)
        rows = await self.db.fetchall(
            f"SELECT {COLUMNS} FROM distributors WHERE {' AND '.join(where)} ORDER BY user_id DESC LIMIT %s",
            *args,
            limit + 1,
        )
        items, next_cursor = page_of(rows, limit, lambda r: (int(r["user_id"]),))
        return [self._public(r) for r in items], next_cursor

    # ------------------------------------------------------------ deciding

    async def decide(self, admin_id: int, user_id: int, to: str, reason: str | None) -> Row:
        """Approve or reject a pending application. The same decision again (a double
        click, or two admins at once) is a replay: the row as the first one left it.
        The other decision raises IllegalTransition (409)."""
        moved = await MACHINE.apply(
            self.db,
            (user_id,),
            to,
            {"decided_by": admin_id, "decided_at": _utcnow(), "decision_reason": reason},
        )
        if moved:
            logger.info("distributor {} {} by admin {}", user_id, to, admin_id)
        return await self.get(user_id)

    async def set_rate(self, user_id: int, rate: Decimal | None) -> Row:
        changed = await self.db.execute(
            "UPDATE distributors SET commission_rate = %s WHERE user_id = %s", rate, user_id
        )
        if not changed:
            await self.get(user_id)  # NotFound, or the same rate again
        return await self.get(user_id)

    # ------------------------------------------------------------ personal data

    async def _gate(self, caller: Caller, access: Access, action: str, subject: int) -> None:
        """Refuse (and audit the refusal) unless an admin with pii:read gave a reason."""
        problem: AppError | None = None
        if not caller.is_admin:
            problem = AppError(ErrorCode.FORBIDDEN, "This needs the admin role")
        elif PII_READ not in caller.perms:
            problem = AppError(ErrorCode.FORBIDDEN, f"This needs the {PII_READ} permission")
        elif not (access.reason or "").strip():
            problem = validation_failed(
                [{"field": "X-Access-Reason", "message": "say why you need this person's data"}]
            )
        await audit.record(self.db, access, action, subject, problem is None)
        if problem is not None:
            raise problem

    async def identity(self, caller: Caller, access: Access, user_id: int) -> dict[str, str]:
        """The real name and ID number in clear, for an admin with pii:read and a reason.
        Every call, allowed or refused, leaves an audit row first."""
        await self._gate(caller, access, "identity.read", user_id)
        row = await self.db.fetchone(
            "SELECT real_name_ct, id_card_ct, data_key, kek_version FROM distributors WHERE user_id = %s",
            user_id,
        )
        if row is None:
            raise NotFound("No distributor application for this user")
        try:
            plain = await unseal(
                self.kms,
                TABLE,
                user_id,
                {"real_name": row["real_name_ct"], "id_card": row["id_card_ct"]},
                row["data_key"],
                row["kek_version"],
            )
        except DecryptError as exc:
            raise AppError(ErrorCode.CONFLICT, f"The identity cannot be read: {exc}") from None
        except KmsError as exc:
            raise AppError(ErrorCode.UNAVAILABLE, f"The KMS cannot unwrap this record's key: {exc}") from None
        return {"real_name": plain["real_name"], "id_card_no": plain["id_card"]}

    async def delete_identity(self, caller: Caller, access: Access, user_id: int) -> Row:
        """Crypto-shredding: the data key and the blind index go; the row and its masked
        forms stay, and nothing can decrypt the ciphertext any more. Audited."""
        await self._gate(caller, access, "identity.delete", user_id)
        changed = await self.db.execute(
            "UPDATE distributors SET data_key = NULL, kek_version = NULL, id_card_bidx = NULL, "
            "identity_deleted_at = COALESCE(identity_deleted_at, %s) WHERE user_id = %s",
            _utcnow(), user_id,
        )  # fmt: skip
        if not changed:
            await self.get(user_id)
        logger.info("identity of distributor {} deleted by admin {}", user_id, caller.user_id)
        return await self.get(user_id)

    async def audit_log(
        self, subject: int | None, actor: int | None, cursor: str | None, limit: int
    ) -> tuple[list[Row], str | None]:
        return await audit.page(self.db, subject, actor, cursor, limit)

    # ------------------------------------------------------------ keys

    async def rotate(
        self, batch: int = 500, progress: Callable[[int, int], None] | None = None
    ) -> RotationReport:
        """Re-wrap every data key not under the newest KEK version (no plaintext rewritten).
        Resumable and idempotent: each row is re-wrapped by a compare-and-set on its old
        wrapped key, so a second run (or a racing one) skips what is done; reads go on."""
        newest = await self.kms.current_version()
        total = int(
            await self.db.fetchval(
                "SELECT COUNT(*) FROM distributors WHERE data_key IS NOT NULL AND kek_version <> %s", newest
            )
            or 0
        )
        done = already = failed = 0
        after = -1
        while True:
            rows = await self.db.fetchall(
                "SELECT user_id, data_key, kek_version FROM distributors WHERE data_key IS NOT NULL "
                "AND kek_version <> %s AND user_id > %s ORDER BY user_id LIMIT %s",
                newest, after, batch,
            )  # fmt: skip
            if not rows:
                break
            for r in rows:
                try:
                    wrapped, version = await self.kms.rewrap(r["data_key"], r["kek_version"])
                except KmsError as exc:
                    failed += 1
                    logger.warning("distributor {}: its data key does not re-wrap: {}", r["user_id"], exc)
                    continue
                moved = await self.db.execute(
                    "UPDATE distributors SET data_key = UNHEX(%s), kek_version = %s "
                    "WHERE user_id = %s AND data_key = UNHEX(%s) AND kek_version = %s",
                    wrapped.hex(), version, r["user_id"], bytes(r["data_key"]).hex(), r["kek_version"],
                )  # fmt: skip
                if moved:
                    done += 1
                else:
                    already += 1
            after = int(rows[-1]["user_id"])
            if progress is not None:
                progress(done + already + failed, total)
        return RotationReport(done, already, failed)

    async def check(self, sample: int = 100) -> dict[str, Any]:
        """Decrypt a sample; count rows per KEK version and those under retired versions."""
        retired = await self.kms.retired_versions()
        versions = {
            str(r["kek_version"]): int(r["n"])
            for r in await self.db.fetchall(
                "SELECT kek_version, COUNT(*) AS n FROM distributors WHERE data_key IS NOT NULL "
                "GROUP BY kek_version"
            )
        }
        rows = await self.db.fetchall(
            "SELECT user_id, real_name_ct, id_card_ct, data_key, kek_version FROM distributors "
            "WHERE data_key IS NOT NULL ORDER BY RAND() LIMIT %s",
            sample,
        )
        failures: list[str] = []
        for r in rows:
            try:
                await unseal(
                    self.kms,
                    TABLE,
                    int(r["user_id"]),
                    {"real_name": r["real_name_ct"], "id_card": r["id_card_ct"]},
                    r["data_key"],
                    r["kek_version"],
                )
            except (DecryptError, KmsError) as exc:
                failures.append(f"user {r['user_id']}: {exc}")
        return {
            "versions": versions,
            "under_retired": {v: n for v, n in versions.items() if v in retired},
            "sampled": len(rows),
            "failures": failures,
        }

    # ------------------------------------------------------------ commissions

    async def settle_commissions(self) -> int:
        return await settle_due(self.db)

    async def dashboard(self) -> dict[str, int]:
        pending = await self.db.fetchval("SELECT COUNT(*) FROM distributors WHERE status = 'pending'")
        sums = await self.db.fetchall(
            "SELECT status, COALESCE(SUM(amount_fen), 0) AS fen FROM commissions GROUP BY status"
        )
        by = {r["status"]: int(r["fen"]) for r in sums}
        return {
            "pending_applications": int(pending or 0),
            "commission_pending_fen": by.get("pending", 0),
            "commission_settled_fen": by.get("settled", 0),
            "commission_reversed_fen": by.get("reversed", 0),
        }


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)
