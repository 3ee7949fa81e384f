"""Tasks end to end: upload → create → pipeline on vendor actors → outputs, credits settled once."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import FormData, web
from PIL import Image

from actors.user import UserActor
from server.app import create_app
from server.config import Settings
from server.credits.ledger import Grant, QuotaState, Snapshot
from server.keys import actor_system_key, vendors_key
from tests.auth_support import auth_settings, bearer, error_code, register
from tests.conftest import Services
from tests.fakes.vendor import FakeVendor

ADMIN = {"admin_phone": "13900000002", "admin_password": "admin-pass-2"}


def image_bytes(color: str, size: tuple[int, int] = (240, 320), fmt: str = "PNG") -> bytes:
    im = Image.new("RGB", size, "white")
    im.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), color), (size[0] // 4, size[1] // 4))
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def vendor_settings(fake: FakeVendor, **limits: Any) -> dict[str, Any]:
    entry = {
        "kind": "http",
        "base_url": f"{fake.base_url}/http",
        "api_key": fake.api_key,
        "operations": {"enhance": ["image"], "merge": ["images[]"]},
        "concurrency": 5,
        "retries": 0,
        "breaker_threshold": 0,
        **limits,
    }
    return {"vendors": {"fake": entry}}


@pytest.fixture
def settings(make_settings: Callable[..., Settings], fake: FakeVendor) -> Settings:
    return auth_settings(make_settings, cron_enabled=False, **ADMIN, **vendor_settings(fake))


class User:
    def __init__(self, client: Any, app: web.Application, body: dict[str, Any]) -> None:
        self.client = client
        self.app = app
        self.id = int(body["user"]["id"])
        self.headers = bearer(body["access_token"])

    async def grant(self, credits: int) -> None:
        await self.app[actor_system_key].ref(UserActor, self.id).ask(Grant(credits, "grant"))

    async def quota(self) -> QuotaState:
        return await self.app[actor_system_key].ref(UserActor, self.id).ask(Snapshot())

    async def upload(self, data: bytes, name: str = "photo.png") -> dict[str, Any]:
        form = FormData()
        form.add_field("file", data, filename=name, content_type="image/png")
        resp = await self.client.post("/api/v1/assets", data=form, headers=self.headers)
        assert resp.status == 201, await resp.text()
        return dict(await resp.json())

    async def create(self, feature: str, inputs: dict[str, Any], key: str) -> Any:
        return await self.client.post(
            "/api/v1/tasks",
            json={"feature": feature, "inputs": inputs},
            headers={**self.headers, "Idempotency-Key": key},
        )

    async def task(self, task_id: str) -> dict[str, Any]:
        resp = await self.client.get(f"/api/v1/tasks/{task_id}", headers=self.headers)
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())

    async def finished(self, task_id: str, within: float = 30) -> dict[str, Any]:
        """Poll the task as a front end without a socket would, until it ends."""
        async with asyncio.timeout(within):
            while True:
                task = await self.task(task_id)
                if task["status"] in ("succeeded", "failed", "cancelled"):
                    return task
                await asyncio.sleep(0.05)


@pytest.fixture
async def user(client: Any, app: web.Application) -> User:
    return User(client, app, await register(client))


async def admin_headers(client: Any) -> dict[str, str]:
    resp = await client.post(
        "/api/v1/auth/login", json={"phone": ADMIN["admin_phone"], "password": ADMIN["admin_password"]}
    )
    return bearer((await resp.json())["access_token"])


async def add_feature(client: Any, slug: str, pipeline: dict[str, Any], cost: int = 1) -> None:
    resp = await client.post(
        "/api/v1/admin/features",
        json={
            "slug": slug,
            "name": slug,
            "cost": cost,
            "inputs": {"image": {"type": "image"}},
            "pipeline": pipeline,
        },
        headers=await admin_headers(client),
    )
    assert resp.status == 201, await resp.text()


def enhance(step_id: str, ref: str = "$input.image") -> dict[str, Any]:
    return {"id": step_id, "type": "call", "vendor": "fake", "operation": "enhance", "inputs": {"image": ref}}


async def held_task(user: User, client: Any, fake: FakeVendor, slug: str, cost: int) -> str:
    """A one-step task on the fake vendor, its call in flight and held there; its id."""
    await add_feature(client, slug, {"steps": [enhance("e")], "output": "e"}, cost=cost)
    await user.grant(cost)
    photo = await user.upload(image_bytes("purple"))
    fake.hold = asyncio.Event()
    task_id = str((await (await user.create(slug, {"image": photo["id"]}, slug)).json())["id"])
    await fake.until(lambda: fake.in_flight == 1)
    return task_id


async def until_vendor_idle(app: web.Application) -> None:
    """Until the fake vendor's actor has no call in flight (the runner stopped it), ≤ 5 s."""
    vendor = app[vendors_key].actor("fake")
    async with asyncio.timeout(5):
        while vendor.in_flight:  # noqa: ASYNC110 - a counter, not an event
            await asyncio.sleep(0.01)


