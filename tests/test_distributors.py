"""Distributors with an encrypted identity (issue 13): apply, duplicates by blind index
across two instances, masked reads, the permission-gated and audited identity read,
crypto-shredding, and no plaintext in the database dump or the logs."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from server.app import create_app
from server.config import Settings
from server.logging import patch_record
from server.pii.identity import make_id
from tests.auth_support import PASSWORD, auth_settings, error_code
from tests.conftest import Services
from tests.pii_support import ADMIN_PHONE, admin_with, apply, approve, new_id, user

NAME = "张三丰"


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return auth_settings(make_settings, cron_enabled=False, admin_phone=ADMIN_PHONE, admin_password=PASSWORD)


@pytest.fixture
async def client2(aiohttp_client: Any, settings: Settings) -> TestClient[Any, Any]:
    """A second instance on the same MariaDB and Redis."""
    client: TestClient[Any, Any] = await aiohttp_client(create_app(settings))
    return client


@pytest.fixture
def masked() -> Iterator[None]:
    """The patcher setup_logging installs, for this test's log lines."""
    from loguru import logger

    logger.configure(patcher=patch_record)
    yield
    logger.configure(patcher=None)


async def mysqldump(services: Services, database: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        "mysqldump",
        f"--socket={services.mariadb.socket}",
        "-uroot",
        "--skip-extended-insert",
        database,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    return out


async def audit_rows(services: Services, database: str, subject: int) -> list[dict[str, Any]]:
    return services.query(database, "SELECT * FROM audit_log WHERE subject_user_id = %s ORDER BY id", subject)


async def test_an_application_is_stored_encrypted_and_read_masked(
    client: TestClient[Any, Any], services: Services, database: str
) -> None:
    who, user_id, _ = await user(client)
    number = new_id()
    made = await apply(client, who, NAME, number)
    assert made["status"] == "pending"
    assert made["real_name_masked"] == "张**"
    assert made["id_card_masked"] == number[:4] + "*" * 10 + number[-4:]
    me = await (await client.get("/api/v1/distributors/me", headers=who)).json()
    assert me["id_card_masked"] == made["id_card_masked"]
    assert me["earnings"] == {"pending_fen": 0, "settled_fen": 0, "reversed_fen": 0}
    assert me["commission_rate"] == "0.10"
    row = services.query(database, "SELECT * FROM distributors WHERE user_id = %s", user_id)[0]
    assert number.encode() not in row["id_card_ct"] and NAME.encode() not in row["real_name_ct"]
    assert row["kek_version"].startswith("local:") and len(row["id_card_bidx"]) == 32


@pytest.mark.parametrize(
    ("number", "why"),
    [
        ("11010119900307123", "17 digits"),
        (
            make_id(dt.date(1990, 3, 7))[:-1] + ("0" if make_id(dt.date(1990, 3, 7))[-1] != "0" else "1"),
            "checksum",
        ),
        ("110101199002301239", "30 February"),
        (make_id(dt.date.today() - dt.timedelta(days=365 * 17)), "under 18"),
    ],
)
async def test_a_bad_id_number_is_refused_without_repeating_it(
    client: TestClient[Any, Any], services: Services, database: str, number: str, why: str
) -> None:
    who, _, _ = await user(client)
    body = await apply(client, who, NAME, number, expect=422)
    assert body["error"]["code"] == "VALIDATION_FAILED", why
    assert number not in str(body)
    assert services.query(database, "SELECT COUNT(*) AS n FROM distributors")[0]["n"] == 0


async def test_twenty_concurrent_applications_with_one_number_on_two_instances_one_wins(
    client: TestClient[Any, Any], client2: TestClient[Any, Any], services: Services, database: str
) -> None:
    users = [await user(client) for _ in range(20)]
    number = new_id()

    async def one(i: int) -> int:
        c = client if i % 2 else client2
        resp = await c.post(
            "/api/v1/distributors/apply", json={"real_name": NAME, "id_card_no": number}, headers=users[i][0]
        )
        if resp.status == 409:
            assert await error_code(resp) == "CONFLICT"
        return resp.status

    statuses = await asyncio.gather(*(one(i) for i in range(20)))
    assert sorted(statuses) == [201] + [409] * 19
    assert services.query(database, "SELECT COUNT(*) AS n FROM distributors")[0]["n"] == 1


async def test_a_second_application_of_the_same_user_conflicts(client: TestClient[Any, Any]) -> None:
    who, _, _ = await user(client)
    await apply(client, who, NAME, new_id())
    assert (await apply(client, who, NAME, new_id(), expect=409))["error"]["code"] == "CONFLICT"


async def test_identity_read_needs_admin_permission_and_reason_and_every_call_is_audited(
    client: TestClient[Any, Any], settings: Settings, services: Services, database: str
) -> None:
    who, user_id, _ = await user(client)
    number = new_id()
    await apply(client, who, NAME, number)
    url = f"/api/v1/admin/distributors/{user_id}/identity"
    reason = {"X-Access-Reason": "ticket 4711: payout check"}

    resp = await client.get(url, headers={**who, **reason})  # a plain user
    assert resp.status == 403
    plain_admin = await admin_with(client, settings)
    resp = await client.get(url, headers={**plain_admin, **reason})  # an admin without pii:read
    assert resp.status == 403 and "pii:read" in (await resp.json())["error"]["message"]
    reader = await admin_with(client, settings, "pii:read")
    resp = await client.get(url, headers=reader)  # no reason
    assert resp.status == 422
    resp = await client.get(url, headers={**reader, **reason})
    assert resp.status == 200
    assert await resp.json() == {"real_name": NAME, "id_card_no": number}

    rows = await audit_rows(services, database, user_id)
    assert [(r["action"], r["allowed"]) for r in rows] == [("identity.read", 0)] * 3 + [("identity.read", 1)]
    assert rows[0]["actor_id"] == user_id
    assert rows[-1]["reason"] == "ticket 4711: payout check" and rows[-1]["request_id"] and rows[-1]["ip"]
    page = await (
        await client.get(f"/api/v1/admin/audit-log?subject_user_id={user_id}&limit=2", headers=reader)
    ).json()
    assert [e["allowed"] for e in page["items"]] == [True, False] and page["next_cursor"]


async def test_revoked_permission_is_gone_after_the_next_login(
    client: TestClient[Any, Any], settings: Settings
) -> None:
    from tests.conftest import run_command

    who, user_id, _ = await user(client)
    await apply(client, who, NAME, new_id())
    reader = await admin_with(client, settings, "pii:read")
    url = f"/api/v1/admin/distributors/{user_id}/identity"
    assert (await client.get(url, headers={**reader, "X-Access-Reason": "x"})).status == 200
    code, out = await run_command(settings, "revoke", "--phone", ADMIN_PHONE, "--permission", "pii:read")
    assert code == 0, out
    again = await admin_with(client, settings)
    assert (await client.get(url, headers={**again, "X-Access-Reason": "x"})).status == 403


async def test_admin_lists_masked_and_decides_once(client: TestClient[Any, Any], settings: Settings) -> None:
    who, user_id, _ = await user(client)
    number = new_id()
    await apply(client, who, NAME, number)
    admin = await admin_with(client, settings)
    page = await (await client.get("/api/v1/admin/distributors?status=pending", headers=admin)).json()
    assert [d["user_id"] for d in page["items"]] == [str(user_id)]
    assert number not in str(page) and NAME not in str(page)
    assert (await approve(client, admin, user_id))["status"] == "approved"
    resp = await client.post(f"/api/v1/admin/distributors/{user_id}/reject", json={}, headers=admin)
    assert resp.status == 409


async def test_ten_racing_decisions_on_two_instances_leave_the_first_and_replays_answer_it(
    client: TestClient[Any, Any],
    client2: TestClient[Any, Any],
    settings: Settings,
    services: Services,
    database: str,
    log_lines: list[str],
) -> None:
    who, user_id, _ = await user(client)
    await apply(client, who, NAME, new_id())
    admin = await admin_with(client, settings)

    async def decide(i: int) -> tuple[int, dict[str, Any]]:
        verb = "approve" if i % 2 else "reject"
        resp = await (client, client2)[i % 4 // 2].post(
            f"/api/v1/admin/distributors/{user_id}/{verb}", json={"reason": f"r{i}"}, headers=admin
        )
        return resp.status, await resp.json()

    answers = await asyncio.gather(*(decide(i) for i in range(10)))
    row = services.query(
        database, "SELECT status, decision_reason FROM distributors WHERE user_id = %s", user_id
    )[0]
    won = "approve" if row["status"] == "approved" else "reject"
    for i, (status, body) in enumerate(answers):
        if ("approve" if i % 2 else "reject") == won:  # the winner and its replays: the row as it is
            assert status == 200 and body["status"] == row["status"], body
            assert body["decision_reason"] == row["decision_reason"]
        else:
            assert status == 409 and body["error"]["code"] == "CONFLICT", body
    assert sum(f"distributor {user_id} {row['status']} by admin" in line for line in log_lines) == 1


async def test_a_ciphertext_swapped_between_two_rows_fails_to_decrypt_with_no_plaintext(
    client: TestClient[Any, Any], settings: Settings, services: Services, database: str
) -> None:
    (a, a_id, _), (b, b_id, _) = await user(client), await user(client)
    number_a, number_b = new_id(), new_id()
    await apply(client, a, "李四", number_a)
    await apply(client, b, "王五", number_b)
    services.query(
        database,
        "UPDATE distributors x JOIN distributors y ON x.user_id = %s AND y.user_id = %s "
        "SET x.id_card_ct = y.id_card_ct",
        a_id,
        b_id,
    )
    reader = await admin_with(client, settings, "pii:read")
    resp = await client.get(
        f"/api/v1/admin/distributors/{a_id}/identity", headers={**reader, "X-Access-Reason": "audit"}
    )
    text = await resp.text()
    assert resp.status == 409, text
    assert "does not decrypt" in text
    assert number_a not in text and number_b not in text and "李四" not in text and "王五" not in text


async def test_deleting_an_identity_destroys_its_key_and_is_audited(
    client: TestClient[Any, Any], settings: Settings, services: Services, database: str
) -> None:
    who, user_id, _ = await user(client)
    number = new_id()
    await apply(client, who, NAME, number)
    reader = await admin_with(client, settings, "pii:read")
    headers = {**reader, "X-Access-Reason": "user asked to be forgotten"}
    resp = await client.delete(f"/api/v1/admin/distributors/{user_id}/identity", headers=headers)
    assert resp.status == 200 and (await resp.json())["identity_deleted"] is True
    row = services.query(
        database, "SELECT data_key, id_card_bidx, id_card_ct FROM distributors WHERE user_id = %s", user_id
    )[0]
    assert row["data_key"] is None and row["id_card_bidx"] is None and row["id_card_ct"]
    resp = await client.get(f"/api/v1/admin/distributors/{user_id}/identity", headers=headers)
    assert resp.status == 409 and "no data key" in await resp.text()
    actions = [(r["action"], r["allowed"]) for r in await audit_rows(services, database, user_id)]
    assert actions == [("identity.delete", 1), ("identity.read", 1)]
    # The number is free again: its index went with the key.
    other, _, _ = await user(client)
    await apply(client, other, NAME, number)


async def test_no_id_number_or_name_in_a_dump_of_the_database_or_in_the_logs(
    client: TestClient[Any, Any],
    settings: Settings,
    services: Services,
    database: str,
    masked: None,
    log_lines: list[str],
) -> None:
    from loguru import logger

    who, user_id, _ = await user(client)
    number = new_id()
    await apply(client, who, NAME, number)
    reader = await admin_with(client, settings, "pii:read")
    resp = await client.get(
        f"/api/v1/admin/distributors/{user_id}/identity", headers={**reader, "X-Access-Reason": "check"}
    )
    assert (await resp.json())["id_card_no"] == number
    # Failures on purpose: a duplicate, a bad checksum, and code that logs the plaintext.
    other, _, _ = await user(client)
    await apply(client, other, NAME, number, expect=409)
    await apply(client, other, NAME, number[:-1] + ("1" if number[-1] != "1" else "2"), expect=422)
    try:
        raise ValueError(f"cannot check {number} of {NAME}, phone 13912345678")
    except ValueError:
        logger.exception("lookup of {} failed", number)
    dump = await mysqldump(services, database)
    assert b"INSERT INTO `distributors`" in dump
    assert number.encode() not in dump and NAME.encode() not in dump
    logs = "".join(log_lines)
    assert "lookup of" in logs and "cannot check" in logs
    assert number not in logs and "13912345678" not in logs
