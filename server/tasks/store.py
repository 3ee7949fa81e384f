"""Tasks: create (idempotent, credits reserved), read, list, cancel.

Credits decide every race: the user actor's phase transition (reserved →
confirmed | cancelled) happens first and only once; the task's status follows
it. So a cancel that loses to a success answers 409 and the user is charged; a
cancel that wins makes the runner's confirm fail and the task ends cancelled.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from typing import Any, Literal

from loguru import logger

from server.db import Row, is_duplicate
from server.errors import AppError, Busy, Conflict, ErrorCode, NotFound, validation_failed
from server.media import assets
from server.tasks import leases, states
from server.tasks.deps import TaskDeps
from server.tasks.features import Feature
from server.tasks.leases import cancel_key
from server.tasks.pricing import task_cost
from server.tasks.slots import Run, RunSlot
from server.timing import backoff_delay, rfc3339, utcnow

# `new`: the row claims its Idempotency-Key while the credits are reserved; it is not
# shown, listed or run until it becomes `queued` (or is deleted when the submission fails).
WITHDRAW_ATTEMPTS = 4


_TASK_COLUMNS = (
    "id, user_id, feature, feature_version, status, progress, cost, inputs, idempotency_key, request_hash, "
    "attempts, error_code, error_message, created_at, updated_at"
)


def request_hash(feature: str, inputs: dict[str, Any]) -> str:
    canonical = json.dumps({"feature": feature, "inputs": inputs}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def resolve_inputs(
    deps: TaskDeps, user_id: int, feature: Feature, raw: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, assets.Asset]]:
    """The task's inputs checked against the feature, and its image inputs: they must be
    the caller's assets (by id)."""
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
    mine = await assets.owned(deps.db, user_id, sorted(set(images.values())))
    for name, asset_id in images.items():
        if asset_id not in mine:
            errors.append({"field": f"inputs.{name}", "message": "no such asset of yours"})
    if errors:
        raise validation_failed(errors)
    return out, mine


