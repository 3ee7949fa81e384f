"""Tasks: the one entry point to features and task runs.

`submit` (idempotent; credits reserved; a 202 means created, reserved and scheduled),
`get`, `list`, `cancel`, and `recover` (the cron job). The parts behind it: store.py
(rows and rendering), states.py (the task and step state machines), manager.py (the
process's runs under limits, lease renewal, recovery), runner.py (one run's pipeline on
the vendor actors). `open_tasks` builds it from plain dependencies (server/app.py).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis

from server import figures
from server.auth.users import Profiles
from server.config import Settings
from server.credits.facade import Credits
from server.db import Database, is_duplicate
from server.errors import Conflict
from server.hub.events import EventHub
from server.media.storage import Storage
from server.metrics import Metrics
from server.tasks import store
from server.tasks.deps import TaskDeps
from server.tasks.features import Feature, FeatureStore, parse_inputs
from server.tasks.manager import TaskManager
from server.tasks.pipeline import parse_pipeline
from server.vendors.facade import Vendors


class Tasks:
    def __init__(self, deps: TaskDeps, runs: TaskManager) -> None:
        self.deps = deps
        self.runs = runs
        self.features: FeatureStore = deps.features

    async def submit(
        self, user_id: int, idempotency_key: str, feature: str, inputs: dict[str, Any]
    ) -> tuple[dict[str, Any], bool]:
        """(task, created). A repeat of the key with the same body answers the first task
        (created False); any error leaves nothing written."""
        return await store.create_task(self.deps, self.runs.claim, user_id, idempotency_key, feature, inputs)

    async def get(self, user_id: int, task_id: str) -> dict[str, Any]:
        return await store.get_task(self.deps, user_id, task_id)

    async def list(
        self, user_id: int, status: str | None, before: str | None, limit: int
    ) -> list[dict[str, Any]]:
        return await store.list_tasks(self.deps, user_id, status, before, limit)

    async def cancel(self, user_id: int, task_id: str) -> dict[str, Any]:
        """Cancelled, credits returned; CONFLICT when it finished first."""
        return await store.cancel_task(self.deps, self.runs.cancel_local, user_id, task_id)

    def local_stats(self) -> dict[str, int]:
        """This process's runs: running, waiting in the queue, and every job it holds."""
        return self.runs.stats()

    async def recover(self) -> int:
        """Take over active tasks no live process holds (cron, every minute)."""
        return await self.runs.recover()

    async def recent(self, limit: int) -> builtins.list[dict[str, Any]]:
        """The newest tasks of every user, newest first (the ops dashboard)."""
        return await store.recent(self.deps, limit)

    async def status_counts(self) -> dict[str, int]:
        """Tasks of every user by status, every status present (the ops dashboard)."""
        return await figures.task_counts(self.deps.db)

    # --- features (the admin API) ---------------------------------------------------

    async def create_feature(self, slug: str, fields: dict[str, Any]) -> Feature:
        """A new feature; its inputs and pipeline are checked first (acyclic, references,
        vendors, params). CONFLICT when the slug is taken."""
        inputs = parse_inputs(fields["inputs"])
        parse_pipeline(fields["pipeline"], self.features.catalog, set(inputs))
        row = {**fields, "inputs": json.dumps(fields["inputs"]), "pipeline": json.dumps(fields["pipeline"])}
        try:
            async with self.deps.db.transaction() as tx:
                await self.features.save(tx, slug, row, create=True)
        except Exception as exc:
            if is_duplicate(exc):
                raise Conflict(f"A feature {slug!r} exists already") from None
            raise
        await self.features.invalidate()
        return await self.features.get_any(slug)

    async def update_feature(self, slug: str, changes: dict[str, Any]) -> Feature:
        """Change the fields in `changes`; new inputs or a new pipeline are checked against
        each other first. Tasks already created keep running. NotFound for an unknown slug."""
        current = await self.features.get_any(slug)
        if "inputs" in changes or "pipeline" in changes:
            inputs = parse_inputs(changes["inputs"]) if "inputs" in changes else current.inputs
            pipeline = changes.get("pipeline", current.pipeline.model_dump(exclude_defaults=True))
            parse_pipeline(pipeline, self.features.catalog, set(inputs))
        row = {k: json.dumps(v) if k in ("inputs", "pipeline") else v for k, v in changes.items()}
        if row:
            async with self.deps.db.transaction() as tx:
                await self.features.save(tx, slug, row, create=False)
            await self.features.invalidate()
        return await self.features.get_any(slug)


@contextlib.asynccontextmanager
async def open_tasks(
    settings: Settings,
    db: Database,
    redis: Redis,
    credits: Credits,
    hub: EventHub,
    storage: Storage,
    profiles: Profiles,
    vendors: Vendors,
    metrics: Metrics,
    owner: str,
) -> AsyncIterator[Tasks]:
    """Features (checked against the vendors' catalog) and this process's task runs; at
    start it recovers what a dead process left, at exit it stops its runs."""
    features = FeatureStore(db, redis, vendors.catalog())
    deps = TaskDeps(settings, db, redis, credits, hub, storage, features, profiles, metrics, owner)
    runs = TaskManager(deps, vendors)
    runs.start_renewing()
    recovery = asyncio.get_running_loop().create_task(runs.recover(), name="tasks:recover-at-start")
    try:
        yield Tasks(deps, runs)
    finally:
        recovery.cancel()
        await asyncio.gather(recovery, return_exceptions=True)
        await runs.close()
