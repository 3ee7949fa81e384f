"""Admin: features (create, update, disable) with their pipelines validated when saved."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field, field_validator

from server.errors import ErrorCode
from server.keys import tasks_key
from server.routing import RouteTable, omittable
from server.tasks.schemas import AdminFeature

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


@routes.get("/api/v1/admin/features", response=list[AdminFeature])
async def all_features(request: web.Request) -> list[AdminFeature]:
    """Every feature, disabled ones included, with its pipeline."""
    return [AdminFeature.of(f) for f in await request.app[tasks_key].features.all()]


@routes.post(
    "/api/v1/admin/features", body=FeatureIn, response=AdminFeature, status=201, errors=[ErrorCode.CONFLICT]
)
async def create_feature(request: web.Request, body: FeatureIn) -> AdminFeature:
    """Create a feature; its inputs and pipeline are checked (acyclic, references, vendors, params)."""
    fields = body.model_dump(exclude={"slug"})
    return AdminFeature.of(await request.app[tasks_key].create_feature(body.slug, fields))


@routes.patch(
    "/api/v1/admin/features/{slug}", body=FeaturePatch, response=AdminFeature, errors=[ErrorCode.NOT_FOUND]
)
async def update_feature(request: web.Request, body: FeaturePatch) -> AdminFeature:
    """Change a feature (e.g. `{"enabled": false}` disables it); tasks already created keep running."""
    changes = body.model_dump(exclude_unset=True)
    return AdminFeature.of(await request.app[tasks_key].update_feature(request.match_info["slug"], changes))
