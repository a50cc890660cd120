"""The object graph both sides share: one Redis client (shared with arq), the key layout,
the event bus, the session store, the sandbox registry and the job queue. The API and the
worker each build one ``Core`` per process with ``connect``."""

from __future__ import annotations

from dataclasses import dataclass

from .config import SharedSettings
from .events import EventBus
from .keys import Keys
from .queue import JobQueue
from .redis_conn import JobRedis, redis_client
from .sandboxes import SandboxRegistry
from .store import SessionStore


@dataclass(frozen=True)
class Core:
    redis: JobRedis
    keys: Keys
    bus: EventBus
    store: SessionStore
    sandboxes: SandboxRegistry
    queue: JobQueue

    async def aclose(self) -> None:
        await self.redis.aclose()


def connect(settings: SharedSettings, *, max_connections: int | None = None, pool_timeout_s: float = 5.0) -> Core:
    """Build the graph; connections open lazily, on first use, at most ``max_connections``."""
    redis = redis_client(settings, max_connections=max_connections, pool_timeout_s=pool_timeout_s)
    keys = Keys(settings.key_prefix)
    bus = EventBus(redis, keys, firehose_maxlen=settings.firehose_maxlen, session_maxlen=settings.session_stream_maxlen)
    return Core(
        redis=redis,
        keys=keys,
        bus=bus,
        store=SessionStore(redis, bus, tombstone_ttl_s=settings.tombstone_ttl_s),
        sandboxes=SandboxRegistry(redis, keys),
        queue=JobQueue(redis, keys),
    )