async def _existing(deps: TaskDeps, user_id: int, key: str, digest: str) -> dict[str, Any] | None:
    """The task already made with this key, or None. A submission of it still in progress
    (status `new`) is waited for: it ends scheduled (that task) or withdrawn (None)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deps.settings.tasks.lease_ttl
    delay = 0.005
    while True:
        row = await deps.db.fetchone(
            "SELECT id, request_hash, status FROM tasks WHERE user_id = %s AND idempotency_key = %s",
            user_id,
            key,
        )
        if row is None:
            return None
        if row["request_hash"] != digest:
            raise AppError(
                ErrorCode.IDEMPOTENCY_CONFLICT, "This Idempotency-Key was used with a different request body"
            )
        if row["status"] != "new":
            return await get_task(deps, user_id, str(row["id"]))
        if loop.time() >= deadline:
            raise Busy("A request with this Idempotency-Key is still being submitted; retry shortly")
        await asyncio.sleep(delay)  # the other submission takes a few round trips
        delay = min(delay * 2, 0.1)


async def create_task(
    deps: TaskDeps,
    claim: Callable[[], RunSlot],
    user_id: int,
    key: str,
    feature_slug: str,
    raw_inputs: dict[str, Any],
) -> tuple[dict[str, Any], bool]:
    """(task, created): created means reserved and scheduled. A repeat of a key with the
    same body answers the first task. Any error leaves nothing written.

    The key is looked up only when it matters: the insert of the new row finds a repeat
    (a duplicate key), and an error answer first checks whether the key already has a
    task, which a repeat answers whatever changed since (the feature, the inputs, the
    runner's room). So a new task costs no lookup round trip."""
    digest = request_hash(feature_slug, raw_inputs)
    try:
        feature = await deps.features.get_enabled(feature_slug)
        if feature is None:
            raise validation_failed([{"field": "feature", "message": f"no feature {feature_slug!r}"}])
        inputs, images = await resolve_inputs(deps, user_id, feature, raw_inputs)
    except AppError as exc:
        return await _first_or_raise(deps, user_id, key, digest, exc)
    for _ in range(3):  # again only when a concurrent submission of this key was withdrawn
        try:
            slot = claim()  # a full runner: BUSY before anything is written
        except Busy as exc:
            return await _first_or_raise(deps, user_id, key, digest, exc)
        with slot:
            outcome = await _submit(deps, slot, user_id, key, digest, feature, inputs, images)
        if outcome is not None:
            return outcome
    raise Busy("A request with this Idempotency-Key is still being submitted; retry shortly")


async def _first_or_raise(
    deps: TaskDeps, user_id: int, key: str, digest: str, error: AppError
) -> tuple[dict[str, Any], bool]:
    """A submission that would answer `error`: a repeat of a key answers its first task
    instead, whatever changed since (the feature, the inputs, the runner's room)."""
    found = await _existing(deps, user_id, key, digest)
    if found is None:
        raise error
    return found, False


async def _submit(
    deps: TaskDeps,
    slot: RunSlot,
    user_id: int,
    key: str,
    digest: str,
    feature: Feature,
    inputs: dict[str, Any],
    images: dict[str, assets.Asset],
) -> tuple[dict[str, Any], bool] | None:
    """Claim the key with an invisible `new` row, reserve, then make it `queued` and run it.
    None: the key was claimed by a submission that was then withdrawn."""
    db, redis = deps.db, deps.redis
    settings = deps.settings
    task_id = assets.new_id()
    owner = deps.owner
    cost = await task_cost(deps, user_id, feature)
    created = utcnow()
    # The lease first: from the moment the row exists, a live process holds the task.
    leased_at = asyncio.get_running_loop().time()
    await leases.acquire(redis, task_id, owner, int(settings.tasks.lease_ttl * 1000))
    inserted = scheduled = False
    reserved: bool | None = False  # None: unknown (the ask failed without an answer)
    try:
        try:
            await db.execute(
                "INSERT INTO tasks (id, user_id, feature, feature_version, status, cost, inputs, "
                "idempotency_key, request_hash, runner, created_at, updated_at) "
                "VALUES (%s, %s, %s, %s, 'new', %s, %s, %s, %s, %s, %s, %s)",
                task_id, user_id, feature.slug, feature.version, cost, json.dumps(inputs),
                key, digest, owner, created, created,
            )  # fmt: skip
        except Exception as exc:
            if not is_duplicate(exc):
                raise
            # The same key raced us and nothing was reserved here: answer the winner.
            found = await _existing(deps, user_id, key, digest)
            return None if found is None else (found, False)
        inserted, reserved = True, None
        try:
            await deps.credits.reserve(
                user_id, task_id, cost, ttl=settings.tasks.timeout + 3 * settings.tasks.lease_ttl
            )
        except AppError as exc:
            if exc.code == ErrorCode.QUOTA_INSUFFICIENT:
                reserved = False
            raise
        reserved = True
        queued = utcnow()
        if not await states.schedule(db, task_id, queued):
            # Recovery judged it abandoned (it outlived its lease) and failed it: the truth is that row.
            scheduled = True
            return await get_task(deps, user_id, task_id), False
        row = {
            "id": task_id, "user_id": user_id, "feature": feature.slug, "feature_version": feature.version,
            "status": "queued", "progress": 0.0, "cost": cost, "inputs": json.dumps(inputs),
            "attempts": 1, "error_code": None, "error_message": None,
            "created_at": created, "updated_at": queued,
        }  # fmt: skip
        await deps.hub.publish(user_id, "task.updated", {"task_id": task_id, "status": "queued"})
        await slot.spawn(Run(row, leased_at, feature, images))
        scheduled = True
        return _render(row, [], []), True
    finally:
        if not scheduled:
            await asyncio.shield(_withdraw(deps, user_id, task_id, inserted=inserted, reserved=reserved))


async def _withdraw(
    deps: TaskDeps, user_id: int, task_id: str, *, inserted: bool, reserved: bool | None
) -> None:
    """Undo a submission that answers an error: its reservation, its row, its lease. Each
    step is idempotent and retried a few times (the error may be a full MySQL pool); what
    still cannot be undone, recovery fails later (a `new` row whose lease expired)."""
    for attempt in range(WITHDRAW_ATTEMPTS):
        try:
            if reserved is not False:
                try:
                    await deps.credits.cancel(user_id, task_id, "task not created")
                except AppError as exc:
                    if exc.code != ErrorCode.NOT_FOUND:  # NOT_FOUND: the reserve never happened
                        raise
            if inserted:
                await deps.db.execute("DELETE FROM tasks WHERE id = %s AND status = 'new'", task_id)
            await leases.release(deps.redis, task_id, deps.owner)
            return
        except Exception:
            if attempt == WITHDRAW_ATTEMPTS - 1:
                logger.opt(exception=True).error("could not withdraw the submission of task {}", task_id)
                return
            await asyncio.sleep(backoff_delay(attempt + 1, 0.1, 1.0))


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
                "started_at": rfc3339(s["started_at"]),
                "finished_at": rfc3339(s["finished_at"]),
                "error": s["error"],
            }
            for s in steps
        ],
        "outputs": outputs,
        "error": error,
        "created_at": rfc3339(row["created_at"]),
        "updated_at": rfc3339(row["updated_at"]),
    }


