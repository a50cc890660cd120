"""Lifecycle jobs on arq, serialized as JSON so producers in any language can enqueue them.

Layout (see docs/jobs.md): one arq queue per sandbox, ``<prefix>queue:<sandbox>``; job id
``<operation>:<session>:<generation>``; job body ``{"t": 1, "f": <operation>, "a": [],
"k": {"session": ..., "generation": ...}, "et": <enqueue ms>}``.
"""

from __future__ import annotations

import enum
import json
from typing import Any

from arq.connections import ArqRedis
from arq.jobs import Job

from . import tracing
from .keys import Keys, job_id
from .schemas import LifecycleJob, to_data


class Operation(enum.StrEnum):
    """A lifecycle operation. The values are the arq function names (the job contract)."""

    CREATE = "create_session"
    START = "start_session"
    STOP = "stop_session"
    DELETE = "delete_session"

    @property
    def verb(self) -> str:
        """The short name ("create") that events (``reconcile.resumed``'s ``operation``), lease
        holders and log lines have always shown."""
        return self.value.removesuffix("_session")


def job_serializer(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def job_deserializer(raw: bytes) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(raw)
    return data


def oldest_age_s(oldest: list[tuple[Any, float]], now: float) -> float:
    """Age of a queue's oldest job from ``ZRANGE queue 0 0 WITHSCORES`` (0 when empty): arq
    scores a queued job by when it may run, in ms since the epoch."""
    return max(0.0, now - float(oldest[0][1]) / 1000) if oldest else 0.0


class JobQueue:
    def __init__(self, arq: ArqRedis, keys: Keys) -> None:
        self._arq = arq
        self.keys = keys

    async def enqueue(self, operation: Operation, sandbox: str, session: str, generation: int) -> bool:
        """Enqueue once: False when a job with the same id is queued, running or finished recently."""
        payload = to_data(LifecycleJob(session=session, generation=generation, trace=tracing.current.get()))
        job: Job | None = await self._arq.enqueue_job(
            operation.value,
            _job_id=job_id(operation.value, session, generation),
            _queue_name=self.keys.queue(sandbox),
            **payload,
        )
        return job is not None
