"""Admin features: what GET /admin/features answers, PATCH takes back unchanged."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from server.config import Settings
from tests.auth_support import auth_settings, bearer

ADMIN_PHONE = "13900000011"
ADMIN_PASSWORD = "admin-pass-11"
SEEDED = {"tryon-preview", "bg-remove", "multi-style"}  # sql/0004_features_tasks.sql


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return auth_settings(
        make_settings, cron_enabled=False, admin_phone=ADMIN_PHONE, admin_password=ADMIN_PASSWORD
    )


async def admin(client: Any) -> dict[str, str]:
    resp = await client.post("/api/v1/auth/login", json={"phone": ADMIN_PHONE, "password": ADMIN_PASSWORD})
    assert resp.status == 200, await resp.text()
    return bearer((await resp.json())["access_token"])


async def features(client: Any, headers: dict[str, str]) -> dict[str, dict[str, Any]]:
    resp = await client.get("/api/v1/admin/features", headers=headers)
    assert resp.status == 200, await resp.text()
    return {f["slug"]: f for f in await resp.json()}


async def test_every_seeded_feature_s_pipeline_goes_back_through_patch_unchanged(client: Any) -> None:
    headers = await admin(client)
    before = await features(client, headers)
    assert set(before) >= SEEDED
    for slug, feature in before.items():
        resp = await client.patch(
            f"/api/v1/admin/features/{slug}", json={"pipeline": feature["pipeline"]}, headers=headers
        )
        assert resp.status == 200, (slug, await resp.text())
        assert (await resp.json())["pipeline"] == feature["pipeline"], slug
    after = await features(client, headers)
    assert {s: f["pipeline"] for s, f in after.items()} == {s: f["pipeline"] for s, f in before.items()}


async def test_every_top_level_step_says_its_type(client: Any) -> None:
    pipelines = {slug: f["pipeline"] for slug, f in (await features(client, await admin(client))).items()}
    for slug, pipeline in pipelines.items():
        assert all(step.get("type") in ("call", "fork", "join") for step in pipeline["steps"]), slug
    assert [s["type"] for s in pipelines["bg-remove"]["steps"]] == ["call"]
    assert [s["type"] for s in pipelines["tryon-preview"]["steps"]] == ["call", "call", "call"]