async def test_a_try_on_runs_end_to_end_serves_its_output_and_charges_once(
    user: User, services: Services, database: str
) -> None:
    await user.grant(100)
    person = await user.upload(image_bytes("navy"))
    garment = await user.upload(image_bytes("red"))
    resp = await user.create("tryon-preview", {"person": person["id"], "garment": garment["id"]}, "k-1")
    assert resp.status == 202, await resp.text()
    created = await resp.json()
    assert created["status"] in ("queued", "running") and created["cost"] == 10
    assert await user.quota() == QuotaState(100, 10)

    task = await user.finished(created["id"])
    assert task["status"] == "succeeded", task
    assert task["progress"] == 1 and task["error"] is None
    assert [s["id"] for s in task["steps"]] == ["cutout", "compose", "mark"]
    assert all(s["status"] == "succeeded" and s["finished_at"] for s in task["steps"])
    (output,) = task["outputs"]
    got = await user.client.get(output["url"])
    assert got.status == 200 and got.content_type == "image/png"
    assert Image.open(io.BytesIO(await got.read())).size == (240, 320)
    assert await user.quota() == QuotaState(90, 0)
    kinds = services.query(
        database, "SELECT kind FROM quota_ledger WHERE task_id = %s ORDER BY id", created["id"]
    )
    assert [k["kind"] for k in kinds] == ["reserve", "confirm"]


async def test_a_repeated_key_answers_the_same_task_and_another_body_is_a_conflict(user: User) -> None:
    await user.grant(10)
    photo = await user.upload(image_bytes("green"))
    first = await user.create("bg-remove", {"image": photo["id"]}, "same-key")
    again = await user.create("bg-remove", {"image": photo["id"]}, "same-key")
    assert (first.status, again.status) == (202, 200)
    assert (await first.json())["id"] == (await again.json())["id"]
    other = await user.create("multi-style", {"image": photo["id"]}, "same-key")
    assert other.status == 409
    assert await error_code(other) == "IDEMPOTENCY_CONFLICT"
    assert (await user.quota()).reserved in (0, 2)  # one reservation at most, settled or not
    await user.finished((await first.json())["id"])
    assert await user.quota() == QuotaState(8, 0)
    # Keys are compared byte for byte: another case or accent is another key.
    ids = {(await first.json())["id"]}
    for key in ("SAME-KEY", "sáme-key"):
        resp = await user.create("bg-remove", {"image": photo["id"]}, key)
        assert resp.status == 202, key
        ids.add((await resp.json())["id"])
        await user.finished((await resp.json())["id"])
    assert len(ids) == 3


