"""Features, assets and tasks (API.md "Features, assets, tasks")."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import BaseModel, Field

from server.auth import principal_of
from server.errors import AppError, ErrorCode, NotFound, UnreadableBody
from server.keys import media_key, tasks_key
from server.media.facade import MAX_BYTES
from server.paging import PageQuery, decode_cursor, encode_cursor
from server.routing import RouteTable, idempotency_key, json_response

routes = RouteTable(tags=["tasks"], auth="user")
public = RouteTable(tags=["tasks"], auth="public")

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class FeatureInput(BaseModel):
    type: Literal["image", "text", "choice"]
    required: bool
    choices: list[str] | None = None
    max_length: int | None = None


class FeatureOut(BaseModel):
    slug: str
    name: str
    description: str
    cost: int
    member_cost: int | None = Field(None, description="what a member's task costs instead (null: cost)")
    inputs: dict[str, FeatureInput]


class AssetOut(BaseModel):
    id: str
    url: str = Field(description="signed; expires after an hour")
    content_type: str
    width: int
    height: int
    bytes: int


class TaskIn(BaseModel):
    feature: str = Field(min_length=1, max_length=64)
    inputs: dict[str, Any] = Field(description="input name → asset id (image) or string (text, choice)")


class StepOut(BaseModel):
    id: str
    parent: str | None = Field(None, description="the fork a branch belongs to")
    vendor: str | None
    operation: str | None
    status: str
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    error: str | None


class OutputOut(BaseModel):
    asset_id: str
    url: str
    kind: str


class TaskError(BaseModel):
    code: str
    message: str


class TaskOut(BaseModel):
    id: str
    feature: str
    status: Status
    progress: float = Field(ge=0, le=1)
    cost: int
    steps: list[StepOut]
    outputs: list[OutputOut]
    error: TaskError | None
    created_at: dt.datetime
    updated_at: dt.datetime


class TaskPage(BaseModel):
    items: list[TaskOut]
    next_cursor: str | None


class TaskQuery(PageQuery):
    status: Status | None = None


@public.get("/api/v1/features", response=list[FeatureOut])
async def list_features(request: web.Request) -> list[dict[str, Any]]:
    """The enabled features, with their cost and inputs."""
    return [f.public() for f in await request.app[tasks_key].features.enabled()]


@routes.post(
    "/api/v1/assets",
    response=AssetOut,
    status=201,
    errors=[ErrorCode.PAYLOAD_TOO_LARGE, ErrorCode.UNSUPPORTED_MEDIA_TYPE, ErrorCode.MALFORMED_REQUEST],
)
async def upload_asset(request: web.Request) -> web.Response:
    """Upload a photo: multipart/form-data, field `file`; JPEG, PNG or WebP, ≤ 10 MiB, ≤ 40 MP.

    The type is read from the bytes; EXIF orientation is applied and metadata removed."""
    if request.content_type != "multipart/form-data":
        raise AppError(
            ErrorCode.MALFORMED_REQUEST, "Send multipart/form-data with the image in the field `file`"
        )
    if request.content_length is not None and request.content_length > MAX_BYTES + 64 * 1024:
        raise AppError(ErrorCode.PAYLOAD_TOO_LARGE, "Images are limited to 10 MiB")
    data: bytes | None = None
    try:
        reader = await request.multipart()
        async for part in reader:
            if isinstance(part, BodyPartReader) and part.name == "file":
                data = await _read_limited(part, MAX_BYTES)
                break
    except web.RequestPayloadError as exc:  # a body that does not decode (Content-Encoding)
        raise UnreadableBody(exc) from None
    except (ValueError, HttpProcessingError) as exc:  # no or a bad boundary, a broken part header
        raise AppError(ErrorCode.MALFORMED_REQUEST, f"Malformed multipart body: {exc}") from None
    if data is None:
        raise AppError(ErrorCode.MALFORMED_REQUEST, "The form has no field `file`")
    user_id = principal_of(request).user_id
    return json_response(await request.app[media_key].upload(user_id, data), 201)


def _asset_id(request: web.Request) -> str:
    """The path's asset id; an id that cannot be one (24 hex digits) is simply not found."""
    asset_id = request.match_info["asset_id"]
    if len(asset_id) != 24 or any(c not in "0123456789abcdef" for c in asset_id):
        raise NotFound(f"No asset {asset_id[:40]}")
    return asset_id


