"""Personal-data building blocks (issue 13): ID checks, masks, the blind index, envelope
encryption bound to its row, the local key ring (created once by racing processes, 0600
in prod), `kms:` secrets decrypted at start, and the log mask."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest

from server.app import create_app
from server.config import ConfigError, Settings
from server.logging import mask_personal
from server.pii import blind_key, make_kms, resolve_secrets
from server.pii.envelope import DecryptError, seal, unseal
from server.pii.identity import IdentityInvalid, blind_index, check_id, make_id, mask_id, mask_name
from server.pii.kms import KeyRing, LocalKms
from tests.auth_support import auth_settings, register
from tests.conftest import ROOT, run_command

BORN = dt.date(1990, 3, 7)


def test_a_valid_id_number_passes_and_is_normalised() -> None:
    number = make_id(BORN, serial="12" + "3")
    assert check_id(" " + number.lower() + " ") == number
    assert check_id("11010519491231002X") == "11010519491231002X"  # the standard's example


@pytest.mark.parametrize(
    "number",
    ["1101011990030712", "11010119900307123Y", "110101199013011234", "110101190001011234"],
)
def test_a_malformed_id_number_is_refused_without_echoing_it(number: str) -> None:
    with pytest.raises(IdentityInvalid) as exc:
        check_id(number)
    assert number not in str(exc.value)


def test_a_minor_is_refused_and_an_adult_on_the_birthday_passes() -> None:
    today = dt.date(2026, 6, 15)
    assert check_id(make_id(dt.date(2008, 6, 15)), today)
    with pytest.raises(IdentityInvalid, match="18"):
        check_id(make_id(dt.date(2008, 6, 16)), today)


def test_masks_keep_only_the_first_and_last_characters() -> None:
    assert mask_id("110101199003071234") == "1101**********1234"
    assert mask_name("张三") == "张*"
    assert (
        mask_personal("ID 110101199003071234, phone 13912345678.")
        == "ID 1101**********1234, phone 139****5678."
    )


def test_the_blind_index_depends_on_the_key_and_not_on_case_or_spaces() -> None:
    number = make_id(BORN)
    key = b"k" * 32
    assert blind_index(key, number) == blind_index(key, f" {number.lower()} ")
    assert blind_index(key, number) != blind_index(b"j" * 32, number)


async def test_a_sealed_record_opens_only_on_its_own_row_and_column(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "ring.json")
    ring.create_if_missing()
    kms = LocalKms(ring)
    number = make_id(BORN)
    sealed = await seal(kms, "distributors", 1, {"id_card": number, "real_name": "张三"})
    columns: dict[str, bytes | None] = dict(sealed.columns)
    opened = await unseal(kms, "distributors", 1, columns, sealed.wrapped_key, sealed.kek_version)
    assert opened == {"id_card": number, "real_name": "张三"}
    for owner, cols in (
        (2, columns),
        (1, {"id_card": sealed.columns["real_name"]}),
    ):
        with pytest.raises(DecryptError) as exc:
            await unseal(kms, "distributors", owner, cols, sealed.wrapped_key, sealed.kek_version)
        assert number not in str(exc.value) and "张三" not in str(exc.value)
    other = await seal(kms, "distributors", 1, {"id_card": number})
    with pytest.raises(DecryptError):  # the same row's ciphertext under another record's key
        await unseal(
            kms, "distributors", 1, {"id_card": other.columns["id_card"]}, sealed.wrapped_key, "local:1"
        )


def mode_and_leftovers(path: Path) -> tuple[int, list[str]]:
    return path.stat().st_mode & 0o777, [p.name for p in path.parent.iterdir() if p.name.startswith(".")]


async def test_processes_starting_together_share_one_key_ring(tmp_path: Path) -> None:
    path = tmp_path / "ring.json"
    code = (
        "import sys; from pathlib import Path; from server.pii.kms import KeyRing; "
        "made = KeyRing(Path(sys.argv[1])).create_if_missing(); "
        "print(int(made), Path(sys.argv[1]).read_text().replace(chr(10), ''))"
    )
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, str(path), cwd=ROOT, stdout=asyncio.subprocess.PIPE
        )
        for _ in range(8)
    ]
    outs = [(await p.communicate())[0].decode().split(" ", 1) for p in procs]
    assert sorted(int(made) for made, _ in outs) == [0] * 7 + [1]
    assert len({ring for _, ring in outs}) == 1
    assert json.loads(outs[0][1])["versions"][0]["version"] == 1
    assert mode_and_leftovers(path) == (0o600, [])  # no temporary file left


def test_prod_refuses_a_missing_or_readable_key_ring(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    path = tmp_path / "ring.json"
    prod = make_settings(app_env="prod", kms_local_keyring=path)
    with pytest.raises(ConfigError, match="does not exist"):
        make_kms(prod)
    KeyRing(path).create_if_missing()
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="0600"):
        make_kms(prod)
    path.chmod(0o600)
    kms = make_kms(prod)
    assert len(blind_key(prod, kms)) == 32
    with pytest.raises(ConfigError, match="KMS_LOCAL_KEYRING"):
        make_kms(make_settings(app_env="prod"))


def test_a_short_blind_index_key_is_refused(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    settings = make_settings(kms_local_keyring=tmp_path / "r.json", blind_index_key="short")
    with pytest.raises(ConfigError, match="BLIND_INDEX_KEY"):
        blind_key(settings, make_kms(settings))


async def test_a_kms_secret_is_decrypted_at_start(
    make_settings: Callable[..., Settings], tmp_path: Path, aiohttp_client: Any
) -> None:
    ring = tmp_path / "ring.json"
    secret = "a-jwt-secret-given-through-the-kms-0123456789"
    base = auth_settings(make_settings, kms_local_keyring=ring)
    code, out = await run_command(base, "kms", "encrypt", "--value", secret, KMS_LOCAL_KEYRING=str(ring))
    assert code == 0, out
    value = out.strip().splitlines()[-1]
    assert value.startswith("kms:local:1:") and secret not in value
    client = await aiohttp_client(create_app(base.updated(jwt_secret=value)))
    token = (await register(client))["access_token"]
    assert jwt.decode(token, secret, algorithms=["HS256"])["typ"] == "access"

    broken = base.updated(jwt_secret=value[:-6] + "AAAAAA")
    with pytest.raises(ConfigError, match="JWT_SECRET: the kms: value does not decrypt") as exc:
        await resolve_secrets(broken, make_kms(broken))
    assert secret not in str(exc.value)
