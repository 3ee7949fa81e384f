"""The tencent SMS provider, through the real SDK, against a fake that checks TC3 signatures."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from server.app import create_app
from server.config import Settings
from tests.auth_support import PASSWORD, auth_settings, error_code, new_phone
from tests.fakes.tencent_sms import FakeTencentSms

SECRET_ID = "AKIDfake0000000000000000000000000000"
SECRET_KEY = "fake-secret-key-0000000000000000"


@pytest.fixture
def fake() -> FakeTencentSms:
    return FakeTencentSms(SECRET_ID, SECRET_KEY)


@pytest.fixture
async def sms_server(aiohttp_server: Any, fake: FakeTencentSms) -> TestServer:
    server: TestServer = await aiohttp_server(fake.app())
    return server


def tencent_settings(
    make_settings: Callable[..., Settings], server: TestServer, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "sms_provider": "tencent",
        "tencent_secret_id": SECRET_ID,
        "tencent_secret_key": SECRET_KEY,
        "tencent_sms_app_id": "1400000000",
        "tencent_sms_sign_name": "Wardrobe",
        "tencent_sms_template_id": "123456",
        "tencent_sms_endpoint": f"http://127.0.0.1:{server.port}",
        "tencent_sms_timeout": 5,
    }
    values.update(overrides)
    return auth_settings(make_settings, **values)


@pytest.fixture
def settings(make_settings: Callable[..., Settings], sms_server: TestServer) -> Settings:
    return tencent_settings(make_settings, sms_server)


async def ask(client: Any, phone: str, purpose: str = "register") -> Any:
    return await client.post("/api/v1/auth/sms-codes", json={"phone": phone, "purpose": purpose})


async def test_a_code_goes_out_through_tencent_with_a_valid_signature_and_registers(
    client: Any, fake: FakeTencentSms
) -> None:
    phone = new_phone()
    resp = await ask(client, phone)
    assert resp.status == 202
    assert fake.rejected == []
    [sent] = fake.sent
    assert sent.phone == f"+86{phone}"
    assert (sent.app_id, sent.sign_name, sent.template_id) == ("1400000000", "Wardrobe", "123456")
    code, minutes = sent.params
    assert minutes == "5" and len(code) == 6
    register = await client.post(
        "/api/v1/auth/register", json={"phone": phone, "password": PASSWORD, "sms_code": code}
    )
    assert register.status == 201


async def test_a_wrong_secret_key_is_refused_by_the_fake_and_answers_502(
    aiohttp_client: Any, make_settings: Callable[..., Settings], sms_server: TestServer, fake: FakeTencentSms
) -> None:
    client = await aiohttp_client(
        create_app(
            tencent_settings(
                make_settings, sms_server, tencent_secret_key="wrong-key", sms_resend_interval=60
            )
        )
    )
    phone = new_phone()
    resp = await ask(client, phone)
    assert resp.status == 502
    assert await error_code(resp) == "UPSTREAM_FAILED"
    assert fake.rejected == ["AuthFailure.SignatureFailure"] and fake.sent == []
    # The failed send did not use up the 60-second slot.
    assert fake.rejected and (await ask(client, phone)).status == 502


async def test_a_refused_message_answers_502(client: Any, fake: FakeTencentSms) -> None:
    fake.fail_with = "LimitExceeded.PhoneNumberDailyLimit"
    resp = await ask(client, new_phone())
    assert resp.status == 502
    assert (await resp.json())["error"]["details"] == {"code": "LimitExceeded.PhoneNumberDailyLimit"}


async def test_the_dev_endpoint_shows_nothing_when_a_real_gateway_sends(client: Any) -> None:
    phone = new_phone()
    await ask(client, phone)
    assert (await client.get(f"/api/v1/dev/sms/{phone}")).status == 404


async def test_a_gateway_that_is_down_answers_502(
    aiohttp_client: Any, make_settings: Callable[..., Settings], sms_server: TestServer
) -> None:
    settings = tencent_settings(make_settings, sms_server, tencent_sms_endpoint="http://127.0.0.1:9")
    client = await aiohttp_client(create_app(settings))
    resp = await ask(client, new_phone())
    assert resp.status == 502
