"""Account primitives shared by the CLI, the admin bootstrap and the auth handlers."""

from __future__ import annotations

import re
import sys

from sqids import Sqids

from server.auth.passwords import Passwords, password_problem
from server.db import Conn, Database
from server.errors import validation_failed

PHONE_RE = re.compile(r"^(?:\+?86)?(1[3-9]\d{9})$")
# No 0/O, 1/I/L: codes are read aloud and typed from screenshots.
INVITE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
_SQIDS = Sqids(alphabet=INVITE_ALPHABET, min_length=6)


def normalize_phone(raw: str) -> str:
    """A mainland mobile as 11 digits; '+86 138-0013-8000' → '13800138000'."""
    compact = re.sub(r"[\s-]", "", raw or "")
    m = PHONE_RE.match(compact)
    if not m:
        raise validation_failed([{"field": "phone", "message": "must be a mainland China mobile number"}])
    return m.group(1)


def invite_code_for(user_id: int) -> str:
    """A bijection of the user id: collision-free by construction, no retry loop."""
    return str(_SQIDS.encode([user_id]))


def user_id_for_invite_code(code: str) -> int | None:
    """The user whose code this is, or None. Any string decodes to some numbers; one is ours
    only if it encodes back to the same code (a string that is not one of ours can decode to
    a number past what the encoder takes, 2**63 - 1)."""
    normal = code.strip().upper()
    decoded = _SQIDS.decode(normal)
    if len(decoded) != 1 or not 0 < decoded[0] <= sys.maxsize or invite_code_for(decoded[0]) != normal:
        return None
    return int(decoded[0])


def mask_phone(phone: str | None) -> str | None:
    return None if not phone else f"{phone[:3]}****{phone[-4:]}"


async def insert_user(
    conn: Conn,
    *,
    phone: str | None,
    password_hash: str | None,
    role: str = "user",
    referrer_id: int | None = None,
    wechat_openid: str | None = None,
    wechat_unionid: str | None = None,
    signup_credits: int = 0,
) -> int:
    """Insert a user, give it its invite code and its sign-up credits (a `grant` in the
    ledger, so balance = ledger holds from the first row); run inside the caller's transaction."""
    user_id = await conn.insert(
        "INSERT INTO users (phone, password_hash, role, referrer_id, wechat_openid, wechat_unionid) "
        "VALUES (%s, %s, %s, %s, %s, %s)",
        phone,
        password_hash,
        role,
        referrer_id,
        wechat_openid,
        wechat_unionid,
    )
    await conn.execute("UPDATE users SET invite_code = %s WHERE id = %s", invite_code_for(user_id), user_id)
    if signup_credits > 0:
        await conn.execute(
            "INSERT INTO quota_accounts (user_id, balance) VALUES (%s, %s)", user_id, signup_credits
        )
        await conn.execute(
            "INSERT INTO quota_ledger (user_id, kind, balance_delta, reserved_delta, balance_after, "
            "reserved_after, ref, reason) VALUES (%s, 'grant', %s, 0, %s, 0, %s, 'sign-up credits')",
            user_id,
            signup_credits,
            signup_credits,
            f"signup:{user_id}",
        )
    return user_id


async def ensure_admin(db: Database, passwords: Passwords, phone: str, password: str) -> tuple[int, bool]:
    """Create the admin if no user has this phone, else make that user an admin.

    Returns (user id, created)."""
    phone = normalize_phone(phone)
    problem = password_problem(password)
    if problem:
        raise validation_failed([{"field": "password", "message": problem}])
    hashed = await passwords.hash(password)
    async with db.transaction() as tx:
        row = await tx.fetchone("SELECT id FROM users WHERE phone = %s FOR UPDATE", phone)
        if row is not None:
            await tx.execute("UPDATE users SET role = 'admin' WHERE id = %s", row["id"])
            return int(row["id"]), False
        user_id = await insert_user(tx, phone=phone, password_hash=hashed, role="admin")
        return user_id, True
