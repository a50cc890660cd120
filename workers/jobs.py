"""Lifecycle jobs on arq: the job functions, the typed context they run with, and the one
place that touches arq's internals (``ResilientWorker``, written for arq 0.28: pinned in
pyproject, and tests/unit/test_arq_internals.py fails when an upgrade moves what it uses)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.worker import Function, Retry, Worker, func
from redis.exceptions import NoPermissionError, RedisError

from orchestrator import tracing
from orchestrator.config import WorkerSettings
from orchestrator.keys import queue_wake
from orchestrator.locks import Busy
from orchestrator.placement import NoCapacity, NoSandbox, resource_problem
from orchestrator.queue import Operation, Rejected, Rejection, error_path, names, screen, wake
from orchestrator.records import new_record
from orchestrator.redis_conn import JobRedis
from orchestrator.schemas import LifecycleJob
from orchestrator.store import SessionStore

from .disk import DiskGauge
from .lifecycle import Lifecycle

log = logging.getLogger("workers.jobs")

# The arq minor version ResilientWorker's overrides were written for.
ARQ_WRITTEN_FOR = "0.28"


def _ignore(_: Rejection) -> None:
    return None


@dataclass(frozen=True)
class JobContext:
    """What every job function runs with (instead of arq's untyped ``ctx`` dict)."""

    lifecycle: Lifecycle
    store: SessionStore
    settings: WorkerSettings
    # Told each job's run time (seconds) and operation, for the worker's metrics.
    observe: Callable[[Operation, float], None]
    # Told the reason of each malformed job removed from the queue unrun, for the metrics.
    rejected: Callable[[Rejection], None] = _ignore
    # The sandbox's free disk: a producer's create is refused below the watermark, as placement
    # refuses the API's (None: not measured, as in tests of other things).
    disk: DiskGauge | None = None


async def store_requested(context: JobContext, job: LifecycleJob) -> tuple[str, str] | None:
    """A create job from a producer that bypassed the API: store the session it asks for
    (idempotently: the same id twice is one session) through placement, with this sandbox
    as the only candidate, so its cap, a drain and liveness refuse it as they refuse the
    API, with the API's codes. Returns (code, why) if it cannot."""
    assert job.spec is not None
    settings = context.settings
    if job.generation != 1:
        return "invalid_job", "a create job carrying a spec must be for generation 1"
    if job.spec.id not in (None, job.session):
        return "invalid_job", "spec.id differs from the job's session"
    if job.spec.sandbox not in (None, settings.sandbox_id):
        return "invalid_job", f"spec.sandbox is not this sandbox ({settings.sandbox_id!r})"
    problem = resource_problem(job.spec.resources, settings.max_cpus, settings.max_memory_mb, settings.max_pids)
    if problem:
        return "resources_exceed_sandbox", problem[1]
    request = msgspec.structs.replace(job.spec, id=job.session)
    record = new_record(request, settings.sandbox_id, settings)
    low = await context.disk.low() if context.disk is not None else None
    try:
        await context.store.place(
            record,
            request.env,
            [(settings.sandbox_id, settings.max_sessions)],
            prefer_warm=False,
            low_disk=[settings.sandbox_id] if low else (),
        )
    except NoCapacity as e:
        return "no_capacity", f"{e}: {low}" if low else str(e)
    except NoSandbox as e:
        return "no_sandbox", str(e)
    return None


def job_function(operation: Operation, context: JobContext) -> Function:
    async def run(ctx: dict[str, Any], **kwargs: Any) -> str:
        # Producers in other languages enqueue these: validate like any external input
        # (ResilientWorker.run_job screened the job already; this keeps the types honest).
        try:
            job = msgspec.convert(kwargs, LifecycleJob)
        except msgspec.ValidationError as e:
            # Names and the error path only: the values may hold a session's env.
            log.error("refusing %s job: %s (arguments %s)", operation.value, error_path(e), names(kwargs))
            return f"invalid job: {error_path(e)}"
        # This job's task only: its events and log lines carry the request's trace id.
        tracing.current.set(job.trace)
        log.info("%s %s generation %d started", operation.value, job.session, job.generation)
        if operation is Operation.CREATE and job.spec is not None:
            refused = await store_requested(context, job)
            if refused:
                log.error("refusing create_session for %s: %s: %s", job.session, *refused)
                return f"refused: {refused[0]}: {refused[1]}"
        started = time.monotonic()
        try:
            result = await context.lifecycle.run(operation, job.session, job.generation)
        except Busy:
            # Another operation on this session runs now: queue behind it.
            raise Retry(defer=0.25) from None
        context.observe(operation, time.monotonic() - started)
        log.info("%s %s generation %d: %s", operation.value, job.session, job.generation, result)
        return result

    run.__name__ = operation.value
    return func(run, name=operation.value)


class ResilientWorker(Worker):
    """arq's Worker, except that losing Redis does not end it. arq lets a Redis error in a
    poll escape its main loop, which ends the worker; here a failed poll is logged (once per
    outage) and retried with a backoff, so the worker reconnects by itself when Redis returns.
    Jobs cut off meanwhile are finished by the reconciler (they are idempotent).

    It also screens every job before arq runs it (``run_job``): arq lets a malformed body
    (``"t": "1"``) raise out of its run_job, which ends the worker on every start while the
    job stays queued. A malformed job is removed with its keys, counted and logged instead.

    With ``fallback_s`` > 0 it does not poll when idle: each iteration first blocks in ``BLPOP``
    on the queue's wake-up list (``<queue>:wake``, which every enqueue pushes to) until an
    enqueue wakes it, the earliest deferred job is due (a retry's), one of its own jobs ends (a
    job may have waited for its slot) or ``fallback_s`` passes (for jobs enqueued without a
    wake-up), then polls as arq does. That wait is the only pause: arq's main loop, which would
    sleep out the rest of ``poll_delay`` after a short iteration (and so delay a job enqueued just
    after a poll), gets a ``poll_delay`` of 0.

    arq internals used (all checked by tests/unit/test_arq_internals.py): ``_poll_iteration``
    (called by ``main``'s loop, which sleeps ``poll_delay`` less the iteration's time),
    ``start_jobs(job_ids)`` (which puts each started job's task in ``tasks``, with arq's own
    done callback that frees its slot), ``run_job(job_id, score)``, ``tasks`` (job id -> task),
    ``functions`` (name -> function), ``allow_pick_jobs``, ``health_check_key``, ``queue_name``,
    ``poll_delay_s`` and ``arq.constants``' ``in_progress_key_prefix``, ``job_key_prefix`` and
    ``retry_key_prefix``."""

    _outage_since: float | None = None

    def __init__(
        self,
        *args: Any,
        on_reject: Callable[[Rejection], None] = _ignore,
        fallback_s: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.on_reject = on_reject
        # The BLPOP's reply must come within the socket timeout (WorkerSettings checks its own;
        # a URL's ``socket_timeout=`` may still be shorter).
        socket_timeout = self.pool.connection_pool.connection_kwargs.get("socket_timeout")
        self.fallback_s = min(fallback_s, socket_timeout / 2) if socket_timeout else fallback_s
        # None: arq's own polling, every poll_delay.
        self.wake_key = queue_wake(self.queue_name) if fallback_s > 0 else None
        self._own_poll_delay_s = self.poll_delay_s
        if self.wake_key is not None:
            self.poll_delay_s = 0.0
        self._polled = False  # the first iteration polls at once: there may be work already
        self._job_ended = False  # since the last wait: poll again without waiting
        self._blocked = False  # in BLPOP now: a job's end must push the wake key to end it
        self._wakers: set[asyncio.Task[None]] = set()

    async def run_job(self, job_id: str, score: int) -> None:
        """arq's run_job, for a job whose body passes ``screen``; any other is rejected. A
        Redis error still ends the task (the poll loop treats it as an outage)."""
        rejected = screen(await self.pool.get(job_key_prefix + job_id), self.functions)
        if rejected is None:
            try:
                await super().run_job(job_id, score)
                return
            except (RedisError, OSError):
                raise
            except Exception as e:  # the last line of defence: no job ends the worker
                rejected = Rejected(Rejection.UNRUNNABLE, f"arq raised {type(e).__name__}")
        await self.reject(job_id, rejected)

    async def reject(self, job_id: str, rejected: Rejected) -> None:
        """Remove a job unrun: from the queue, with its body, retry count and in-progress mark."""
        async with self.pool.pipeline(transaction=True) as tr:
            tr.delete(job_key_prefix + job_id, retry_key_prefix + job_id, in_progress_key_prefix + job_id)
            tr.zrem(self.queue_name, job_id)
            await tr.execute()
        log.warning("rejected job %r: %s: %s", job_id[:200], rejected.reason.value, rejected.detail)
        self.on_reject(rejected.reason)

    async def _poll_iteration(self) -> None:
        try:
            # After an outage, poll at once: jobs may have been queued (or woken) meanwhile.
            if self.wake_key is not None and self._polled and self._outage_since is None:
                await self._wait_for_work(self.wake_key)
            self._polled = True
            await super()._poll_iteration()
        except (RedisError, OSError) as e:
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                log.warning("Redis is unreachable (%s): polling again until it is back", e)
            await asyncio.sleep(min(2.0, 0.1 + (time.monotonic() - self._outage_since) / 10))
            return
        if self._outage_since is not None:
            log.info("Redis is back after %.1f s", time.monotonic() - self._outage_since)
            self._outage_since = None
            await self.release_orphaned_jobs()

    async def _wait_for_work(self, wake_key: str) -> None:
        """Block until there may be work (see the class), on one pooled connection: the
        deadline is the earliest deferred job's time, at most ``fallback_s``."""
        now_ms = time.time() * 1000
        timeout = self.fallback_s
        due: list[tuple[bytes, float]] = await self.pool.zrangebyscore(
            self.queue_name, f"({now_ms:.0f}", "+inf", start=0, num=1, withscores=True
        )
        if due:  # +1 ms: BLPOP's timeout is not exact, and the job is not due before its score
            timeout = min(timeout, (due[0][1] - now_ms) / 1000 + 0.001)
        # No await from here to the BLPOP's send: a job that ends sees _blocked, or was seen.
        if self._job_ended or timeout <= 0:
            self._job_ended = False
            return
        self._blocked = True
        try:
            # BLPOP's 0 is "forever": the smallest wait is 1 ms. (redis-py annotates the timeout
            # as int; Redis 6 and later take decimal seconds.)
            await self.pool.blpop([wake_key], timeout=round(max(timeout, 0.001), 3))  # type: ignore[arg-type, misc]
        except NoPermissionError as e:
            # An ACL from before wake-ups: poll as arq does rather than fail every wait as an outage.
            log.error("cannot wait for wake-ups (%s; docs/redis.md): polling every %g s", e, self._own_poll_delay_s)
            self.wake_key, self.poll_delay_s = None, self._own_poll_delay_s
        finally:
            self._blocked = False
            self._job_ended = False  # the poll that follows sees what it ended

    def _on_job_end(self, _: asyncio.Task[Any]) -> None:
        """A started job's task is done (arq's own callback, registered first, has freed its
        slot): a job waiting for a slot, or this one deferred to retry, needs a poll now."""
        self._job_ended = True
        if self._blocked and self.wake_key is not None:
            waker = asyncio.get_running_loop().create_task(self._wake())
            self._wakers.add(waker)
            waker.add_done_callback(self._wakers.discard)

    async def _wake(self) -> None:
        try:
            await wake(self.pool, self.queue_name)
        except (RedisError, OSError):  # the blocked poll fails too, and is retried
            log.debug("could not wake the poll after a job ended", exc_info=True)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq re-checks every queued id on every poll, running ones included (a job stays in
        the queue until it ends): four round trips per running job per poll, 8,000 a second
        for a burst of 20 at our 10 ms poll, which cost the burst more CPU than its Docker
        work. Ids this worker runs now are skipped here, with no Redis call. Each job started
        gets ``_on_job_end`` after arq's own done callback."""
        running = self.tasks
        fresh = {j.decode(): t for j in job_ids if (t := running.get(j.decode())) is None or t.done()}
        if fresh:
            await super().start_jobs([j.encode() for j in fresh])
            for job_id, before in fresh.items():
                started = running.get(job_id)
                if started is not None and started is not before:
                    started.add_done_callback(self._on_job_end)

    async def release_orphaned_jobs(self) -> int:
        """Queued jobs marked in progress that this worker does not run: their run died with
        the connection (or with an earlier worker process), and arq would skip them until the
        mark expires (job_timeout: minutes). One worker consumes a sandbox's queue, so a mark
        not held by this worker is stale."""
        released = 0
        for raw in await self.pool.zrange(self.queue_name, 0, -1):
            job_id = raw.decode() if isinstance(raw, bytes) else str(raw)
            if job_id not in self.tasks and await self.pool.delete(in_progress_key_prefix + job_id):
                released += 1
        if released:
            log.info("released %d queued jobs left marked in progress by a run that died", released)
        return released

    def running(self) -> list[asyncio.Task[Any]]:
        return [t for t in self.tasks.values() if not t.done()]


class JobRunner:
    """Consumes this sandbox's queue with arq, on the process's own Redis client."""

    def __init__(self, redis: JobRedis, queue_name: str, context: JobContext) -> None:
        settings = context.settings
        self.queue_name = queue_name
        # arq's INFO lines print each job's arguments (env included) and result: its
        # worker logs warnings only; job_function logs a start and end line without values.
        logging.getLogger("arq.worker").setLevel(logging.WARNING)
        self.arq = ResilientWorker(
            functions=[job_function(op, context) for op in Operation],
            redis_pool=redis,
            queue_name=queue_name,
            # arq's consumer decodes with its own serializers, not the pool's.
            job_serializer=redis.job_serializer,
            job_deserializer=redis.job_deserializer,
            poll_delay=settings.poll_delay_s,
            max_jobs=settings.max_jobs,
            # Past the operation's own deadline and the coded failure after it (stop + 30 s).
            job_timeout=int(settings.operation_deadline_s) + settings.stop_timeout_s + 60,
            # Jobs are idempotent, so a finished job may run again when re-requested; arq's
            # job key still suppresses duplicates while one is queued or running.
            keep_result=0,
            # A job waiting for a busy session is retried (deferred), not failed.
            max_tries=10_000,
            handle_signals=False,
            on_reject=context.rejected,
            fallback_s=settings.poll_fallback_s,
        )

    def running(self) -> int:
        return len(self.arq.running())

    async def release_orphaned_jobs(self) -> int:
        return await self.arq.release_orphaned_jobs()

    async def run(self) -> None:
        """Poll and run jobs until cancelled (arq's main loop, without its start-up hooks:
        the worker has done its own start-up before this)."""
        await self.arq.main()

    async def finish(self, timeout_s: float) -> None:
        """Take no new job; let the running ones end (bounded), cancel what is left. The
        caller then cancels ``run``. Queued jobs stay queued for the next worker."""
        self.arq.allow_pick_jobs = False
        running = self.arq.running()
        if running:
            await asyncio.wait(running, timeout=timeout_s)
        for task in self.arq.running():
            task.cancel()
        left = self.arq.running()
        if left:
            await asyncio.wait(left, timeout=5)
        with contextlib.suppress(RedisError, OSError):
            await self.arq.pool.delete(self.arq.health_check_key)
