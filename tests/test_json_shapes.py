"""Every JSON answer is compact, and every time has microseconds (issue 10, defect 18)."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from typing import Any

from aiohttp import FormData
from PIL import Image

from server.app import create_app
from server.config import Settings
from tests.auth_support import auth_settings, bearer, register

RFC3339_MICRO = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z"


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "green").save(buf, "PNG")
    return buf.getvalue()


def assert_compact(raw: bytes) -> None:
    assert raw == json.dumps(json.loads(raw), ensure_ascii=False, separators=(",", ":")).encode()


async def test_post_assets_and_post_tasks_answer_compact_json(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    client = await aiohttp_client(
        create_app(auth_settings(make_settings, signup_credits=10, cron_enabled=False))
    )
    headers = bearer((await register(client))["access_token"])
    form = FormData()
    form.add_field("file", png(), filename="p.png", content_type="image/png")
    asset = await client.post("/api/v1/assets", data=form, headers=headers)
    assert asset.status == 201, await asset.text()
    assert_compact(await asset.read())
    body = {"feature": "bg-remove", "inputs": {"image": (await asset.json())["id"]}}
    task = await client.post("/api/v1/tasks", json=body, headers={**headers, "Idempotency-Key": "k1"})
    assert task.status == 202, await task.text()
    assert_compact(await task.read())
    assert re.fullmatch(RFC3339_MICRO, (await task.json())["created_at"])


async def test_user_times_carry_microseconds_like_task_times(
    aiohttp_client: Any, make_settings: Callable[..., Settings]
) -> None:
    client = await aiohttp_client(create_app(auth_settings(make_settings, cron_enabled=False)))
    account = await register(client)
    assert re.fullmatch(RFC3339_MICRO, account["user"]["created_at"])
    me = await client.get("/api/v1/me", headers=bearer(account["access_token"]))
    assert re.fullmatch(RFC3339_MICRO, (await me.json())["created_at"])