async def test_the_seeded_four_style_feature_forks_and_joins_into_one_sheet(user: User) -> None:
    await user.grant(8)
    photo = await user.upload(image_bytes("orange", (200, 200)))
    resp = await user.create("multi-style", {"image": photo["id"]}, "styles")
    task = await user.finished((await resp.json())["id"])
    assert task["status"] == "succeeded", task
    branches = [
        s for s in task["steps"] if s["parent"] == "styles" and s["vendor"] == "local" and s["id"] != "sheet"
    ]
    assert sorted(s["id"] for s in branches) == ["cool", "mono", "sketch", "warm"]
    sheet = await user.client.get(task["outputs"][0]["url"])
    width, height = Image.open(io.BytesIO(await sheet.read())).size
    assert width == height >= 400  # a 2×2 sheet of the 200×200 photo


async def test_a_vendor_answering_500_fails_the_task_and_returns_the_credits(
    user: User, client: Any, fake: FakeVendor
) -> None:
    await add_feature(client, "fake-enhance", {"steps": [enhance("e")], "output": "e"}, cost=3)
    await user.grant(3)
    photo = await user.upload(image_bytes("blue"))
    fake.fail_next(500)
    resp = await user.create("fake-enhance", {"image": photo["id"]}, "will-fail")
    task = await user.finished((await resp.json())["id"])
    assert task["status"] == "failed"
    assert task["error"]["code"] == "UPSTREAM_FAILED"
    assert task["steps"][0]["status"] == "failed" and "500" in task["steps"][0]["error"]
    assert await user.quota() == QuotaState(3, 0)


async def test_cancel_stops_the_vendor_call_and_returns_the_credits(
    user: User, client: Any, app: web.Application, fake: FakeVendor
) -> None:
    task_id = await held_task(user, client, fake, "fake-slow", cost=4)
    resp = await client.post(f"/api/v1/tasks/{task_id}/cancel", headers=user.headers)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["status"] == "cancelled"
    assert await user.quota() == QuotaState(4, 0)
    await until_vendor_idle(app)  # the runner stopped its in-flight call and freed the slot
    fake.hold.set()  # the fake's handler itself is not cancelled by aiohttp when we hang up
    again = await client.post(f"/api/v1/tasks/{task_id}/cancel", headers=user.headers)
    assert again.status == 409 and await error_code(again) == "CONFLICT"
    assert (await user.task(task_id))["status"] == "cancelled"


async def test_a_cancel_during_a_join_records_the_combiner_step_as_cancelled(
    user: User, client: Any, fake: FakeVendor
) -> None:
    def style(step_id: str) -> dict[str, Any]:
        return {"id": step_id, "type": "call", "vendor": "local", "operation": "style",
                "inputs": {"image": "$input.image"}, "params": {"filter": "mono"}}  # fmt: skip

    pipeline = {
        "steps": [
            {"id": "fan", "type": "fork", "branches": [style("a"), style("b")]},
            {
                "id": "merge",
                "type": "join",
                "fork": "fan",
                "combiner": {"vendor": "fake", "operation": "merge", "input": "images"},
            },
        ],
        "output": "merge",
    }
    await add_feature(client, "fake-merge", pipeline, cost=1)
    await user.grant(1)
    photo = await user.upload(image_bytes("olive", (64, 64)))
    fake.hold = asyncio.Event()  # only the combiner goes to the fake
    task_id = (await (await user.create("fake-merge", {"image": photo["id"]}, "merge")).json())["id"]
    await fake.until(lambda: fake.in_flight == 1)
    resp = await client.post(f"/api/v1/tasks/{task_id}/cancel", headers=user.headers)
    assert (await resp.json())["status"] == "cancelled"

    async def steps() -> dict[str, str]:
        return {s["id"]: s["status"] for s in (await user.task(task_id))["steps"]}

    async with asyncio.timeout(5):  # the run stops at its next await
        while (await steps())["merge"] == "running":  # noqa: ASYNC110 - the API, not an event
            await asyncio.sleep(0.02)
    assert await steps() == {"a": "succeeded", "b": "succeeded", "fan": "succeeded", "merge": "cancelled"}
    fake.hold.set()


