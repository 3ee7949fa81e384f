"""Admin: features (create, update, disable) with their pipelines validated when saved."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field, field_validator

from server.db import is_duplicate
from server.errors import Conflict, ErrorCode
from server.keys import db_key, tasks_key
from server.routing import RouteTable, omittable
from server.tasks.features import Feature, parse_inputs
from server.tasks.pipeline import parse_pipeline

routes = RouteTable(tags=["admin"], auth="admin")


class FeatureIn(BaseModel):
    slug: str = Field(pattern=r"^[a-z][a-z0-9-]{1,63}$")
    name: str = Field(min_length=1, max_length=100)
    description: str = Field("", max_length=1000)
    cost: int = Field(ge=0, le=100_000)
    member_cost: int | None = Field(
        None, ge=0, le=100_000, description="what a member's task costs; null: cost"
    )
    inputs: dict[str, Any]
    pipeline: dict[str, Any]
    enabled: bool = True


class FeaturePatch(BaseModel):
    name: str | None = omittable(min_length=1, max_length=100)
    description: str | None = omittable(max_length=1000)
    cost: int | None = omittable(ge=0, le=100_000)
    member_cost: int | None = Field(
        None, ge=0, le=100_000, description="left out: kept; null: members pay cost"
    )
    inputs: dict[str, Any] | None = omittable()
    pipeline: dict[str, Any] | None = omittable()
    enabled: bool | None = omittable()

    @field_validator("name", "description", "cost", "inputs", "pipeline", "enabled", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        """Leave a field out to keep it; none of them but member_cost can be set to null."""
        if value is None:
            raise ValueError("may be left out, not set to null")
        return value


class AdminFeature(BaseModel):
    slug: str
    name: str
    description: str
    cost: int
    member_cost: int | None
    inputs: dict[str, Any]
    pipeline: dict[str, Any]
    enabled: bool
    version: int


def _admin_view(f: Feature) -> AdminFeature:
    return AdminFeature(
        slug=f.slug,
        name=f.name,
        description=f.description,
        cost=f.cost,
        member_cost=f.member_cost,
        inputs={k: v.model_dump(exclude_none=True) for k, v in f.inputs.items()},
        pipeline=f.pipeline.model_dump(exclude_defaults=True),
        enabled=f.enabled,
        version=f.version,
    )


@routes.get("/api/v1/admin/features", response=list[AdminFeature])
async def all_features(request: web.Request) -> list[AdminFeature]:
    """Every feature, disabled ones included, with its pipeline."""
    return [_admin_view(f) for f in await request.app[tasks_key].features.all()]


@routes.post(
    "/api/v1/admin/features", body=FeatureIn, response=AdminFeature, status=201, errors=[ErrorCode.CONFLICT]
)
async def create_feature(request: web.Request, body: FeatureIn) -> AdminFeature:
    """Create a feature; its inputs and pipeline are checked (acyclic, references, vendors, params)."""
    store = request.app[tasks_key].features
    inputs = parse_inputs(body.inputs)
    parse_pipeline(body.pipeline, store.catalog, set(inputs))
    fields = body.model_dump(exclude={"slug"})
    fields["inputs"] = json.dumps(body.inputs)
    fields["pipeline"] = json.dumps(body.pipeline)
    try:
        async with request.app[db_key].transaction() as tx:
            await store.save(tx, body.slug, fields, create=True)
    except Exception as exc:
        if is_duplicate(exc):
            raise Conflict(f"A feature {body.slug!r} exists already") from None
        raise
    await store.invalidate()
    return _admin_view(await store.get_any(body.slug))


@routes.patch(
    "/api/v1/admin/features/{slug}", body=FeaturePatch, response=AdminFeature, errors=[ErrorCode.NOT_FOUND]
)
async def update_feature(request: web.Request, body: FeaturePatch) -> AdminFeature:
    """Change a feature (e.g. `{"enabled": false}` disables it); tasks already created keep running."""
    store = request.app[tasks_key].features
    slug = request.match_info["slug"]
    current = await store.get_any(slug)
    changes = body.model_dump(exclude_unset=True)
    if body.inputs is not None or body.pipeline is not None:
        inputs = parse_inputs(body.inputs) if body.inputs is not None else current.inputs
        pipeline = (
            body.pipeline if body.pipeline is not None else current.pipeline.model_dump(exclude_defaults=True)
        )
        parse_pipeline(pipeline, store.catalog, set(inputs))
    for key in ("inputs", "pipeline"):
        if key in changes:
            changes[key] = json.dumps(changes[key])
    if changes:
        async with request.app[db_key].transaction() as tx:
            await store.save(tx, slug, changes, create=False)
        await store.invalidate()
    return _admin_view(await store.get_any(slug))
