"""Retention classes, keep and DELETE, COS lifecycle rules, batch deletes and cost figures
(issue 14), on the local backend and on COS against the fake that checks signatures."""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from server.app import CRON_JOBS, create_app
from server.config import Settings
from server.db import Database
from server.keys import db_key, settings_key, storage_key
from server.media import assets, retention
from server.media.images import validate_image
from server.media.orphans import DELETE_ATTEMPTS, clean_orphans
from server.media.storage import Storage
from server.media.storage.cos import CosStorage
from server.media.storage.local import LocalStorage
from tests.auth_support import auth_settings, bearer, error_code, register
from tests.conftest import Services, run_command
from tests.fakes.cos import FakeCos
from tests.test_ops import ADMIN_PASSWORD, ADMIN_PHONE, admin_login

SECRET_ID = "AKIDfakeWardrobe0002"
SECRET_KEY = "fake-secret-key-for-retention"
DAY = 86_400
PNG = b"\x89PNG\r\n\x1a\n" + b"pretend pixels" * 20
GIB = 1024**3


def png(color: str = "red", size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


def cos_env(port: int) -> dict[str, Any]:
    return {
        "storage_backend": "cos",
        "cos_bucket": "wardrobe-1250000000",
        "cos_region": "ap-guangzhou",
        "cos_domain": f"127.0.0.1:{port}",
        "cos_scheme": "http",
        "cos_secret_id": SECRET_ID,
        "cos_secret_key": SECRET_KEY,
        "cos_retries": 0,
        "cos_timeout": 5.0,
        "cos_threads": 4,
    }


@pytest.fixture
def fake_cos() -> FakeCos:
    return FakeCos(SECRET_ID, SECRET_KEY)


@pytest.fixture
async def cos_server(aiohttp_server: Any, fake_cos: FakeCos) -> TestServer:
    server: TestServer = await aiohttp_server(fake_cos.app())
    return server


@pytest.fixture(params=["local", "cos"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings], tmp_path: Path
) -> Settings:
    """Local storage under tmp_path, or COS on the fake when the test asks for `backend` = cos."""
    extra: dict[str, Any] = {}
    if "backend" in request.fixturenames and request.getfixturevalue("backend") == "cos":
        server: TestServer = request.getfixturevalue("cos_server")
        assert server.port is not None
        extra = cos_env(server.port)
    admin = {"admin_phone": ADMIN_PHONE, "admin_password": ADMIN_PASSWORD}
    return auth_settings(make_settings, var_dir=tmp_path, cron_enabled=False, **admin, **extra)


@pytest.fixture
def app(settings: Settings) -> web.Application:
    return create_app(settings)


@pytest.fixture
async def client(aiohttp_client: Any, app: web.Application) -> AsyncIterator[TestClient[Any, Any]]:
    yield await aiohttp_client(app)


class Bucket:
    """Objects and rows planted with a chosen age, on whichever backend the app uses."""

    def __init__(self, app: web.Application, fake: FakeCos | None) -> None:
        self.db: Database = app[db_key]
        self.storage: Storage = app[storage_key]
        self.fake = fake

    def age(self, key: str, seconds: float) -> None:
        if isinstance(self.storage, LocalStorage):
            stamp = time.time() - seconds
            os.utime(self.storage.path_for(key), (stamp, stamp))
        else:
            assert self.fake is not None
            self.fake.modified[key] -= seconds

    async def exists(self, key: str) -> bool:
        return await self.storage.exists(key)

    async def object(self, key: str, age: float) -> str:
        await self.storage.put(key, PNG, "image/png")
        self.age(key, age)
        return key

    async def asset(
        self, prefix: str, kind: str, age: float, *, kept: bool = False, user_id: int = 7
    ) -> tuple[str, str]:
        """An object and its row, both `age` seconds old; (asset id, key)."""
        asset_id = f"{int((time.time() - age) * 1000):012x}{os.urandom(6).hex()}"
        key = await self.object(f"{prefix}{user_id}/{asset_id}.png", age)
        await self.db.execute(
            "INSERT INTO assets (id, user_id, kind, storage_key, content_type, width, height, bytes, "
            "created_at, kept_at) VALUES (%s, %s, %s, %s, 'image/png', 1, 1, %s, "
            "UTC_TIMESTAMP(6) - INTERVAL %s SECOND, IF(%s, UTC_TIMESTAMP(6), NULL))",
            asset_id,
            user_id,
            kind,
            key,
            len(PNG),
            int(age),
            kept,
        )
        return asset_id, key

    async def row(self, asset_id: str) -> dict[str, Any] | None:
        return await self.db.fetchone("SELECT storage_key, kept_at FROM assets WHERE id = %s", asset_id)


def bucket_of(request: pytest.FixtureRequest, app: web.Application) -> Bucket:
    fake = request.getfixturevalue("fake_cos") if isinstance(app[storage_key], CosStorage) else None
    return Bucket(app, fake)


# --- retention per class ----------------------------------------------------------------------


async def test_each_retention_class_keeps_its_objects_exactly_as_long_as_it_should(
    request: pytest.FixtureRequest, backend: str, client: TestClient[Any, Any], settings: Settings
) -> None:
    b = bucket_of(request, client.app)
    assert b.storage.name == backend
    old = (settings.storage.output_retention_days + 1) * DAY
    upload = await b.asset("u/", "upload", old)
    young_output = await b.asset("o/", "output", (settings.storage.output_retention_days - 1) * DAY)
    kept_output = await b.asset("u/", "output", old, kept=True)
    expired_output = await b.asset("o/", "output", old)
    legacy_output = await b.asset("u/", "output", old)  # an output stored before o/ existed
    young_temp = await b.object("vendor-inputs/20261201/new.png", 3600)
    old_temp = await b.object("vendor-inputs/20261120/old.png", DAY + 60)
    old_step = await b.object("tmp/task1/step.png", DAY + 60)

    dry = await clean_orphans(b.db, b.storage, settings, dry_run=True)
    gone = {expired_output[1], legacy_output[1], old_temp, old_step}
    assert {k for keys in dry.orphans.values() for k in keys} == gone and dry.expired == 2
    for key in gone:
        assert await b.exists(key), key
    assert await b.row(expired_output[0]) is not None

    deleted: list[tuple[str, int, int]] = []
    report = await clean_orphans(
        b.db, b.storage, settings, on_delete=lambda cls, n, size: deleted.append((cls, n, size))
    )

    for asset_id, key in (upload, young_output, kept_output):
        assert await b.row(asset_id) is not None and await b.exists(key), key
    for asset_id, key in (expired_output, legacy_output):
        assert await b.row(asset_id) is None and not await b.exists(key), key
    assert await b.exists(young_temp)
    assert not await b.exists(old_temp) and not await b.exists(old_step)
    assert report.expired == 2 and report.failed == []
    totals: dict[str, list[int]] = {}
    for cls, n, size in deleted:
        tally = totals.setdefault(cls, [0, 0])
        tally[0] += n
        tally[1] += size
    # the legacy output under u/ counts as an output: its row said so
    assert totals == {"output": [2, 2 * len(PNG)], "temporary": [2, 2 * len(PNG)]}


# --- keep and DELETE --------------------------------------------------------------------------


async def test_a_kept_output_moves_out_of_the_expiring_prefix_and_outlives_its_retention(
    request: pytest.FixtureRequest, backend: str, client: TestClient[Any, Any], settings: Settings
) -> None:
    user = await register(client)
    user_id, headers = int(user["user"]["id"]), bearer(user["access_token"])
    b = bucket_of(request, client.app)
    output = await assets.store(b.db, b.storage, user_id, validate_image(png()), kind="output")
    assert output.storage_key.startswith(f"o/{user_id}/")

    resp = await client.post(f"/api/v1/assets/{output.id}/keep", headers=headers)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["id"] == output.id
    row = await b.row(output.id)
    assert row is not None and row["kept_at"] is not None
    kept_key = str(row["storage_key"])
    assert kept_key == f"u/{user_id}/{output.id}.png"
    assert await b.storage.get(kept_key) == await b.storage.get(output.storage_key)
    again = await client.post(f"/api/v1/assets/{output.id}/keep", headers=headers)
    assert again.status == 200 and await b.row(output.id) == row

    later = time.time() + (settings.storage.output_retention_days + 2) * DAY
    report = await clean_orphans(b.db, b.storage, settings, now=later)
    assert report.expired == 0
    assert await b.exists(kept_key) and await b.row(output.id) is not None
    assert not await b.exists(output.storage_key)  # the o/ copy nothing refers to any more


async def _upload(client: TestClient[Any, Any], headers: dict[str, str]) -> str:
    form = FormData()
    form.add_field("file", png("blue"), filename="p.png", content_type="image/png")
    resp = await client.post("/api/v1/assets", data=form, headers=headers)
    assert resp.status == 201, await resp.text()
    return str((await resp.json())["id"])


async def test_deleting_an_asset_removes_its_row_at_once_and_its_object_with_the_nightly_job(
    client: TestClient[Any, Any], settings: Settings
) -> None:
    user = await register(client)
    headers = bearer(user["access_token"])
    asset_id = await _upload(client, headers)
    b = Bucket(client.app, None)
    row = await b.row(asset_id)
    assert row is not None
    key = str(row["storage_key"])

    resp = await client.delete(f"/api/v1/assets/{asset_id}", headers=headers)
    assert resp.status == 204, await resp.text()
    assert await b.row(asset_id) is None and await b.exists(key)
    again = await client.delete(f"/api/v1/assets/{asset_id}", headers=headers)
    assert again.status == 404 and await error_code(again) == "NOT_FOUND"

    await clean_orphans(b.db, b.storage, settings, now=time.time() + 2 * DAY)
    assert not await b.exists(key)


async def test_someone_elses_asset_can_be_neither_kept_nor_deleted(client: TestClient[Any, Any]) -> None:
    owner, other = await register(client), await register(client)
    asset_id = await _upload(client, bearer(owner["access_token"]))
    for method, path in (
        ("POST", f"/api/v1/assets/{asset_id}/keep"),
        ("DELETE", f"/api/v1/assets/{asset_id}"),
    ):
        resp = await client.request(method, path, headers=bearer(other["access_token"]))
        assert resp.status == 404 and await error_code(resp) == "NOT_FOUND", path
    resp = await client.delete("/api/v1/assets/not-an-asset-id%25", headers=bearer(owner["access_token"]))
    assert resp.status == 404 and await error_code(resp) == "NOT_FOUND"
    assert await Bucket(client.app, None).row(asset_id) is not None


async def test_an_asset_used_by_an_unfinished_task_cannot_be_deleted(client: TestClient[Any, Any]) -> None:
    user = await register(client)
    user_id, headers = int(user["user"]["id"]), bearer(user["access_token"])
    asset_id = await _upload(client, headers)
    db = client.app[db_key]
    task_id = assets.new_id()
    await db.execute(
        "INSERT INTO tasks (id, user_id, feature, feature_version, status, cost, inputs, idempotency_key, "
        "request_hash) VALUES (%s, %s, 'bg-remove', 1, 'running', 2, %s, 'k1', %s)",
        task_id,
        user_id,
        f'{{"image": "{asset_id}"}}',
        "0" * 64,
    )
    resp = await client.delete(f"/api/v1/assets/{asset_id}", headers=headers)
    assert resp.status == 409 and await error_code(resp) == "CONFLICT"
    assert (await resp.json())["error"]["details"]["task_id"] == task_id
    assert await Bucket(client.app, None).row(asset_id) is not None

    await db.execute("UPDATE tasks SET status = 'succeeded' WHERE id = %s", task_id)
    assert (await client.delete(f"/api/v1/assets/{asset_id}", headers=headers)).status == 204


async def test_keep_and_delete_are_in_the_openapi_spec(client: TestClient[Any, Any]) -> None:
    spec = await (await client.get("/api/openapi.json")).json()
    assert "post" in spec["paths"]["/api/v1/assets/{asset_id}/keep"]
    delete = spec["paths"]["/api/v1/assets/{asset_id}"]["delete"]
    assert {"204", "404", "409"} <= set(delete["responses"])


# --- batch deletes and the writers' lock (COS) ------------------------------------------------


@pytest.mark.parametrize("backend", ["cos"], indirect=True)
async def test_the_cleanup_deletes_in_batches_of_1000_and_retries_keys_that_failed(
    backend: str, client: TestClient[Any, Any], settings: Settings, fake_cos: FakeCos
) -> None:
    keys = [f"vendor-inputs/20261101/{n:05d}.png" for n in range(1200)]
    for key in keys:
        fake_cos.objects[key] = (PNG, "image/png")
        fake_cos.modified[key] = time.time() - 2 * DAY
    flaky, broken = keys[3], keys[1100]
    fake_cos.fail_deletes = {flaky: 1, broken: DELETE_ATTEMPTS}
    fake_cos.calls.clear()

    report = await clean_orphans(client.app[db_key], client.app[storage_key], settings)

    posts = [c for c in fake_cos.calls if c.startswith("POST")]
    # 1000 + 200 keys; then `flaky` once more, `broken` twice more (3 attempts in all)
    assert len(posts) == 2 + 1 + (DELETE_ATTEMPTS - 1)
    assert set(fake_cos.objects) == {broken}
    assert report.failed == [broken]
    assert len(report.orphans["vendor-inputs/"]) == 1199


async def _lock_waits(services: Services, database: str) -> int:
    """Transactions waiting for a lock (as root: the app's user may not read INNODB_TRX)."""
    sql = "SELECT COUNT(*) AS n FROM information_schema.INNODB_TRX WHERE trx_state = 'LOCK WAIT'"
    rows = await asyncio.to_thread(services.query, database, sql)
    return int(rows[0]["n"])


@pytest.mark.parametrize("backend", ["cos"], indirect=True)
async def test_an_upload_landing_during_the_sweep_survives(
    backend: str,
    client: TestClient[Any, Any],
    settings: Settings,
    fake_cos: FakeCos,
    services: Services,
    database: str,
) -> None:
    db, storage = client.app[db_key], client.app[storage_key]
    release = asyncio.Event()
    fake_cos.hold, fake_cos.hold_after_write = release, True
    upload = asyncio.create_task(assets.store(db, storage, 9, validate_image(png("green")), kind="upload"))
    await asyncio.wait_for(fake_cos.held.wait(), 10)  # the object is in the bucket, its upload unfinished
    fake_cos.hold = None  # the sweep's own requests are not held
    key = next(k for k in fake_cos.objects if k.startswith("u/9/"))

    # Two days on, the new object is old enough; only its row (or the lock on it) can save it.
    sweep = asyncio.create_task(clean_orphans(db, storage, settings, now=time.time() + 2 * DAY))
    async with asyncio.timeout(10):
        while not sweep.done() and await _lock_waits(services, database) == 0:  # noqa: ASYNC110 - MariaDB state, no event
            await asyncio.sleep(0.02)  # until the sweep waits for the upload's row lock (or finished)
    release.set()
    asset = await asyncio.wait_for(upload, 10)
    report = await asyncio.wait_for(sweep, 10)

    assert key == asset.storage_key and key in fake_cos.objects
    assert await Bucket(client.app, fake_cos).row(asset.id) is not None
    assert report.orphans["u/"] == []


# --- lifecycle rules ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cos"], indirect=True)
async def test_lifecycle_check_fails_until_apply_puts_the_rules_and_keeps_foreign_ones(
    backend: str, settings: Settings, fake_cos: FakeCos, cos_server: TestServer, tmp_path: Path
) -> None:
    assert cos_server.port is not None
    env = {k.upper(): str(v) for k, v in cos_env(cos_server.port).items()} | {"VAR_DIR": str(tmp_path)}
    fake_cos.lifecycle = [{"ID": "archive-logs", "Prefix": "logs/", "Status": "Enabled", "Days": "90"}]

    code, out = await run_command(settings, "storage", "lifecycle", "--check", **env)
    assert code == 1, out
    assert "missing: wardrobe-outputs (o/ after 31 day(s))" in out and "lifecycle rules differ" in out

    code, out = await run_command(settings, "storage", "lifecycle", "--apply", **env)
    assert code == 0, out
    assert fake_cos.lifecycle == [
        {"ID": "wardrobe-outputs", "Prefix": "o/", "Status": "Enabled", "Days": "31"},
        {"ID": "wardrobe-vendor-inputs", "Prefix": "vendor-inputs/", "Status": "Enabled", "Days": "1"},
        {"ID": "wardrobe-tmp", "Prefix": "tmp/", "Status": "Enabled", "Days": "1"},
        {"ID": "archive-logs", "Prefix": "logs/", "Status": "Enabled", "Days": "90"},
    ]
    code, out = await run_command(settings, "storage", "lifecycle", "--check", **env)
    assert code == 0 and "rules match" in out, out

    code, out = await run_command(
        settings, "storage", "lifecycle", "--check", **env, OUTPUT_RETENTION_DAYS="7"
    )
    assert code == 1 and "differs: wardrobe-outputs: bucket has o/ after 31 day(s), want o/ after 8" in out, (
        out
    )


@pytest.mark.parametrize("backend", ["cos"], indirect=True)
async def test_the_dashboard_says_whether_the_bucket_rules_match(
    backend: str, app: web.Application, client: TestClient[Any, Any], fake_cos: FakeCos, settings: Settings
) -> None:
    storage = app[storage_key]
    assert fake_cos.lifecycle is None
    assert await retention.lifecycle_check(storage, settings) == [
        "missing: wardrobe-outputs (o/ after 31 day(s))",
        "missing: wardrobe-vendor-inputs (vendor-inputs/ after 1 day(s))",
        "missing: wardrobe-tmp (tmp/ after 1 day(s))",
    ]
    await admin_login(client)
    html = await (await client.get("/ops")).text()
    assert '<dd class="state-open">missing: wardrobe-outputs (o/ after 31 day(s));' in html

    await storage.put_lifecycle(retention.merged_configuration(retention.lifecycle_rules(settings), []))
    assert await retention.lifecycle_check(storage, settings) == []
    html = await (await client.get("/ops")).text()
    assert '<dt>Lifecycle rules</dt><dd class="state-closed">rules match</dd>' in html


@pytest.mark.parametrize("backend", ["cos"], indirect=True)
async def test_readyz_does_not_depend_on_the_lifecycle_rules(
    backend: str, client: TestClient[Any, Any], fake_cos: FakeCos
) -> None:
    assert fake_cos.lifecycle is None  # the bucket has no rules at all
    resp = await client.get("/readyz")
    assert resp.status == 200, await resp.text()
    assert not any("lifecycle" in call for call in fake_cos.calls)


# --- cost figures -------------------------------------------------------------------------------


def _samples(text: str) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, s.labels.get("class", ""))] = s.value
    return out


