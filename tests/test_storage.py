"""Both storage backends: local files behind signed URLs, and COS against a fake that
checks signatures like the real service."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from server.app import CRON_JOBS
from server.config import ConfigError, Settings
from server.db import Database
from server.errors import AppError, Busy, ErrorCode, NotFound
from server.keys import db_key, storage_key
from server.media.orphans import clean_orphans
from server.media.storage import InvalidKey, Storage, create_storage
from server.media.storage.cos import CosStorage
from server.media.storage.local import LocalStorage, derive_url_secret, url_secret
from tests.conftest import run_command
from tests.fakes.cos import FakeCos

SECRET_ID = "AKIDfakeWardrobe0001"
SECRET_KEY = "fake-secret-key-for-cos-signatures"
PNG = b"\x89PNG\r\n\x1a\n" + b"not really pixels" * 10


def cos_settings(port: int, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "storage_backend": "cos",
        "cos_bucket": "wardrobe-1250000000",
        "cos_region": "ap-guangzhou",
        "cos_domain": f"127.0.0.1:{port}",
        "cos_scheme": "http",
        "cos_secret_id": SECRET_ID,
        "cos_secret_key": SECRET_KEY,
        "cos_retries": 0,
        "cos_timeout": 5.0,
        "cos_threads": 2,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def local(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "storage", b"k" * 32)


@pytest.fixture
def fake_cos() -> FakeCos:
    return FakeCos(SECRET_ID, SECRET_KEY)


@pytest.fixture
async def cos_server(aiohttp_server: Any, fake_cos: FakeCos) -> TestServer:
    server: TestServer = await aiohttp_server(fake_cos.app())
    return server


@pytest.fixture
async def make_cos(cos_server: TestServer) -> AsyncIterator[Callable[..., CosStorage]]:
    made: list[CosStorage] = []

    def make(**overrides: Any) -> CosStorage:
        assert cos_server.port is not None
        storage = create_storage(cos_settings(cos_server.port, **overrides))
        assert isinstance(storage, CosStorage)
        made.append(storage)
        return storage

    yield make
    for storage in made:
        await storage.close()


@pytest.fixture
def settings(make_settings: Callable[..., Settings], tmp_path: Path) -> Settings:
    return make_settings(var_dir=tmp_path)


# --- both backends -------------------------------------------------------------------------


@pytest.fixture(params=["local", "cos"])
def storage(
    request: pytest.FixtureRequest, local: LocalStorage, make_cos: Callable[..., CosStorage]
) -> Storage:
    return local if request.param == "local" else make_cos()


async def test_a_stored_object_reads_back_byte_for_byte(storage: Storage) -> None:
    await storage.put("assets/u1/photo.png", PNG, "image/png")
    assert await storage.get("assets/u1/photo.png") == PNG
    assert await storage.exists("assets/u1/photo.png")


async def test_putting_a_key_again_replaces_the_object(storage: Storage) -> None:
    await storage.put("outputs/t1/result.png", b"first", "image/png")
    await storage.put("outputs/t1/result.png", b"second", "image/png")
    assert await storage.get("outputs/t1/result.png") == b"second"


async def test_reading_a_missing_key_is_not_found(storage: Storage) -> None:
    with pytest.raises(NotFound):
        await storage.get("assets/nobody/missing.png")
    assert not await storage.exists("assets/nobody/missing.png")


async def test_delete_removes_objects_and_ignores_keys_that_do_not_exist(storage: Storage) -> None:
    await storage.put("a/one.png", b"1", "image/png")
    await storage.put("a/two.png", b"2", "image/png")
    await storage.delete(["a/one.png", "a/two.png", "a/never.png"])
    assert not await storage.exists("a/one.png")
    assert not await storage.exists("a/two.png")
    await storage.delete([])


@pytest.mark.parametrize(
    "key",
    ["", "../etc/passwd", "/etc/passwd", "a/../b", "a//b", ".hidden", "a/.types/x", "a b", "a\\b", "x" * 600],
)
async def test_keys_that_could_escape_the_root_or_need_quoting_are_refused(
    storage: Storage, key: str
) -> None:
    with pytest.raises(InvalidKey):
        await storage.put(key, b"x", "image/png")
    with pytest.raises(InvalidKey):
        storage.url(key, 60)


# --- local ---------------------------------------------------------------------------------


async def test_local_writes_leave_no_temporary_files_behind(local: LocalStorage) -> None:
    await local.put("a/b/c.webp", b"data", "image/webp")
    await local.put("a/b/d.bin", b"data", "image/png")
    files = sorted(p.relative_to(local.root).as_posix() for p in local.root.rglob("*") if p.is_file())
    assert files == [".types/a/b/d.bin", "a/b/c.webp", "a/b/d.bin"]  # a type the extension says is not kept
    assert (await local.content_type("a/b/c.webp"), await local.content_type("a/b/d.bin")) == (
        "image/webp",
        "image/png",
    )
    await local.put("a/b/d.bin", b"data", "application/octet-stream")  # now what the extension says
    assert not (local.root / ".types/a/b/d.bin").exists()
    assert await local.content_type("a/b/d.bin") == "application/octet-stream"


def test_the_url_secret_is_derived_from_the_jwt_secret_unless_configured() -> None:
    plain = Settings(_env_file=None, jwt_secret="j" * 40)
    derived = url_secret(plain)
    assert derived == derive_url_secret("j" * 40)
    assert len(derived) == 32 and derived != b"j" * 32
    configured = Settings(_env_file=None, jwt_secret="j" * 40, storage_url_secret="s" * 40)
    assert url_secret(configured) == b"s" * 40


def test_local_urls_start_with_the_public_base_url_when_one_is_set(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, var_dir=tmp_path, public_base_url="https://api.example.com/")
    url = LocalStorage.from_settings(settings).url("a/b.png", 60)
    assert url.startswith("https://api.example.com/files/a/b.png?exp=")


async def test_a_signed_url_serves_the_file_with_its_type_and_private_caching(
    client: TestClient[Any, Any],
) -> None:
    storage = client.app[storage_key]
    await storage.put("assets/u7/look", PNG, "image/png")  # no extension: the stored type counts
    resp = await client.get(storage.url("assets/u7/look", 600))
    assert resp.status == 200
    assert await resp.read() == PNG
    assert resp.headers["Content-Type"] == "image/png"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    cache, max_age = resp.headers["Cache-Control"].split(", max-age=")
    assert cache == "private" and 0 < int(max_age) <= 600


def _tamper(url: str, what: str) -> str:
    path, _, query = url.partition("?")
    exp, sig = (part.split("=", 1)[1] for part in query.split("&"))
    if what == "signature":
        return f"{path}?exp={exp}&sig={'0' if sig[0] != '0' else '1'}{sig[1:]}"
    if what == "expiry":
        return f"{path}?exp={int(exp) + 3600}&sig={sig}"
    if what == "key":
        return f"{path.replace('u7', 'u8')}?exp={exp}&sig={sig}"
    if what == "no signature":
        return f"{path}?exp={exp}"
    return path


@pytest.mark.parametrize("what", ["signature", "expiry", "key", "no signature", "no query"])
async def test_a_tampered_url_is_forbidden(client: TestClient[Any, Any], what: str) -> None:
    storage = client.app[storage_key]
    await storage.put("assets/u7/a.png", PNG, "image/png")
    await storage.put("assets/u8/a.png", PNG, "image/png")
    resp = await client.get(_tamper(storage.url("assets/u7/a.png", 600), what))
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == ErrorCode.FORBIDDEN


@pytest.mark.parametrize(
    "query",
    ["exp=%C2%B2&sig=" + "0" * 64, "exp=1&sig=" + "%C3%A9" * 64, "exp=-5&sig=" + "0" * 64, "exp=&sig="],
)
async def test_garbage_in_the_query_is_forbidden_rather_than_an_error(
    client: TestClient[Any, Any], query: str
) -> None:
    resp = await client.get(f"/files/assets/u7/a.png?{query}")
    assert resp.status == 403


async def test_an_expired_url_is_forbidden_even_though_its_signature_is_right(
    client: TestClient[Any, Any],
) -> None:
    storage = client.app[storage_key]
    assert isinstance(storage, LocalStorage)
    await storage.put("assets/u7/old.png", PNG, "image/png")
    exp = int(time.time()) - 1
    resp = await client.get(
        f"/files/assets/u7/old.png?exp={exp}&sig={storage.sign('assets/u7/old.png', exp)}"
    )
    assert resp.status == 403
    assert "expired" in (await resp.json())["error"]["message"]


async def test_a_valid_url_to_a_deleted_file_is_not_found(client: TestClient[Any, Any]) -> None:
    storage = client.app[storage_key]
    await storage.put("assets/u7/gone.png", PNG, "image/png")
    url = storage.url("assets/u7/gone.png", 600)
    await storage.delete(["assets/u7/gone.png"])
    resp = await client.get(url)
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == ErrorCode.NOT_FOUND


# --- COS -----------------------------------------------------------------------------------


async def test_cos_stores_the_content_type_and_signs_every_request(
    make_cos: Callable[..., CosStorage], fake_cos: FakeCos
) -> None:
    storage = make_cos()
    await storage.put("assets/u1/p.jpg", b"jpeg bytes", "image/jpeg")
    assert fake_cos.objects["assets/u1/p.jpg"] == (b"jpeg bytes", "image/jpeg")
    await storage.delete(["assets/u1/p.jpg"])
    assert fake_cos.calls == ["PUT /assets/u1/p.jpg", "POST /"]


async def test_cos_with_a_wrong_secret_key_fails_upstream_because_cos_refuses_the_signature(
    make_cos: Callable[..., CosStorage], fake_cos: FakeCos
) -> None:
    storage = make_cos(cos_secret_key="not-the-right-key")
    with pytest.raises(AppError) as caught:
        await storage.put("assets/u1/p.png", PNG, "image/png")
    assert caught.value.code == ErrorCode.UPSTREAM_FAILED
    assert caught.value.details["cos_code"] == "SignatureDoesNotMatch"
    assert fake_cos.objects == {}


async def test_a_cos_presigned_url_fetches_the_object_and_refuses_tampering(
    make_cos: Callable[..., CosStorage], fake_cos: FakeCos
) -> None:
    storage = make_cos()
    await storage.put("outputs/t9/out.png", PNG, "image/png")
    url = storage.url("outputs/t9/out.png", 300)
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            assert resp.status == 200
            assert await resp.read() == PNG
            assert resp.headers["Content-Type"] == "image/png"
        async with http.get(url.replace("out.png", "other.png")) as resp:
            assert resp.status == 403
            assert "SignatureDoesNotMatch" in await resp.text()


async def test_a_cos_presigned_url_stops_working_when_it_expires(
    make_cos: Callable[..., CosStorage], fake_cos: FakeCos
) -> None:
    storage = make_cos()
    await storage.put("outputs/t9/out.png", PNG, "image/png")
    url = storage.url("outputs/t9/out.png", 300)
    fake_cos.now = lambda: time.time() + 301
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 403


async def test_cos_calls_beyond_the_pending_bound_answer_busy_at_once(
    make_cos: Callable[..., CosStorage], fake_cos: FakeCos
) -> None:
    storage = make_cos(cos_threads=1, cos_max_pending=1)
    fake_cos.hold = asyncio.Event()
    first = asyncio.create_task(storage.put("a/first.png", PNG, "image/png"))
    try:
        await asyncio.wait_for(fake_cos.held.wait(), 10)
        with pytest.raises(Busy):
            await storage.put("a/second.png", PNG, "image/png")
    finally:
        fake_cos.hold.set()
    await first
    assert set(fake_cos.objects) == {"a/first.png"}


async def test_a_cos_call_that_hangs_fails_upstream_instead_of_waiting_forever(
    make_cos: Callable[..., CosStorage], fake_cos: FakeCos
) -> None:
    storage = make_cos(cos_timeout=0.2)
    fake_cos.hold = asyncio.Event()
    try:
        with pytest.raises(AppError) as caught:
            await storage.get("a/slow.png")
        assert caught.value.code == ErrorCode.UPSTREAM_FAILED
    finally:
        fake_cos.hold.set()


def test_cos_without_credentials_refuses_to_start_and_names_what_is_missing() -> None:
    settings = Settings(_env_file=None, storage_backend="cos", cos_region="ap-guangzhou")
    with pytest.raises(ConfigError, match="COS_BUCKET, COS_SECRET_ID, COS_SECRET_KEY"):
        create_storage(settings)


# --- listing -------------------------------------------------------------------------------


async def test_objects_lists_every_key_under_a_prefix_once_in_pages(storage: Storage) -> None:
    keys = [f"u/{u}/{n}.png" for u in (1, 2, 10) for n in range(3)]
    for i, key in enumerate(keys):
        await storage.put(key, b"x" * (i + 1), "image/png")
    await storage.put("u2/beside.png", b"x", "image/png")
    await storage.put("vendor-inputs/20261120/a.png", b"x", "image/png")
    before = time.time() - 60
    pages = [page async for page in storage.objects("u/", page_size=4)]
    assert [len(p) for p in pages] == [4, 4, 1]
    listed = [obj for page in pages for obj in page]
    assert sorted(obj.key for obj in listed) == sorted(keys)
    assert {obj.key: obj.size for obj in listed} == {key: i + 1 for i, key in enumerate(keys)}
    assert all(before < obj.modified <= time.time() + 1 for obj in listed)
    one = [obj.key async for page in storage.objects("u/1") for obj in page]
    assert sorted(one) == sorted(k for k in keys if k.startswith("u/1"))  # u/1/… and u/10/…
    assert [page async for page in storage.objects("nothing/")] == []


async def test_local_listing_skips_content_types_and_writes_in_progress(local: LocalStorage) -> None:
    await local.put("u/1/a.png", b"x", "image/png")
    (local.root / "u" / "1" / ".tmp-0123-b.png").write_bytes(b"half")
    assert [obj.key async for page in local.objects("") for obj in page] == ["u/1/a.png"]


async def test_cos_listing_follows_the_marker_with_signed_requests(
    make_cos: Callable[..., CosStorage], fake_cos: FakeCos
) -> None:
    storage = make_cos()
    for n in range(5):
        await storage.put(f"vendor-inputs/d/{n}.png", b"x", "image/png")
    fake_cos.calls.clear()
    listed = [obj.key async for page in storage.objects("vendor-inputs/", page_size=2) for obj in page]
    assert listed == [f"vendor-inputs/d/{n}.png" for n in range(5)]
    assert fake_cos.calls == ["GET /"] * 3


# --- orphan-file cleanup (server/orphans.py) ------------------------------------------------

DAY = 86_400


def _backdate(storage: LocalStorage, key: str, seconds: float) -> None:
    """Make the file of `key` look written `seconds` ago."""
    stamp = time.time() - seconds
    os.utime(storage.path_for(key), (stamp, stamp))


def _partial_write(storage: LocalStorage, path: str, age: float) -> Path:
    """What a write killed before its rename leaves at `path` (under the root), `age` s old."""
    file = storage.root / path
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(b"half")
    stamp = time.time() - age
    os.utime(file, (stamp, stamp))
    return file


def _asset_id(age: float) -> str:
    return f"{int((time.time() - age) * 1000):012x}{os.urandom(6).hex()}"


async def _add_row(db: Database, asset_id: str, key: str) -> None:
    await db.execute(
        "INSERT INTO assets (id, user_id, kind, storage_key, content_type, width, height, bytes) "
        "VALUES (%s, 7, 'upload', %s, 'image/png', 1, 1, 1)",
        asset_id,
        key,
    )


async def test_the_cleanup_deletes_only_old_files_that_nothing_refers_to(
    request: pytest.FixtureRequest, storage: Storage, client: TestClient[Any, Any], settings: Settings
) -> None:
    fake_cos = request.getfixturevalue("fake_cos") if isinstance(storage, CosStorage) else None

    def age(key: str, seconds: float) -> None:
        if isinstance(storage, LocalStorage):
            _backdate(storage, key, seconds)
        else:
            assert fake_cos is not None
            fake_cos.modified[key] -= seconds

    db = client.app[db_key]
    old_id, young_id, orphan_id, young_orphan_id = (_asset_id(a) for a in (3 * DAY, 0, 3 * DAY, 0))
    kept = {
        "old with a row": f"u/7/{old_id}.png",
        "young with a row": f"u/7/{young_id}.webp",
        "young without a row": f"u/7/{young_orphan_id}.png",
        "not an asset's key": "u/7/readme.txt",
        "young vendor input": "vendor-inputs/20261123/new.png",
        "outside both prefixes": "avatars/someone.png",
    }
    gone = {"old without a row": f"u/7/{orphan_id}.jpg", "old vendor input": "vendor-inputs/20261120/x.png"}
    for key in [*kept.values(), *gone.values()]:
        await storage.put(key, PNG, "image/png")
    for key in (kept["old with a row"], kept["not an asset's key"], kept["outside both prefixes"]):
        age(key, 3 * DAY)
    age(kept["young without a row"], 3 * DAY)  # written long ago, but its id says it is new: kept
    age(gone["old without a row"], 3 * DAY)
    age(gone["old vendor input"], DAY + 60)  # temporary objects live a day
    await _add_row(db, old_id, kept["old with a row"])
    await _add_row(db, young_id, kept["young with a row"])

    dry = await clean_orphans(db, storage, settings, dry_run=True)
    assert sorted(k for keys in dry.orphans.values() for k in keys) == sorted(gone.values())
    assert dry.unknown == 1 and dry.scanned == 7
    for key in [*kept.values(), *gone.values()]:
        assert await storage.exists(key), key

    report = await clean_orphans(db, storage, settings)
    assert report.orphans == {
        "u/": [gone["old without a row"]],
        "o/": [],
        "vendor-inputs/": [gone["old vendor input"]],
        "tmp/": [],
    }
    for what, key in kept.items():
        assert await storage.exists(key), what
    for what, key in gone.items():
        assert not await storage.exists(key), what
    assert (await clean_orphans(db, storage, settings)).found == 0


async def test_the_cleanup_removes_what_interrupted_local_writes_left_once_they_are_old(
    local: LocalStorage, client: TestClient[Any, Any], settings: Settings
) -> None:
    db = client.app[db_key]

    await local.put("avatars/a.bin", PNG, "image/png")  # an object and its content type
    _backdate(local, "avatars/a.bin", 3 * DAY)
    old = [
        _partial_write(local, "u/7/.tmp-0a1b-x.png", 2 * DAY),
        _partial_write(local, ".types/u/7/.tmp-2c3d-x.bin", 2 * DAY),
    ]
    in_progress = _partial_write(local, "u/7/.tmp-4e5f-y.png", 60)  # a write going on now

    dry = await clean_orphans(db, local, settings, dry_run=True)
    assert sorted(dry.partial) == [".types/u/7/.tmp-2c3d-x.bin", "u/7/.tmp-0a1b-x.png"]
    assert all(f.exists() for f in old)

    report = await clean_orphans(db, local, settings)
    assert sorted(report.partial) == sorted(dry.partial) and report.found == 2
    assert report.deleted == {"upload": [1, 4], "other": [1, 4]}
    assert not any(f.exists() for f in old)
    assert in_progress.exists() and await local.get("avatars/a.bin") == PNG
    assert (local.root / ".types/avatars/a.bin").read_text() == "image/png"
    assert (await clean_orphans(db, local, settings)).found == 0


async def test_a_partial_write_that_cannot_be_removed_is_reported_failed_and_the_rest_still_goes(
    local: LocalStorage, client: TestClient[Any, Any], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As root a read-only directory does not stop an unlink, so the refusal is injected."""
    db = client.app[db_key]
    stuck = _partial_write(local, "u/7/.tmp-0a1b-x.png", 2 * DAY)
    gone = _partial_write(local, "u/8/.tmp-2c3d-y.png", 2 * DAY)
    unlink = os.unlink

    def refuse_one(path: Any, *args: Any, **kwargs: Any) -> None:
        if os.fspath(path) == str(stuck):
            raise PermissionError(13, "Permission denied", str(path))
        unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refuse_one)
    report = await clean_orphans(db, local, settings)
    assert report.failed == ["u/7/.tmp-0a1b-x.png"] and report.partial == ["u/8/.tmp-2c3d-y.png"]
    assert stuck.exists() and not gone.exists()
    assert report.deleted == {"upload": [1, 4]}
    monkeypatch.undo()
    assert (await clean_orphans(db, local, settings)).partial == ["u/7/.tmp-0a1b-x.png"]  # the next night


