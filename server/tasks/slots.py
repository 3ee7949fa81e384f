"""A claimed place in the task runner, taken before a submission writes anything, and
the run it schedules.

The TaskManager makes the slots (`TaskManager.claim`); the submission either spawns its
run in the slot or gives it back when it leaves the `with` block, whatever happened.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from server.media.assets import Asset
from server.tasks.features import Feature

TaskRow = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Run:
    """One run of a task: its row, and what the submission already read and checked (so
    the run does not read it again); a recovered run has neither and reads both."""

    row: TaskRow
    leased_at: float  # loop time when this process took or renewed the task's lease
    feature: Feature | None = None
    inputs: Mapping[str, Asset] | None = None  # the input assets by id, the user's own


class RunSlot:
    def __init__(self, give_back: Callable[[], None], run: Callable[[Run], Awaitable[None]]) -> None:
        self._give_back: Callable[[], None] | None = give_back
        self._run = run

    async def spawn(self, run: Run) -> None:
        """Schedule the task's run in this slot (the caller holds the task's lease)."""
        if self._give_back is None:
            raise RuntimeError("this run slot was used or given back already")
        self.release()  # the scheduler counts the job from here on
        await self._run(run)

    def release(self) -> None:
        if self._give_back is not None:
            give_back, self._give_back = self._give_back, None
            give_back()

    def __enter__(self) -> RunSlot:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()
