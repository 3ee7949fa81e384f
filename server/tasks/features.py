"""AI features: their input schema and pipeline, stored in MySQL, cached in Redis.

The cache holds the enabled features as one JSON document (`features:v1`),
deleted on every admin change, so every instance sees a change at its next read.
Each process decodes a version of that document once and parses a feature once per
version (`FeatureStore._feature`): a read costs one GET.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from redis.asyncio import Redis

from server.db import Conn, Database, Row
from server.errors import NotFound, field_errors, validation_failed
from server.tasks.pipeline import Catalog, Pipeline, parse_pipeline

CACHE_KEY = "features:v1"
CACHE_TTL_S = 600
InputName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["image", "text", "choice"]
    required: bool = True
    choices: list[str] | None = Field(None, min_length=1, max_length=50)
    max_length: int | None = Field(None, ge=1, le=2000, description="text inputs only")


INPUTS = TypeAdapter(dict[InputName, InputSpec])


@dataclass(frozen=True, slots=True)
class Feature:
    id: int
    slug: str
    name: str
    description: str
    cost: int
    inputs: dict[str, InputSpec]
    pipeline: Pipeline
    enabled: bool
    version: int
    member_cost: int | None = None  # what a member's task reserves instead of `cost`

    def public(self) -> dict[str, Any]:
        return {
            "slug": self.slug,
            "name": self.name,
            "description": self.description,
            "cost": self.cost,
            "member_cost": self.member_cost,
            "inputs": {k: v.model_dump(exclude_none=True) for k, v in self.inputs.items()},
        }


def parse_inputs(raw: Any, prefix: str = "inputs") -> dict[str, InputSpec]:
    try:
        inputs = INPUTS.validate_python(raw)
    except ValidationError as exc:
        raise validation_failed(field_errors(exc, prefix)) from None
    errors = []
    for name, spec in inputs.items():
        if spec.type == "choice" and not spec.choices:
            errors.append({"field": f"{prefix}.{name}.choices", "message": "a choice input needs choices"})
        if spec.type != "choice" and spec.choices:
            errors.append({"field": f"{prefix}.{name}.choices", "message": "only choice inputs have choices"})
    if not inputs:
        errors.append({"field": prefix, "message": "a feature takes at least one input"})
    if errors:
        raise validation_failed(errors)
    return inputs


def _from_row(row: Row, catalog: Catalog) -> Feature:
    inputs = parse_inputs(json.loads(row["inputs"]))
    pipeline = parse_pipeline(json.loads(row["pipeline"]), catalog, set(inputs))
    return Feature(
        id=int(row["id"]),
        slug=str(row["slug"]),
        name=str(row["name"]),
        description=str(row["description"]),
        cost=int(row["cost"]),
        inputs=inputs,
        pipeline=pipeline,
        enabled=bool(row["enabled"]),
        version=int(row["version"]),
        member_cost=None if row.get("member_cost") is None else int(row["member_cost"]),
    )


_COLUMNS = "id, slug, name, description, cost, inputs, pipeline, enabled, version, member_cost"


class FeatureStore:
    # Parsed features by (id, version): every change bumps the version, so an entry never
    # goes stale; parsing (pydantic, the pipeline check) is the costly part of a read.
    PARSED_MAX = 256

    def __init__(self, db: Database, redis: Redis, catalog: Catalog) -> None:
        self.db = db
        self.redis = redis
        self.catalog = catalog
        self._parsed: dict[tuple[int, int], Feature] = {}
        self._cached: bytes | str | None = None  # the last cache document read, and its rows
        self._cached_rows: list[Row] = []

    def _feature(self, row: Row) -> Feature:
        key = (int(row["id"]), int(row["version"]))
        feature = self._parsed.get(key)
        if feature is None:
            if len(self._parsed) >= self.PARSED_MAX:
                self._parsed.clear()
            feature = self._parsed[key] = _from_row(row, self.catalog)
        return feature

    async def _rows(self) -> list[Row]:
        cached = await self.redis.get(CACHE_KEY)
        if cached is not None:
            if cached != self._cached:  # decoded once per version of the document
                self._cached, self._cached_rows = cached, json.loads(cached)
            return self._cached_rows
        rows: list[Row] = await self.db.fetchall(
            f"SELECT {_COLUMNS} FROM features WHERE enabled = 1 ORDER BY id"
        )
        await self.redis.set(CACHE_KEY, json.dumps(rows), ex=CACHE_TTL_S)
        return rows

    async def enabled(self) -> list[Feature]:
        return [self._feature(r) for r in await self._rows()]

    async def get_enabled(self, slug: str) -> Feature | None:
        for row in await self._rows():
            if row["slug"] == slug:
                return self._feature(row)
        return None

    async def get_any(self, slug: str) -> Feature:
        row = await self.db.fetchone(f"SELECT {_COLUMNS} FROM features WHERE slug = %s", slug)
        if row is None:
            raise NotFound(f"No feature {slug!r}")
        return self._feature(row)

    async def all(self) -> list[Feature]:
        rows = await self.db.fetchall(f"SELECT {_COLUMNS} FROM features ORDER BY id")
        return [self._feature(r) for r in rows]

    async def invalidate(self) -> None:
        await self.redis.delete(CACHE_KEY)

    async def save(self, tx: Conn, slug: str, fields: dict[str, Any], *, create: bool) -> None:
        """Insert or update one feature inside the caller's transaction (fields already validated)."""
        if create:
            await tx.execute(
                "INSERT INTO features (slug, name, description, cost, inputs, pipeline, enabled, "
                "member_cost) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                slug,
                fields["name"],
                fields["description"],
                fields["cost"],
                fields["inputs"],
                fields["pipeline"],
                fields["enabled"],
                fields.get("member_cost"),
            )
            return
        sets = ", ".join(f"{k} = %s" for k in fields)
        await tx.execute(
            f"UPDATE features SET {sets}, version = version + 1 WHERE slug = %s", *fields.values(), slug
        )