async def test_the_cron_job_counts_what_it_deleted_on_metrics(client: TestClient[Any, Any]) -> None:
    storage = client.app[storage_key]
    assert isinstance(storage, LocalStorage)
    key = f"u/7/{_asset_id(2 * DAY)}.png"
    await storage.put(key, PNG, "image/png")
    _backdate(storage, key, 2 * DAY)
    app = client.app
    job = next(job for job in CRON_JOBS if job.name == "orphan-files")
    assert await job.func(app) == 1
    assert not await storage.exists(key)
    text = await (await client.get("/metrics")).text()
    assert 'wardrobe_storage_deleted_objects_total{class="upload"} 1.0' in text
    assert f'wardrobe_storage_deleted_bytes_total{{class="upload"}} {float(len(PNG))}' in text
    assert any(job.name == "orphan-files" and job.spec == "0 3 * * *" for job in CRON_JOBS)


async def test_run_py_clean_files_lists_with_dry_run_then_deletes(
    client: TestClient[Any, Any], settings: Settings, tmp_path: Path
) -> None:
    # `client`: an app started on this database has migrated it
    storage = LocalStorage.from_settings(settings)  # var_dir is tmp_path
    key = f"u/7/{_asset_id(2 * DAY)}.png"
    await storage.put(key, PNG, "image/png")
    _backdate(storage, key, 2 * DAY)
    partial = _partial_write(storage, "u/7/.tmp-0a1b-x.png", 2 * DAY)

    code, out = await run_command(settings, "clean-files", "--dry-run", VAR_DIR=str(tmp_path))
    assert code == 0, out
    assert key in out and "u/7/.tmp-0a1b-x.png" in out
    counts = "would delete 1 under u/, 0 under o/, 0 under vendor-inputs/, 0 under tmp/, 1 partial write(s)"
    assert counts in out
    assert await storage.exists(key) and partial.exists()
    code, out = await run_command(settings, "clean-files", VAR_DIR=str(tmp_path))
    assert code == 0 and "deleted 1 under u/" in out and "1 partial write(s)" in out, out
    assert not await storage.exists(key) and not partial.exists()
