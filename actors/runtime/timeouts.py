"""Ask timeouts in coarse slots: one loop timer per slot, not one per ask.

`loop.call_later` per ask costs a TimerHandle and a push into the loop's timer heap, whose
comparisons run in Python; with a thousand asks in flight that was a third of an ask's
cost. Here an ask costs two dict operations: it joins the slot its deadline rounds up to,
and leaves it when answered. A slot's single timer fails whatever is still in it.
Deadlines fire up to `resolution` late; for asks measured in seconds that is noise.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from actors.errors import AskTimeout

if TYPE_CHECKING:
    from actors.runtime.actor import Actor

#: reply future -> (actor, message, timeout)
Slot = dict["asyncio.Future[Any]", tuple["Actor[Any]", object, float]]


class AskTimer:
    __slots__ = ("_loop", "_slots", "_timers", "resolution")

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float = 0.01) -> None:
        self._loop = loop
        self._slots: dict[int, Slot] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self.resolution = resolution

    def add(self, reply: asyncio.Future[Any], actor: Actor[Any], msg: object, timeout: float) -> Slot:
        """Fail `reply` with AskTimeout after `timeout` seconds unless it is done by then.
        Returns the slot; the asker removes its reply from it once answered."""
        index = int((self._loop.time() + timeout) / self.resolution) + 1
        slot = self._slots.get(index)
        if slot is None:
            slot = self._slots[index] = {}
            self._timers[index] = self._loop.call_at(index * self.resolution, self._fire, index)
        slot[reply] = (actor, msg, timeout)
        return slot

    def _fire(self, index: int) -> None:
        del self._timers[index]
        for reply, (actor, msg, timeout) in self._slots.pop(index, {}).items():
            if not reply.done():
                actor._kind.stats.ask_timeouts += 1
                reply.set_exception(AskTimeout(actor.id, type(msg).__name__, timeout))

    def close(self) -> None:
        """Cancel the slot timers (every ask has been answered by then)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._slots.clear()

    def __len__(self) -> int:
        """Asks waiting for a reply."""
        return sum(len(slot) for slot in self._slots.values())
