"""The one mechanism behind every stored state machine (task, step, order, refund).

Each stateful entity has one module that owns its machine: the legal transitions in
one table (a `StateMachine`), and its code changes a row's status only through
`StateMachine.apply`. `apply` is a conditional UPDATE (`WHERE status IN (the legal
sources)`), so of any number of racing callers and instances exactly one moves a row;
the others learn that it is already there (a replay, False) or get the exact
`IllegalTransition`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from server.db import Conn, Database
from server.errors import Conflict, NotFound


class IllegalTransition(Conflict):
    """409 CONFLICT: the row is not in a status this change may start from."""

    def __init__(self, entity: str, key: str, current: str, to: str) -> None:
        super().__init__(
            f"{entity} {key} is {current}; it cannot become {to}",
            details={"status": current, "to": to},
        )
        self.current = current
        self.to = to


@dataclass(frozen=True, slots=True)
class Sql:
    """A column value written as SQL (`Sql("UTC_TIMESTAMP(6)")`), not as a parameter."""

    text: str


@dataclass(frozen=True, slots=True)
class StateMachine:
    """The legal moves of one entity's `status` column in one table."""

    entity: str  # in messages: "task", "order"
    table: str
    keys: tuple[str, ...]  # the columns that name one row
    transitions: frozenset[tuple[str, str]]

    @property
    def statuses(self) -> frozenset[str]:
        return frozenset(s for move in self.transitions for s in move)

    def sources(self, to: str) -> tuple[str, ...]:
        """The statuses a row may be in to move to `to`, in a stable order."""
        return tuple(sorted(frm for frm, dst in self.transitions if dst == to))

    def allows(self, frm: str, to: str) -> bool:
        return (frm, to) in self.transitions

    def check(self, key: str, frm: str, to: str) -> None:
        """Raise the exact IllegalTransition unless `frm → to` is in the table."""
        if not self.allows(frm, to):
            raise IllegalTransition(self.entity, key, frm, to)

    async def apply(
        self, conn: Conn | Database, key: Iterable[Any], to: str, sets: Mapping[str, Any] | None = None
    ) -> bool:
        """Move the row named by `key` (values of `keys`) to `to`, writing `sets` too.

        True: this call moved it (or made a legal `to → to` move). False: it was already
        `to`, and `to → to` is not a move of its own (a replay of a change someone else
        made). Raises IllegalTransition for any other status, NotFound for no such row."""
        key = tuple(key)
        frm = self.sources(to)
        if not frm:
            raise ValueError(f"no {self.entity} moves to {to!r}")
        sets = dict(sets or {})
        columns = ["status = %s"]
        values: list[Any] = [to]
        for column, value in sets.items():
            if isinstance(value, Sql):
                columns.append(f"{column} = {value.text}")
            else:
                columns.append(f"{column} = %s")
                values.append(value)
        where = " AND ".join(f"{k} = %s" for k in self.keys)
        marks = ", ".join(["%s"] * len(frm))
        changed = await conn.execute(
            f"UPDATE {self.table} SET {', '.join(columns)} WHERE {where} AND status IN ({marks})",
            *values,
            *key,
            *frm,
        )
        if changed:
            return True
        current = await conn.fetchval(f"SELECT status FROM {self.table} WHERE {where}", *key)
        name = "/".join(str(k) for k in key)
        if current is None:
            raise NotFound(f"No {self.entity} {name}")
        if current == to:
            # A legal self-move whose columns held these values already (MySQL counts
            # changed rows): done. Otherwise someone else made this change: a replay.
            return self.allows(to, to)
        raise IllegalTransition(self.entity, name, str(current), to)
