"""The wire shapes of the tasks capability that are built from its own types."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from server.tasks.features import Feature


# A feature as the admin API shows it (no docstring: it would become the spec's description).
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

    @classmethod
    def of(cls, f: Feature) -> AdminFeature:
        return cls(
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
