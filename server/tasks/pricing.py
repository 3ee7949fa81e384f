"""What a task costs its user: the feature's `member_cost` while a membership lasts, else `cost`."""

from __future__ import annotations

from server.auth.schemas import membership_json
from server.tasks.deps import TaskDeps
from server.tasks.features import Feature


async def task_cost(deps: TaskDeps, user_id: int, feature: Feature) -> int:
    """Read from the profile cache, which settling and refunding an order drop."""
    if feature.member_cost is None:
        return feature.cost
    record = await deps.profiles.get(user_id)
    return feature.member_cost if record is not None and membership_json(record) else feature.cost
