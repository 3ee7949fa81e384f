"""The audit log of personal-data access: one row per call, allowed or refused.

Rows are only ever inserted (no code path updates or deletes one). Each names the
actor, the action, whose data, the reason given (X-Access-Reason), the request id and
the caller's IP. "Who read this person's data" is one query (docs/pii.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.db import Conn, Database, Row
from server.paging import decode_cursor, page_of

AUDIT_COLUMNS = "id, actor_id, action, subject_user_id, reason, request_id, ip, allowed, created_at"


@dataclass(frozen=True, slots=True)
class Access:
    """Who is asking, from where: what an audit row records besides the action."""

    actor_id: int | None
    reason: str | None
    request_id: str | None
    ip: str | None


async def record(
    conn: Conn | Database, access: Access, action: str, subject: int | None, allowed: bool
) -> int:
    return await conn.insert(
        "INSERT INTO audit_log (actor_id, action, subject_user_id, reason, request_id, ip, allowed) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s)",
        access.actor_id,
        action,
        subject,
        access.reason[:255] if access.reason else None,
        (access.request_id or "")[:64] or None,
        (access.ip or "")[:64] or None,
        int(allowed),
    )


async def page(
    db: Database, subject: int | None, actor: int | None, cursor: str | None, limit: int
) -> tuple[list[Row], str | None]:
    after = decode_cursor(cursor, int)
    where, args = ["id < %s"], [after[0] if after else 2**63]
    if subject is not None:
        where.append("subject_user_id = %s")
        args.append(subject)
    if actor is not None:
        where.append("actor_id = %s")
        args.append(actor)
    rows = await db.fetchall(
        f"SELECT {AUDIT_COLUMNS} FROM audit_log WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT %s",
        *args,
        limit + 1,
    )
    return page_of(rows, limit, lambda r: (int(r["id"]),))


def as_json(row: Row) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "actor_id": None if row["actor_id"] is None else str(row["actor_id"]),
        "action": row["action"],
        "subject_user_id": None if row["subject_user_id"] is None else str(row["subject_user_id"]),
        "reason": row["reason"],
        "request_id": row["request_id"],
        "ip": row["ip"],
        "allowed": bool(row["allowed"]),
        "created_at": row["created_at"],
    }
