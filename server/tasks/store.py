"""Tasks: create (idempotent, credits reserved), read, list, cancel.

Credits decide every race: the user actor's phase transition (reserved →
confirmed | cancelled) happens first and only once; the task's status follows
it. So a cancel that loses to a success answers 409 and the user is charged; a
cancel that wins makes the runner's confirm fail and the task ends cancelled.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any

from aiohttp import web

from server.db import Row, is_duplicate
from server.errors import AppError, Conflict, ErrorCode, NotFound, validation_failed
from server.keys import (
    credits_key,
    db_key,
    features_key,
    hub_key,
    instance_id_key,
    metrics_key,
    redis_key,
    settings_key,
    storage_key,
    tasks_key,
)
from server.media import assets
from server.tasks import leases
from server.tasks.features import Feature

ACTIVE = ("queued", "running")
FINISHED = ("succeeded", "failed", "cancelled")


def cancel_key(task_id: str) -> str:
    """Set when a task is cancelled; the process running it checks at each lease renewal."""
    return f"task:cancelled:{task_id}"


_TASK_COLUMNS = (
    "id, user_id, feature, feature_version, status, progress, cost, inputs, idempotency_key, request_hash, "
    "attempts, error_code, error_message, created_at, updated_at"
)


def _utc(value: dt.datetime | None) -> str | None:
    return None if value is None else value.replace(tzinfo=dt.UTC).isoformat().replace("+00:00", "Z")


def request_hash(feature: str, inputs: dict[str, Any]) -> str:
    canonical = json.dumps({"feature": feature, "inputs": inputs}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_idempotency_key(key: str | None) -> str:
    if key is None or not (1 <= len(key) <= 128) or not key.isprintable() or key.strip() != key:
        raise validation_failed(
            [{"field": "header.Idempotency-Key", "message": "required: 1–128 printable characters"}]
        )
    return key


async def resolve_inputs(
    app: web.Application, user_id: int, feature: Feature, raw: dict[str, Any]
) -> dict[str, Any]:
    """The task's inputs checked against the feature; image inputs must be the caller's assets."""
    errors: list[dict[str, str]] = []
    for name in sorted(set(raw) - set(feature.inputs)):
        errors.append({"field": f"inputs.{name}", "message": f"{feature.slug} has no input {name!r}"})
    images: dict[str, str] = {}
    out: dict[str, Any] = {}
    for name, spec in feature.inputs.items():
        value = raw.get(name)
        where = f"inputs.{name}"
        if value is None:
            if spec.required:
                errors.append({"field": where, "message": "required"})
            continue
        if not isinstance(value, str) or not value:
            errors.append({"field": where, "message": "must be a non-empty string"})
        elif spec.type == "image":
            images[name] = value
        elif spec.type == "choice" and value not in (spec.choices or []):
            errors.append({"field": where, "message": f"must be one of {', '.join(spec.choices or [])}"})
        elif spec.type == "text" and len(value) > (spec.max_length or 500):
            errors.append({"field": where, "message": f"at most {spec.max_length or 500} characters"})
        out[name] = value
    mine = await assets.owned(app[db_key], user_id, sorted(set(images.values())))
    for name, asset_id in images.items():
        if asset_id not in mine:
            errors.append({"field": f"inputs.{name}", "message": "no such asset of yours"})
    if errors:
        raise validation_failed(errors)
    return out


async def _existing(app: web.Application, user_id: int, key: str, digest: str) -> dict[str, Any] | None:
    row = await app[db_key].fetchone(
        "SELECT id, request_hash FROM tasks WHERE user_id = %s AND idempotency_key = %s", user_id, key
    )
    if row is None:
        return None
    if row["request_hash"] != digest:
        raise AppError(
            ErrorCode.IDEMPOTENCY_CONFLICT, "This Idempotency-Key was used with a different request body"
        )
    return await get_task(app, user_id, str(row["id"]))


async def create_task(
    app: web.Application, user_id: int, key: str, feature_slug: str, raw_inputs: dict[str, Any]
) -> tuple[dict[str, Any], bool]:
    """(task, created). A repeat of a key with the same body answers the first task."""
    digest = request_hash(feature_slug, raw_inputs)
    found = await _existing(app, user_id, key, digest)
    if found is not None:
        return found, False
    feature = await app[features_key].get_enabled(feature_slug)
    if feature is None:
        raise validation_failed([{"field": "feature", "message": f"no feature {feature_slug!r}"}])
    inputs = await resolve_inputs(app, user_id, feature, raw_inputs)
    settings = app[settings_key]
    task_id = assets.new_id()
    owner = app[instance_id_key]
    # The lease first: from the moment credits are reserved, a live process holds the task.
    await leases.acquire(app[redis_key], task_id, owner, int(settings.task_lease_ttl * 1000))
    credits = app[credits_key]
    try:
        await credits.reserve(
            user_id, task_id, feature.cost, ttl=settings.task_timeout + 3 * settings.task_lease_ttl
        )
    except BaseException:
        await leases.release(app[redis_key], task_id, owner)
        raise
    try:
        await app[db_key].execute(
            "INSERT INTO tasks (id, user_id, feature, feature_version, status, cost, inputs, "
            "idempotency_key, "
            "request_hash, runner) VALUES (%s, %s, %s, %s, 'queued', %s, %s, %s, %s, %s)",
            task_id,
            user_id,
            feature.slug,
            feature.version,
            feature.cost,
            json.dumps(inputs),
            key,
            digest,
            owner,
        )
    except Exception as exc:
        await credits.cancel(user_id, task_id, "task not created")
        await leases.release(app[redis_key], task_id, owner)
        if is_duplicate(exc):  # the same key raced us: answer the winner
            found = await _existing(app, user_id, key, digest)
            if found is not None:
                return found, False
        raise
    await app[hub_key].publish(user_id, "task.updated", {"task_id": task_id, "status": "queued"})
    return await get_task(app, user_id, task_id), True


def _render(row: Row, steps: list[Row], outputs: list[dict[str, Any]]) -> dict[str, Any]:
    error = None
    if row["error_code"]:
        error = {"code": row["error_code"], "message": row["error_message"] or ""}
    return {
        "id": str(row["id"]),
        "feature": row["feature"],
        "status": row["status"],
        "progress": round(float(row["progress"]), 4),
        "cost": int(row["cost"]),
        "steps": [
            {
                "id": s["step_id"],
                "parent": s["parent_id"],
                "vendor": s["vendor"],
                "operation": s["operation"],
                "status": s["status"],
                "started_at": _utc(s["started_at"]),
                "finished_at": _utc(s["finished_at"]),
                "error": s["error"],
            }
            for s in steps
        ],
        "outputs": outputs,
        "error": error,
        "created_at": _utc(row["created_at"]),
        "updated_at": _utc(row["updated_at"]),
    }


async def render_rows(app: web.Application, rows: list[Row]) -> list[dict[str, Any]]:
    if not rows:
        return []
    db = app[db_key]
    ids = [str(r["id"]) for r in rows]
    marks = ",".join(["%s"] * len(ids))
    steps = await db.fetchall(
        "SELECT task_id, step_id, parent_id, vendor, operation, status, started_at, finished_at, error "
        f"FROM task_steps WHERE task_id IN ({marks}) ORDER BY id",
        *ids,
    )
    outs = await db.fetchall(
        f"SELECT id, user_id, kind, task_id, storage_key, content_type, width, height, bytes FROM assets "
        f"WHERE task_id IN ({marks}) AND kind = 'output' ORDER BY id",
        *ids,
    )
    storage = app[storage_key]
    by_task: dict[str, list[Row]] = {i: [] for i in ids}
    for s in steps:
        by_task[str(s["task_id"])].append(s)
    outputs: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    for o in outs:
        a = assets.Asset.of(o)
        outputs[str(o["task_id"])].append(
            {
                "asset_id": a.id,
                "url": a.public(storage, app[settings_key].storage_url_ttl)["url"],
                "kind": "image",
            }
        )
    return [_render(r, by_task[str(r["id"])], outputs[str(r["id"])]) for r in rows]


async def get_task(app: web.Application, user_id: int, task_id: str) -> dict[str, Any]:
    row = await app[db_key].fetchone(
        f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = %s AND user_id = %s", task_id, user_id
    )
    if row is None:
        raise NotFound(f"No task {task_id}")
    return (await render_rows(app, [row]))[0]


async def list_tasks(
    app: web.Application, user_id: int, status: str | None, before: str | None, limit: int
) -> list[dict[str, Any]]:
    sql = f"SELECT {_TASK_COLUMNS} FROM tasks WHERE user_id = %s AND id < %s"
    args: list[Any] = [user_id, before or "g"]
    if status:
        sql += " AND status = %s"
        args.append(status)
    rows = await app[db_key].fetchall(sql + " ORDER BY id DESC LIMIT %s", *args, limit)
    return await render_rows(app, rows)


async def cancel_task(app: web.Application, user_id: int, task_id: str) -> dict[str, Any]:
    db = app[db_key]
    row = await db.fetchone("SELECT status FROM tasks WHERE id = %s AND user_id = %s", task_id, user_id)
    if row is None:
        raise NotFound(f"No task {task_id}")
    if row["status"] in FINISHED:
        raise Conflict(f"Task {task_id} is already {row['status']}", details={"status": row["status"]})
    try:
        await app[credits_key].cancel(user_id, task_id, "cancelled by the user")
    except AppError as exc:
        if exc.code == ErrorCode.CONFLICT:  # the credits were confirmed first: it succeeded
            raise Conflict(f"Task {task_id} has already finished") from None
        raise
    if await mark_finished(app, task_id, "cancelled", None):
        await app[hub_key].publish(user_id, "task.updated", {"task_id": task_id, "status": "cancelled"})
    # The instance running it stops at its next lease renewal; this one stops it now.
    await app[redis_key].set(cancel_key(task_id), b"1", ex=3600)
    app[tasks_key].cancel_local(task_id)
    return await get_task(app, user_id, task_id)


async def mark_finished(app: web.Application, task_id: str, status: str, error: AppError | None) -> bool:
    """Move an active task to its final status (once); True if this call did it."""
    changed = await app[db_key].execute(
        "UPDATE tasks SET status = %s, progress = IF(%s = 'succeeded', 1, progress), error_code = %s, "
        "error_message = %s, finished_at = UTC_TIMESTAMP(6) "
        "WHERE id = %s AND status IN ('queued', 'running')",
        status,
        status,
        None if error is None else error.code.value,
        None if error is None else error.message[:500],
        task_id,
    )
    if changed == 1:
        app[metrics_key].tasks_finished.labels(status).inc()
    return changed == 1
