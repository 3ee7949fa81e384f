"""The distributor's status machine: the one table of legal moves.

pending ──▶ approved
    └────▶ rejected
"""

from __future__ import annotations

from server.statemachine import StateMachine

MACHINE = StateMachine(
    entity="distributor",
    table="distributors",
    keys=("user_id",),
    transitions=frozenset({("pending", "approved"), ("pending", "rejected")}),
)
