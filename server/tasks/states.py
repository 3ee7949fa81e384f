"""The task and step state machines: every status change of a task or a step goes
through this module (docs/tasks.md has the tables as pictures).

Task:
    new ──▶ queued ──▶ running ──▶ succeeded
     │        │  ▲        │ ╲
     │        │  └────────┘  ╲──▶ failed | cancelled
     ▼        ▼   (recovery re-queues a run left by a dead process)
   failed   failed | cancelled

`new` is the invisible claim of an Idempotency-Key while the credits are reserved; a
submission that fails deletes it (nothing of it is ever shown). The credits decide
every race between finishing moves (the user actor settles a reservation once), so a
finishing move that finds the task already finished lost that race: `finish` answers
False. Any other illegal move raises the exact IllegalTransition.

Step (a row of task_steps; a later attempt of the task runs its steps again):
    (none) ──▶ running ──▶ succeeded | failed | cancelled ──▶ running
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from server.db import Conn, Database
from server.errors import AppError
from server.statemachine import IllegalTransition, Sql, StateMachine

TaskStatus = Literal["new", "queued", "running", "succeeded", "failed", "cancelled"]
StepStatus = Literal["running", "succeeded", "failed", "cancelled"]

ACTIVE: tuple[TaskStatus, ...] = ("queued", "running")
FINISHED: tuple[TaskStatus, ...] = ("succeeded", "failed", "cancelled")

TASK = StateMachine(
    entity="task",
    table="tasks",
    keys=("id",),
    transitions=frozenset(
        {
            ("new", "queued"),  # the submission reserved the credits and scheduled it
            ("new", "failed"),  # its submission died half-way (recovery)
            ("queued", "running"),
            ("queued", "queued"),  # recovery hands a run nobody holds to this process
            ("running", "queued"),  # recovery re-runs a task whose process died
            ("queued", "failed"),
            ("queued", "cancelled"),
            ("running", "succeeded"),
            ("running", "failed"),
            ("running", "cancelled"),
        }
    ),
)

STEP = StateMachine(
    entity="step",
    table="task_steps",
    keys=("task_id", "step_id"),
    transitions=frozenset(
        {(frm, to) for frm in ("running",) for to in ("succeeded", "failed", "cancelled")}
        | {(frm, "running") for frm in ("succeeded", "failed", "cancelled")}
    ),
)


async def schedule(conn: Conn | Database, task_id: str, at: Any) -> bool:
    """new → queued, its first attempt (False: recovery failed it meanwhile)."""
    try:
        return await TASK.apply(conn, (task_id,), "queued", {"attempts": 1, "updated_at": at})
    except IllegalTransition:
        return False


async def requeue(conn: Conn | Database, task_id: str, runner: str) -> bool:
    """A task nobody holds becomes this process's to run again from its first step."""
    return await TASK.apply(conn, (task_id,), "queued", {"progress": 0, "runner": runner})


async def start(conn: Conn | Database, task_id: str) -> bool:
    """queued → running; False when it is no longer queued (cancelled before it began)."""
    try:
        return await TASK.apply(
            conn, (task_id,), "running", {"started_at": Sql("COALESCE(started_at, UTC_TIMESTAMP(6))")}
        )
    except IllegalTransition:
        return False


async def finish(
    conn: Conn | Database,
    task_id: str,
    status: Literal["succeeded", "failed", "cancelled"],
    error: AppError | None,
) -> bool:
    """Move an unfinished task to its final status, once; True if this call did it. A task
    already finished lost the credits' race to whoever finished it: False."""
    sets: dict[str, Any] = {
        "error_code": None if error is None else error.code.value,
        "error_message": None if error is None else error.message[:500],
        "finished_at": Sql("UTC_TIMESTAMP(6)"),
    }
    if status == "succeeded":
        sets["progress"] = 1
    try:
        return await TASK.apply(conn, (task_id,), status, sets)
    except IllegalTransition as exc:
        if exc.current in FINISHED:
            return False
        raise


async def start_step(
    conn: Conn | Database,
    task_id: str,
    step_id: str,
    attempt: int,
    *,
    parent: str | None,
    vendor: str | None,
    operation: str | None,
) -> None:
    """A step starts: its row is made, or a later attempt runs it again (STEP: → running)."""
    await conn.execute(
        "INSERT INTO task_steps (task_id, step_id, parent_id, vendor, operation, status, attempt, "
        "started_at) VALUES (%s, %s, %s, %s, %s, 'running', %s, UTC_TIMESTAMP(6)) "
        "ON DUPLICATE KEY UPDATE status = 'running', attempt = VALUES(attempt), "
        "started_at = UTC_TIMESTAMP(6), finished_at = NULL, error = NULL",
        task_id, step_id, parent, vendor, operation, attempt,
    )  # fmt: skip


async def finish_step(
    conn: Conn | Database,
    task_id: str,
    step_id: str,
    status: Literal["succeeded", "failed", "cancelled"],
    error: str | None = None,
) -> bool:
    """running → succeeded | failed | cancelled."""
    sets: Mapping[str, Any] = {
        "error": None if error is None else error[:500],
        "finished_at": Sql("UTC_TIMESTAMP(6)"),
    }
    return await STEP.apply(conn, (task_id, step_id), status, sets)
