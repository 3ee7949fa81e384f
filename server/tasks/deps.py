"""What the task code needs, passed in once by the composition root (server/app.py)."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from server.auth.users import Profiles
from server.config import Settings
from server.credits.facade import Credits
from server.db import Database
from server.hub.events import EventHub
from server.media.storage import Storage
from server.metrics import Metrics
from server.tasks.features import FeatureStore


@dataclass(frozen=True, slots=True)
class TaskDeps:
    settings: Settings
    db: Database
    redis: Redis
    credits: Credits
    hub: EventHub
    storage: Storage
    features: FeatureStore
    profiles: Profiles
    metrics: Metrics
    owner: str  # this process's instance id: the holder named in the tasks' leases