async def test_20_tasks_forking_10_branches_never_exceed_the_vendors_limit_of_5(
    user: User, client: Any, fake: FakeVendor
) -> None:
    fake.latency = 0.02
    branches = [enhance(f"b{i}") for i in range(10)]
    pipeline = {
        "steps": [
            {"id": "fan", "type": "fork", "branches": branches},
            {
                "id": "sheet",
                "type": "join",
                "fork": "fan",
                "combiner": {"vendor": "local", "operation": "grid", "input": "images"},
            },
        ],
        "output": "sheet",
    }
    await add_feature(client, "fan-out", pipeline)
    await user.grant(20)
    photo = await user.upload(image_bytes("teal", (64, 64)))
    created = await asyncio.gather(
        *(user.create("fan-out", {"image": photo["id"]}, f"fan-{i}") for i in range(20))
    )
    ids = [(await r.json())["id"] for r in created]
    tasks = await asyncio.gather(*(user.finished(i, within=60) for i in ids))
    assert [(t["status"], t["error"]) for t in tasks] == [("succeeded", None)] * 20
    assert fake.calls == 200
    assert fake.max_in_flight == 5
    assert await user.quota() == QuotaState(0, 0)


async def test_bad_inputs_get_their_codes_and_reserve_nothing(
    user: User, client: Any, app: web.Application, services: Services, database: str
) -> None:
    await user.grant(50)
    mine = await user.upload(image_bytes("black"))
    other = User(client, app, await register(client))
    theirs = await other.upload(image_bytes("white"))

    async def fields(resp: Any) -> set[str]:
        assert resp.status == 422, await resp.text()
        return {f["field"] for f in (await resp.json())["error"]["details"]["fields"]}

    assert await fields(await user.create("tryon-preview", {"person": mine["id"]}, "a")) == {"inputs.garment"}
    assert await fields(await user.create("bg-remove", {"image": theirs["id"]}, "b")) == {"inputs.image"}
    assert await fields(await user.create("no-such-feature", {"image": mine["id"]}, "c")) == {"feature"}
    resp = await client.post(
        "/api/v1/tasks", json={"feature": "bg-remove", "inputs": {"image": mine["id"]}}, headers=user.headers
    )
    assert await fields(resp) == {"header.Idempotency-Key"}

    form = FormData()
    form.add_field("file", b"%PDF-1.4 not an image", filename="x.png", content_type="image/png")
    resp = await client.post("/api/v1/assets", data=form, headers=user.headers)
    assert resp.status == 415 and await error_code(resp) == "UNSUPPORTED_MEDIA_TYPE"
    form = FormData()
    form.add_field(
        "file",
        io.BytesIO(b"\x89PNG" + b"\0" * (10 * 1024 * 1024 + 1)),
        filename="big.png",
        content_type="image/png",
    )
    resp = await client.post("/api/v1/assets", data=form, headers=user.headers)
    assert resp.status == 413 and await error_code(resp) == "PAYLOAD_TOO_LARGE"
    for content_type, body in [
        ("multipart/form-data", b"no boundary given"),
        ("multipart/form-data; boundary=x", b"--x\r\nno blank line after headers"),
        ("multipart/form-data; boundary=x", b"not a multipart body at all"),
        ("multipart/form-data; boundary=" + "b" * 71, b"a boundary longer than RFC 2046 allows"),
        (
            "multipart/form-data; boundary=x",
            b"--x\r\nContent-Disposition: form-data; name=file\r\n"
            b"Content-Type: multipart/mixed\r\n\r\nno inner boundary\r\n--x--\r\n",
        ),
        ("gzip", b"--x\r\nnot gzip"),
    ]:
        headers = {**user.headers, "Content-Type": content_type}
        if content_type == "gzip":
            headers.update({"Content-Type": "multipart/form-data; boundary=x", "Content-Encoding": "gzip"})
        resp = await client.post("/api/v1/assets", data=body, headers=headers)
        assert resp.status == 400 and await error_code(resp) == "MALFORMED_REQUEST", (body, resp.status)
        if content_type == "gzip":  # the connection cannot be used again, and the answer says so
            assert resp.headers["Connection"] == "close"

    poor = User(client, app, await register(client))
    photo = await poor.upload(image_bytes("gray"))
    resp = await poor.create("bg-remove", {"image": photo["id"]}, "d")
    assert resp.status == 402 and await error_code(resp) == "QUOTA_INSUFFICIENT"

    assert services.query(database, "SELECT COUNT(*) AS n FROM quota_transactions")[0]["n"] == 0
    assert services.query(database, "SELECT COUNT(*) AS n FROM tasks")[0]["n"] == 0
    assert await user.quota() == QuotaState(50, 0)


