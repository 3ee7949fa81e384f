"""Distributors (issue 13): users who bring in buyers, with an encrypted identity.
`Distributors` (facade.py) is the entry point; docs/pii.md tells the design."""

from __future__ import annotations

from server.distributors.facade import Caller, Distributors

__all__ = ["Caller", "Distributors"]
