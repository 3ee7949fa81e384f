"""The actor runtime: mailbox loop, ask/tell, supervision, passivation, the system."""

from actors.runtime.actor import Actor
from actors.runtime.mailbox import Envelope, Mailbox, Message
from actors.runtime.refs import ActorRef
from actors.runtime.system import ActorSystem

__all__ = ["Actor", "ActorRef", "ActorSystem", "Envelope", "Mailbox", "Message"]