async def test_cancelling_a_finished_or_unknown_task_changes_nothing(user: User, client: Any) -> None:
    await user.grant(2)
    photo = await user.upload(image_bytes("olive"))
    task = await user.finished(
        (await (await user.create("bg-remove", {"image": photo["id"]}, "done")).json())["id"]
    )
    resp = await client.post(f"/api/v1/tasks/{task['id']}/cancel", headers=user.headers)
    assert resp.status == 409
    assert (await user.task(task["id"]))["status"] == "succeeded"
    assert await user.quota() == QuotaState(0, 0)
    resp = await client.post("/api/v1/tasks/0123456789abcdef01234567/cancel", headers=user.headers)
    assert resp.status == 404


async def test_tasks_are_listed_newest_first_and_filtered_by_status(user: User, client: Any) -> None:
    await user.grant(10)
    photo = await user.upload(image_bytes("maroon"))
    ids = []
    for i in range(3):
        ids.append((await (await user.create("bg-remove", {"image": photo["id"]}, f"list-{i}")).json())["id"])
    for i in ids:
        await user.finished(i)
    page = await (await client.get("/api/v1/tasks?limit=2", headers=user.headers)).json()
    assert [t["id"] for t in page["items"]] == ids[::-1][:2]
    rest = await (
        await client.get(f"/api/v1/tasks?limit=2&cursor={page['next_cursor']}", headers=user.headers)
    ).json()
    assert [t["id"] for t in rest["items"]] == ids[:1] and rest["next_cursor"] is None
    failed = await (await client.get("/api/v1/tasks?status=failed", headers=user.headers)).json()
    assert failed["items"] == []


async def test_features_are_listed_with_cost_and_inputs(client: Any) -> None:
    resp = await client.get("/api/v1/features")
    features = {f["slug"]: f for f in await resp.json()}
    assert set(features) >= {"tryon-preview", "bg-remove", "multi-style"}
    assert features["tryon-preview"]["inputs"] == {
        "person": {"type": "image", "required": True, "choices": None, "max_length": None},
        "garment": {"type": "image", "required": True, "choices": None, "max_length": None},
    }


async def test_an_invalid_pipeline_is_refused_with_field_errors(client: Any) -> None:
    resp = await client.post(
        "/api/v1/admin/features",
        json={
            "slug": "broken",
            "name": "Broken",
            "cost": 1,
            "inputs": {"image": {"type": "image"}},
            "pipeline": {"steps": [enhance("a", "$steps.b"), enhance("b", "$steps.a")], "output": "b"},
        },
        headers=await admin_headers(client),
    )
    assert resp.status == 422
    fields = (await resp.json())["error"]["details"]["fields"]
    assert fields == [
        {
            "field": "pipeline.steps.0.inputs.image",
            "message": "$steps.b: must name an earlier call or join step",
        }
    ]
    assert "broken" not in {f["slug"] for f in await (await client.get("/api/v1/features")).json()}