async def render_rows(deps: TaskDeps, rows: list[Row]) -> list[dict[str, Any]]:
    if not rows:
        return []
    db = deps.db
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
    storage = deps.storage
    by_task: dict[str, list[Row]] = {i: [] for i in ids}
    for s in steps:
        by_task[str(s["task_id"])].append(s)
    outputs: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    for o in outs:
        a = assets.Asset.of(o)
        outputs[str(o["task_id"])].append(
            {
                "asset_id": a.id,
                "url": a.public(storage, deps.settings.storage.url_ttl)["url"],
                "kind": "image",
            }
        )
    return [_render(r, by_task[str(r["id"])], outputs[str(r["id"])]) for r in rows]


async def get_task(deps: TaskDeps, user_id: int, task_id: str) -> dict[str, Any]:
    row = await deps.db.fetchone(
        f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = %s AND user_id = %s AND status <> 'new'",
        task_id,
        user_id,
    )
    if row is None:
        raise NotFound(f"No task {task_id}")
    return (await render_rows(deps, [row]))[0]


async def list_tasks(
    deps: TaskDeps, user_id: int, status: str | None, before: str | None, limit: int
) -> list[dict[str, Any]]:
    sql = f"SELECT {_TASK_COLUMNS} FROM tasks WHERE user_id = %s AND id < %s AND status <> 'new'"
    args: list[Any] = [user_id, before or "g"]
    if status:
        sql += " AND status = %s"
        args.append(status)
    rows = await deps.db.fetchall(sql + " ORDER BY id DESC LIMIT %s", *args, limit)
    return await render_rows(deps, rows)


async def recent(deps: TaskDeps, limit: int) -> list[dict[str, Any]]:
    """The newest tasks of every user (the ops dashboard): ids start with their creation
    time in ms, so the primary key gives the order."""
    rows = await deps.db.fetchall(
        "SELECT id, user_id, feature, status, progress, created_at, error_code "
        "FROM tasks ORDER BY id DESC LIMIT %s",
        limit,
    )
    return [{**r, "progress": float(r["progress"] or 0)} for r in rows]


async def cancel_task(
    deps: TaskDeps, cancel_local: Callable[[str], None], user_id: int, task_id: str
) -> dict[str, Any]:
    db = deps.db
    row = await db.fetchone("SELECT status FROM tasks WHERE id = %s AND user_id = %s", task_id, user_id)
    if row is None or row["status"] == "new":
        raise NotFound(f"No task {task_id}")
    if row["status"] in states.FINISHED:
        raise Conflict(f"Task {task_id} is already {row['status']}", details={"status": row["status"]})
    try:
        await deps.credits.cancel(user_id, task_id, "cancelled by the user")
    except AppError as exc:
        if exc.code == ErrorCode.CONFLICT:  # the credits were confirmed first: it succeeded
            raise Conflict(f"Task {task_id} has already finished") from None
        raise
    if await finish(deps, task_id, "cancelled", None):
        await deps.hub.publish(user_id, "task.updated", {"task_id": task_id, "status": "cancelled"})
    # The instance running it stops at its next lease renewal; this one stops it now.
    await deps.redis.set(cancel_key(task_id), b"1", ex=3600)
    cancel_local(task_id)
    return await get_task(deps, user_id, task_id)


async def finish(
    deps: TaskDeps, task_id: str, status: Literal["succeeded", "failed", "cancelled"], error: AppError | None
) -> bool:
    """The task's final status (states.finish), counted in wardrobe_tasks_finished_total."""
    if await states.finish(deps.db, task_id, status, error):
        deps.metrics.tasks_finished.labels(status).inc()
        return True
    return False
