"""Type variables and aliases of the actor runtime, in one place."""

from __future__ import annotations

from collections.abc import Hashable
from typing import TypeVar

#: The message type an actor kind accepts (usually a union of frozen dataclasses).
M = TypeVar("M")
#: A reply type, carried by `Message[R]` so that `ask` returns it.
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
#: Any item of a mailbox.
T = TypeVar("T")

#: The key of a keyed actor (a user id, say).
Key = Hashable
