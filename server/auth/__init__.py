"""Accounts and authentication (issue 4); docs/auth.md tells the design.

The capability's entry point for handlers: `Auth` (facade.py, built by `open_auth`),
who is calling (`principal_of`, `client_of`, `authenticate`, `Principal`, `Client`) and
the error of a banned account. The wire shapes are in schemas.py.
"""

from __future__ import annotations

from server.auth.facade import Auth, open_auth
from server.auth.login import Client, banned
from server.auth.middleware import authenticate, client_of, principal_of
from server.auth.tokens import Principal

__all__ = [
    "Auth",
    "Client",
    "Principal",
    "authenticate",
    "banned",
    "client_of",
    "open_auth",
    "principal_of",
]