async def test_a_disabled_feature_disappears_for_every_instance(
    client: Any, aiohttp_client: Any, settings: Settings
) -> None:
    other = await aiohttp_client(create_app(settings))
    assert "bg-remove" in {f["slug"] for f in await (await other.get("/api/v1/features")).json()}
    resp = await client.patch(
        "/api/v1/admin/features/bg-remove", json={"enabled": False}, headers=await admin_headers(client)
    )
    assert resp.status == 200 and (await resp.json())["enabled"] is False
    assert "bg-remove" not in {f["slug"] for f in await (await other.get("/api/v1/features")).json()}


async def test_a_feature_patch_with_null_fields_is_refused_and_changes_nothing(client: Any) -> None:
    before = await (await client.get("/api/v1/features")).json()
    headers = await admin_headers(client)
    for field in ("name", "description", "cost", "inputs", "pipeline", "enabled"):
        resp = await client.patch(
            "/api/v1/admin/features/bg-remove", json={"cost": 3, field: None}, headers=headers
        )
        assert resp.status == 422, (field, resp.status)
        fields = {f["field"] for f in (await resp.json())["error"]["details"]["fields"]}
        assert field in fields
    assert await (await client.get("/api/v1/features")).json() == before
    # and the docs say so: no field of the PATCH body is nullable or defaults to null
    doc = await (await client.get("/api/openapi.json")).json()
    patch = doc["components"]["schemas"]["FeaturePatch"]["properties"]
    assert set(patch) == {"name", "description", "cost", "inputs", "pipeline", "enabled", "member_cost"}
    patch.pop("member_cost")  # the one nullable field: null means "members pay cost"
    assert "null" not in json.dumps(patch) and "anyOf" not in json.dumps(patch)


async def test_a_cancel_through_another_instance_stops_the_run_where_it_is(
    user: User, client: Any, app: web.Application, aiohttp_client: Any, settings: Settings, fake: FakeVendor
) -> None:
    other = await aiohttp_client(create_app(settings))
    task_id = await held_task(user, client, fake, "fake-held", cost=2)
    resp = await other.post(f"/api/v1/tasks/{task_id}/cancel", headers=user.headers)
    assert resp.status == 200 and (await resp.json())["status"] == "cancelled"
    await until_vendor_idle(app)  # within one lease renewal (≤ 2 s)
    fake.hold.set()
    assert await user.quota() == QuotaState(2, 0)


async def test_a_socket_sees_every_status_of_a_task_in_seq_order(user: User, client: Any) -> None:
    await user.grant(2)
    photo = await user.upload(image_bytes("coral"))
    ws = await client.ws_connect("/api/v1/ws")
    await ws.send_json({"type": "auth", "token": user.headers["Authorization"].removeprefix("Bearer ")})
    assert (await ws.receive_json(timeout=10))["type"] == "ready"
    task_id = (await (await user.create("bg-remove", {"image": photo["id"]}, "watched")).json())["id"]
    seqs, statuses, progress = [], [], []
    async with asyncio.timeout(20):
        while "succeeded" not in statuses:
            frame = await ws.receive_json()
            if frame["type"] != "event":
                continue
            seqs.append(frame["seq"])
            data = frame["data"]
            if frame["event"] == "task.updated" and data["task_id"] == task_id:
                statuses.append(data["status"])
            elif frame["event"] == "task.progress" and data["task_id"] == task_id:
                progress.append(data["progress"])
    await ws.close()
    assert statuses == ["queued", "running", "succeeded"]
    assert progress[-1] == 1
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap


