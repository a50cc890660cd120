"""Lifecycle jobs on arq, serialized as JSON so producers in any language can enqueue them.

Layout (see docs/jobs.md): one arq queue per sandbox, ``<prefix>queue:<sandbox>``; job id
``<operation>:<session>:<generation>``; job body ``{"t": 1, "f": <operation>, "a": [],
"k": {"session": ..., "generation": ...}, "et": <enqueue ms>}``. After each enqueue, one
element on ``<queue>:wake`` wakes the queue's worker, which blocks on it instead of polling.
"""

from __future__ import annotations

import enum
import json
import logging
import re
from collections.abc import Container
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from arq.connections import ArqRedis
from arq.jobs import Job
from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import tracing
from .keys import Keys, job_id, queue_wake
from .schemas import LifecycleJob, to_data

log = logging.getLogger("orchestrator.queue")


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


class Rejection(enum.StrEnum):
    """Why a queued job was removed unrun (``orchestrator_jobs_rejected_total{reason}``)."""

    MISSING_BODY = "missing_body"  # an id in the queue with no ``arq:job:<id>``
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    BAD_ENVELOPE = "bad_envelope"  # ``t``, ``f``, ``a``, ``k`` or ``et`` missing or mistyped
    UNKNOWN_FUNCTION = "unknown_function"
    BAD_ARGUMENTS = "bad_arguments"  # ``a`` not empty, or ``k`` not a valid LifecycleJob
    UNRUNNABLE = "unrunnable"  # arq failed on it anyway (a shape this screen misses)


@dataclass(frozen=True)
class Rejected:
    reason: Rejection
    # Names and error paths only, never a value: the arguments may carry a session's env.
    detail: str


class _Envelope(msgspec.Struct):
    """arq's job body, with the types arq's run_job relies on (it compares ``t`` with an
    int and does arithmetic on ``et``: a string there raised inside arq and ended the worker)."""

    f: str
    a: list[Any]
    k: dict[str, Any]
    # ms since the epoch, any JSON number arq can turn into a datetime (year 9999 at most).
    et: Annotated[float, msgspec.Meta(ge=0, le=253_402_300_799_999)]
    t: Annotated[int, msgspec.Meta(ge=0)] | None = None  # arq's enqueue_job writes null


_PATH = re.compile(r" - at (`[^`]*`(?: in `[^`]*`)?)$")


def error_path(e: msgspec.ValidationError) -> str:
    """Where a validation failed, without the message (msgspec's message may quote the
    offending value, e.g. ``Invalid enum value '...'``)."""
    text = str(e)
    if text.startswith("Object contains unknown field") or text.startswith("Object missing required field"):
        return text  # names a field, not a value
    found = _PATH.search(text)
    return f"invalid at {found.group(1)}" if found else "invalid"


def names(kwargs: dict[str, Any]) -> list[str]:
    """A job's argument names, bounded, for a log line (its values never go there)."""
    return sorted(str(k)[:40] for k in kwargs)[:12]


def screen(raw: bytes | None, functions: Container[str]) -> Rejected | None:
    """Check a job body before arq touches it: None when arq can run it and the function
    will accept its arguments. Producers in any language write these (docs/jobs.md)."""
    if raw is None:
        return Rejected(Rejection.MISSING_BODY, "no job body")
    try:
        body = json.loads(raw)
    except ValueError:
        return Rejected(Rejection.NOT_JSON, "the body is not JSON")
    if not isinstance(body, dict):
        return Rejected(Rejection.NOT_OBJECT, f"the body is a JSON {type(body).__name__}, not an object")
    try:
        envelope = msgspec.convert(body, _Envelope)
    except msgspec.ValidationError as e:
        return Rejected(Rejection.BAD_ENVELOPE, error_path(e))
    if envelope.f not in functions:
        return Rejected(Rejection.UNKNOWN_FUNCTION, "f names no lifecycle function")
    if envelope.a:
        return Rejected(Rejection.BAD_ARGUMENTS, "positional arguments (a) must be empty")
    try:
        msgspec.convert(envelope.k, LifecycleJob)
    except msgspec.ValidationError as e:
        return Rejected(Rejection.BAD_ARGUMENTS, f"k {error_path(e)}; argument names {names(envelope.k)}")
    return None


def oldest_age_s(oldest: list[tuple[Any, float]], now: float) -> float:
    """Age of a queue's oldest job from ``ZRANGE queue 0 0 WITHSCORES`` (0 when empty): arq
    scores a queued job by when it may run, in ms since the epoch."""
    return max(0.0, now - float(oldest[0][1]) / 1000) if oldest else 0.0


# A wake-up nobody took (its worker is gone, its sandbox retired) does not outlive this.
WAKE_TTL_MS = 60_000


async def wake(redis: Redis, queue: str) -> None:
    """Wake the queue's worker: one element on its wake-up list, trimmed to one (a burst of
    enqueues is one wake-up, not one poll each), with a TTL. Sent after the job is committed, so
    a worker woken by it finds the job; a wake-up lost (the sender died first) costs at most the
    worker's fallback poll (ORCH_POLL_FALLBACK)."""
    key = queue_wake(queue)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.lpush(key, 1)
        pipe.ltrim(key, 0, 0)
        pipe.pexpire(key, WAKE_TTL_MS)
        await pipe.execute()


class JobQueue:
    def __init__(self, arq: ArqRedis, keys: Keys) -> None:
        self._arq = arq
        self.keys = keys

    async def enqueue(self, operation: Operation, sandbox: str, session: str, generation: int) -> bool:
        """Enqueue once: False when a job with the same id is queued, running or finished recently."""
        payload = to_data(LifecycleJob(session=session, generation=generation, trace=tracing.current.get()))
        queue = self.keys.queue(sandbox)
        job: Job | None = await self._arq.enqueue_job(
            operation.value, _job_id=job_id(operation.value, session, generation), _queue_name=queue, **payload
        )
        if job is None:
            return False
        try:
            await wake(self._arq, queue)
        except (RedisError, OSError) as e:  # the job is queued: its worker's fallback poll finds it
            log.warning("enqueued %s but could not wake its worker (%s)", job.job_id, e)
        return True