async def test_the_cost_gauges_equal_the_bytes_stored(
    client: TestClient[Any, Any], settings: Settings, tmp_path: Path
) -> None:
    user = await register(client)
    user_id, headers = int(user["user"]["id"]), bearer(user["access_token"])
    for _ in range(2):
        await _upload(client, headers)
    app = client.app
    db, storage = app[db_key], app[storage_key]
    assert isinstance(storage, LocalStorage)
    await assets.store(db, storage, user_id, validate_image(png("white", 40)), kind="output")
    await storage.put("vendor-inputs/20261201/x.png", b"v" * 1000, "image/png")
    await storage.put("avatars/a.png", b"a" * 77, "image/png")

    def on_disk(prefix: str) -> int:
        root = storage.root / prefix
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())

    for name in ("storage-figures", "storage-listing"):
        job = next(j for j in CRON_JOBS if j.name == name)
        await job.func(app)
    m = _samples(await (await client.get("/metrics")).text())

    assert m[("wardrobe_storage_bytes", "upload")] == on_disk("u") > 0
    assert m[("wardrobe_storage_objects", "upload")] == 2
    assert m[("wardrobe_storage_bytes", "output")] == on_disk("o") > 0
    assert m[("wardrobe_storage_bucket_bytes", "upload")] == on_disk("u")
    assert m[("wardrobe_storage_bucket_bytes", "temporary")] == 1000
    assert m[("wardrobe_storage_bucket_bytes", "other")] == 77
    assert m[("wardrobe_storage_bucket_objects", "output")] == 1
    billed = on_disk("u") + on_disk("o") + 1000 + 77
    price = settings.storage.price_per_gb_month
    assert m[("wardrobe_storage_monthly_cost_cny", "")] == pytest.approx(billed / GIB * price)

    code, out = await run_command(settings, "storage", "report", VAR_DIR=str(tmp_path))
    assert code == 0, out
    assert f"for {billed} bytes at {price:g} CNY per GB-month" in out, out


async def test_deletions_count_objects_bytes_and_the_cost_they_avoid(
    client: TestClient[Any, Any], settings: Settings
) -> None:
    b = Bucket(client.app, None)
    await b.object("tmp/t/1.png", 2 * DAY)
    await b.object("tmp/t/2.png", 2 * DAY)
    job = next(j for j in CRON_JOBS if j.name == "orphan-files")
    assert await job.func(client.app) == 2
    m = _samples(await (await client.get("/metrics")).text())
    assert m[("wardrobe_storage_deleted_objects_total", "temporary")] == 2
    assert m[("wardrobe_storage_deleted_bytes_total", "temporary")] == 2 * len(PNG)
    avoided = 2 * len(PNG) / GIB * client.app[settings_key].storage.price_per_gb_month
    assert m[("wardrobe_storage_avoided_cost_cny_total", "")] == pytest.approx(avoided)