async def test_a_full_vendor_mailbox_is_waited_out_not_failed_after_a_few_quick_retries(
    aiohttp_client: Any, make_settings: Callable[..., Settings], fake: FakeVendor
) -> None:
    """One slot, a mailbox of one, 0.4 s a call: the fifth task's call is refused at the door
    for ~1.2 s. It is tried again (backoff to 1 s) for as long as a queued call may wait for
    a slot (the vendor's queue timeout), so all five succeed."""
    settings = auth_settings(
        make_settings, cron_enabled=False, **ADMIN, **vendor_settings(fake, concurrency=1, mailbox=1)
    )
    app = create_app(settings)
    client = await aiohttp_client(app)
    user = User(client, app, await register(client))
    fake.latency = 0.4
    await add_feature(client, "narrow", {"steps": [enhance("e")], "output": "e"}, cost=1)
    await user.grant(5)
    photo = await user.upload(image_bytes("teal"))
    created = await asyncio.gather(
        *(user.create("narrow", {"image": photo["id"]}, f"n-{i}") for i in range(5))
    )
    tasks = [await user.finished((await r.json())["id"]) for r in created]
    assert [(t["status"], t["error"]) for t in tasks] == [("succeeded", None)] * 5
    assert fake.max_in_flight == 1 and fake.calls == 5
    assert app[vendors_key].actor("fake").counts["busy"] >= 1  # the door was shut at least once


async def test_a_vendor_mailbox_full_for_its_whole_queue_timeout_fails_the_step_with_its_own_message(
    aiohttp_client: Any, make_settings: Callable[..., Settings], fake: FakeVendor
) -> None:
    settings = auth_settings(
        make_settings,
        cron_enabled=False,
        **ADMIN,
        **vendor_settings(fake, concurrency=1, mailbox=1, queue_timeout=0.3),
    )
    app = create_app(settings)
    client = await aiohttp_client(app)
    user = User(client, app, await register(client))
    first = await held_task(user, client, fake, "slow", cost=1)
    await user.grant(2)
    photo = await user.upload(image_bytes("teal"))
    queued, refused = await asyncio.gather(
        user.create("slow", {"image": photo["id"]}, "queued"),
        user.create("slow", {"image": photo["id"]}, "refused"),
    )
    message = "Vendor fake had no free slot within 0.3s"
    for resp in (queued, refused):  # one waited in the mailbox, the other at its door
        task = await user.finished((await resp.json())["id"])
        assert (task["status"], task["error"]) == ("failed", {"code": "UPSTREAM_FAILED", "message": message})
    assert fake.calls == 1
    fake.hold.set()
    assert (await user.finished(first))["status"] == "succeeded"
    assert await user.quota() == QuotaState(2, 0)  # 3 granted, only the first charged


async def test_a_vendor_queue_timeout_fails_the_step_after_one_wait_with_its_own_message(
    aiohttp_client: Any, make_settings: Callable[..., Settings], fake: FakeVendor
) -> None:
    """The only slot is held; the next task's call waits its queue timeout once (not once per
    BUSY retry) and fails as a vendor without a slot, not as a task past TASK_TIMEOUT."""
    settings = auth_settings(
        make_settings, cron_enabled=False, **ADMIN, **vendor_settings(fake, concurrency=1, queue_timeout=0.2)
    )
    app = create_app(settings)
    client = await aiohttp_client(app)
    user = User(client, app, await register(client))
    first = await held_task(user, client, fake, "slow", cost=1)
    await user.grant(1)
    photo = await user.upload(image_bytes("teal"))
    resp = await user.create("slow", {"image": photo["id"]}, "second")
    assert resp.status == 202, await resp.text()

    task = await user.finished((await resp.json())["id"])

    message = "Vendor fake had no free slot within 0.2s"
    assert task["status"] == "failed"
    assert task["error"] == {"code": "UPSTREAM_FAILED", "message": message}
    assert task["steps"][0]["error"] == f"UPSTREAM_FAILED: {message}"
    timeouts = app[actor_system_key].registry.get_sample_value(
        "wardrobe_actor_ask_timeouts_total", {"kind": "VendorActor[fake]"}
    )
    assert timeouts == 1
    assert fake.calls == 1  # the waiting call never reached the vendor
    fake.hold.set()
    assert (await user.finished(first))["status"] == "succeeded"
