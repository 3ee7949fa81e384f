"""Actors: long-lived asyncio objects that own state which must be serialised or throttled.

See docs/actors.md for the rules, the lifecycle and how to add a kind.
"""

from actors.errors import ActorStopped, AskTimeout, MailboxFull, SystemClosed
from actors.metrics import KindSnapshot, MailboxSnapshot, SystemSnapshot
from actors.runtime import Actor, ActorRef, ActorSystem, Envelope, Message

__all__ = [
    "Actor",
    "ActorRef",
    "ActorStopped",
    "ActorSystem",
    "AskTimeout",
    "Envelope",
    "KindSnapshot",
    "MailboxFull",
    "MailboxSnapshot",
    "Message",
    "SystemClosed",
    "SystemSnapshot",
]