@routes.post("/api/v1/assets/{asset_id}/keep", response=AssetOut, errors=[ErrorCode.NOT_FOUND])
async def keep_asset(request: web.Request) -> web.Response:
    """Keep one of your task outputs until you delete it (outputs expire after OUTPUT_RETENTION_DAYS).

    Uploads are always kept; keeping again changes nothing. Someone else's asset is not found."""
    user_id = principal_of(request).user_id
    return json_response(await request.app[media_key].keep(user_id, _asset_id(request)))


@routes.delete("/api/v1/assets/{asset_id}", status=204, errors=[ErrorCode.NOT_FOUND, ErrorCode.CONFLICT])
async def delete_asset(request: web.Request) -> None:
    """Delete one of your assets: it is gone at once, its bytes with the nightly cleanup.

    409 CONFLICT while a queued or running task of yours uses it; someone else's asset is not found."""
    await request.app[media_key].delete(principal_of(request).user_id, _asset_id(request))


async def _read_limited(part: BodyPartReader, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk(256 * 1024):
        size += len(chunk)
        if size > limit:
            raise AppError(ErrorCode.PAYLOAD_TOO_LARGE, "Images are limited to 10 MiB")
        chunks.append(chunk)
    return b"".join(chunks)


@routes.post(
    "/api/v1/tasks",
    body=TaskIn,
    response=TaskOut,
    status=202,
    errors=[ErrorCode.QUOTA_INSUFFICIENT, ErrorCode.IDEMPOTENCY_CONFLICT],
    extra_responses={200: "A repeat of an earlier request (same Idempotency-Key and body): the same task"},
)
async def create_task(request: web.Request, body: TaskIn) -> web.Response:
    """Run a feature. Requires an `Idempotency-Key` header; credits are reserved at once.

    202: created, reserved and scheduled. Any error (402, 409, 422, 503 when the runner
    is full) leaves nothing behind: no task, no reservation."""
    user_id = principal_of(request).user_id
    key = idempotency_key(request)
    task, created = await request.app[tasks_key].submit(user_id, key, body.feature, body.inputs)
    return json_response(task, 202 if created else 200)


@routes.get("/api/v1/tasks", query=TaskQuery, response=TaskPage)
async def list_tasks(request: web.Request, query: TaskQuery) -> dict[str, Any]:
    """The caller's tasks, newest first; `?status=` filters."""
    after = decode_cursor(query.cursor, str)
    items = await request.app[tasks_key].list(
        principal_of(request).user_id, query.status, after[0] if after else None, query.limit + 1
    )
    more = len(items) > query.limit
    items = items[: query.limit]
    return {"items": items, "next_cursor": encode_cursor(items[-1]["id"]) if more and items else None}


@routes.get("/api/v1/tasks/{task_id}", response=TaskOut, errors=[ErrorCode.NOT_FOUND])
async def get_task(request: web.Request) -> dict[str, Any]:
    return await request.app[tasks_key].get(principal_of(request).user_id, request.match_info["task_id"])


@routes.post(
    "/api/v1/tasks/{task_id}/cancel", response=TaskOut, errors=[ErrorCode.NOT_FOUND, ErrorCode.CONFLICT]
)
async def cancel_task(request: web.Request) -> dict[str, Any]:
    """Stop a queued or running task and return its credits; a finished task answers 409."""
    return await request.app[tasks_key].cancel(principal_of(request).user_id, request.match_info["task_id"])
