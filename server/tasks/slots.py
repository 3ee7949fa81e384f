"""A claimed place in the task runner, taken before a submission writes anything.

The TaskManager makes them (`TaskManager.claim`); the submission either spawns its
run in the slot or gives it back when it leaves the `with` block, whatever happened.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

TaskRow = Mapping[str, Any]


class RunSlot:
    def __init__(self, give_back: Callable[[], None], run: Callable[[TaskRow], Awaitable[None]]) -> None:
        self._give_back: Callable[[], None] | None = give_back
        self._run = run

    async def spawn(self, row: TaskRow) -> None:
        """Schedule the task's run in this slot (the caller holds the task's lease)."""
        if self._give_back is None:
            raise RuntimeError("this run slot was used or given back already")
        self.release()  # the scheduler counts the job from here on
        await self._run(row)

    def release(self) -> None:
        if self._give_back is not None:
            give_back, self._give_back = self._give_back, None
            give_back()

    def __enter__(self) -> RunSlot:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()
