"""The `tencent` KMS provider against a local fake of Tencent Cloud KMS that checks
TC3-HMAC-SHA256 signatures: distributors apply and are read through it, a `kms:` secret
made by `run.py kms encrypt` is decrypted at start, a wrong secret key and a slow KMS
fail with clear errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from server.app import create_app
from server.config import Settings
from server.keys import distributors_key, settings_key
from server.pii.kms import KmsError
from server.pii.tencent import TencentKms
from tests.auth_support import PASSWORD, auth_settings
from tests.conftest import Services, run_command
from tests.fakes.tencent_kms import FakeTencentKms
from tests.pii_support import ADMIN_PHONE, admin_with, new_id

SECRET_ID = "AKIDkmsfake"
SECRET_KEY = "kms-fake-secret-key"
BLIND = "a-blind-index-key-of-at-least-32-characters"


@pytest.fixture
def fake() -> FakeTencentKms:
    return FakeTencentKms(SECRET_ID, SECRET_KEY)


@pytest.fixture
async def kms_server(aiohttp_server: Any, fake: FakeTencentKms) -> TestServer:
    server: TestServer = await aiohttp_server(fake.app())
    return server


def tencent(server: TestServer, **kw: Any) -> dict[str, Any]:
    return {
        "kms_provider": "tencent",
        "kms_key_id": "kms-key-1",
        "kms_region": "ap-guangzhou",
        "kms_secret_id": SECRET_ID,
        "kms_secret_key": SECRET_KEY,
        "kms_endpoint": f"http://127.0.0.1:{server.port}",
        "blind_index_key": BLIND,
        **kw,
    }


@pytest.fixture
def settings(make_settings: Callable[..., Settings], kms_server: TestServer) -> Settings:
    return auth_settings(
        make_settings,
        cron_enabled=False,
        admin_phone=ADMIN_PHONE,
        admin_password=PASSWORD,
        **tencent(kms_server),
    )


async def test_identities_are_sealed_and_read_through_tencent_kms(
    client: Any, settings: Settings, fake: FakeTencentKms, services: Services, database: str
) -> None:
    number = new_id()
    await client.app[distributors_key].apply(42, "周九", number)
    row = services.query(database, "SELECT kek_version, data_key FROM distributors WHERE user_id = 42")[0]
    assert row["kek_version"] == "tencent:kms-key-1"
    reader = await admin_with(client, settings, "pii:read")
    resp = await client.get(
        "/api/v1/admin/distributors/42/identity", headers={**reader, "X-Access-Reason": "t"}
    )
    assert (await resp.json()) == {"real_name": "周九", "id_card_no": number}
    assert fake.calls == ["GenerateDataKey", "Decrypt"] and fake.rejected == []


async def test_a_kms_secret_from_tencent_is_decrypted_at_start(
    settings: Settings, kms_server: TestServer, fake: FakeTencentKms, aiohttp_client: Any
) -> None:
    env = {k.upper(): str(v) for k, v in tencent(kms_server).items()}
    code, out = await run_command(settings, "kms", "encrypt", "--value", "wechat-secret-in-clear", **env)
    assert code == 0, out
    value = out.strip().splitlines()[-1]
    assert value.startswith("kms:") and "wechat-secret-in-clear" not in value
    client = await aiohttp_client(create_app(settings.updated(wechat_secret=value)))
    resolved = client.app[settings_key]
    assert resolved.wechat.secret.get_secret_value() == "wechat-secret-in-clear"
    assert fake.calls[-1] == "Decrypt"


async def test_a_wrong_secret_key_and_a_slow_kms_fail_with_clear_errors(
    make_settings: Callable[..., Settings], kms_server: TestServer, fake: FakeTencentKms
) -> None:
    wrong = TencentKms(make_settings(**tencent(kms_server, kms_secret_key="not-the-key")).pii)
    with pytest.raises(KmsError, match=r"AuthFailure\.SignatureFailure"):
        await wrong.generate_data_key()
    await wrong.close()
    fake.hold = 3.0
    slow = TencentKms(make_settings(**tencent(kms_server, kms_timeout=0.5)).pii)
    with pytest.raises(KmsError, match=r"took longer than 0\.5 s"):
        await slow.generate_data_key()
    await slow.close()
