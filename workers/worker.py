"""The arq worker of one sandbox: its queue, its job functions, its heartbeat."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from typing import Any

import aiohttp
import msgspec
import redis.asyncio as aioredis
from aiodocker.exceptions import DockerError
from arq.constants import in_progress_key_prefix
from arq.worker import Retry, Worker, func
from redis.exceptions import RedisError

from orchestrator import __version__, tracing
from orchestrator.config import Settings
from orchestrator.events import EventBus, make_event
from orchestrator.locks import Busy, SessionLocks
from orchestrator.metrics import Histogram, family
from orchestrator.names import Keys, address_pool
from orchestrator.placement import resource_problem
from orchestrator.queue import JobQueue, Operation, job_deserializer, job_serializer, oldest_age_s
from orchestrator.redis_conn import arq_redis_settings, redis_client
from orchestrator.schemas import DrainRequest, LifecycleJob, SandboxInfo, SessionRecord, now_rfc3339, to_data
from orchestrator.service import new_record
from orchestrator.states import SessionState
from orchestrator.store import SessionStore

from . import firewall
from .lifecycle import Lifecycle
from .pool import WarmPool
from .privilege import PrivilegeProfile, candidates, read_bounding_set
from .reconciler import Reconciler
from .runtime import DesktopError, DesktopRuntime

log = logging.getLogger("workers.worker")
S = SessionState

# A sandbox's info key outlives its heartbeats by a day, so a silent sandbox is listed (as
# unavailable) rather than forgotten at once.
SANDBOX_INFO_TTL_S = 86400
# The heartbeat and the health check ask the sandbox's dockerd at most this long: a daemon
# that is restarting must not hold up the heartbeat (the sandbox would look lost).
DOCKER_PROBE_TIMEOUT_S = 2.0


def _decode_drain(raw: bytes) -> DrainRequest:
    try:
        return msgspec.json.decode(raw, type=DrainRequest)
    except msgspec.DecodeError:
        return DrainRequest()


def _machine_memory_mb() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError):
        return 0


def _job(operation: Operation) -> Any:
    async def run(ctx: dict[str, Any], **kwargs: Any) -> str:
        # Producers in other languages enqueue these: validate like any external input.
        try:
            job = msgspec.convert(kwargs, LifecycleJob)
        except msgspec.ValidationError as e:
            log.error("refusing %s job with invalid arguments %r: %s", operation.value, kwargs, e)
            return f"invalid job: {e}"
        lifecycle: Lifecycle = ctx["lifecycle"]
        # This job's task only: its events and log lines carry the request's trace id.
        tracing.current.set(job.trace)
        if operation is Operation.CREATE and job.spec is not None:
            problem = await ctx["sandbox_worker"].store_requested(job)
            if problem:
                log.error("refusing create_session for %s: %s", job.session, problem)
                return f"invalid job: {problem}"
        started = time.monotonic()
        try:
            result = await lifecycle.run(operation.value.removesuffix("_session"), job.session, job.generation)
        except Busy:
            # Another operation on this session runs now: queue behind it.
            raise Retry(defer=0.25) from None
        ctx["sandbox_worker"].job_seconds.observe(time.monotonic() - started, operation=operation.value)
        log.info("%s %s generation %d: %s", operation.value, job.session, job.generation, result)
        return result

    run.__name__ = operation.value
    return func(run, name=operation.value)


class ResilientWorker(Worker):
    """arq's Worker, except that losing Redis does not end it. arq lets a Redis error in a
    poll escape its main loop, which ends the worker; here a failed poll is logged (once per
    outage) and retried with a backoff, so the worker reconnects by itself when Redis returns.
    Jobs cut off meanwhile are finished by the reconciler (they are idempotent)."""

    _outage_since: float | None = None

    async def _poll_iteration(self) -> None:
        try:
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

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq re-checks every queued id on every poll, running ones included (a job stays in
        the queue until it ends): four round trips per running job per poll, 8,000 a second
        for a burst of 20 at our 10 ms poll, which cost the burst more CPU than its Docker
        work. Ids this worker runs now are skipped here, with no Redis call."""
        running = self.tasks
        fresh = [j for j in job_ids if (t := running.get(j.decode())) is None or t.done()]
        if fresh:
            await super().start_jobs(fresh)

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


class SandboxWorker:
    """Owns the connections of one worker process and the arq Worker that uses them."""

    def __init__(self, settings: Settings) -> None:
        tracing.install()
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.redis: aioredis.Redis = redis_client(settings)
        self.bus = EventBus(
            self.redis,
            self.keys,
            firehose_maxlen=settings.firehose_maxlen,
            session_maxlen=settings.session_stream_maxlen,
        )
        self.store = SessionStore(self.redis, self.bus)
        # Decided for real at start-up (see choose_privilege); this is the first candidate.
        self.profile = candidates(settings.privilege, *read_bounding_set())[0]
        self.runtime = DesktopRuntime(
            docker_host=settings.docker_host,
            image=settings.desktop_image,
            sandbox_id=settings.sandbox_id,
            depth=settings.depth,
            socket_dir=settings.socket_dir,
            profile=self.profile,
            registry=settings.registry,
        )
        self.worker_id = f"{settings.sandbox_id}@{settings.hostname}:{os.getpid()}"
        self.locks = SessionLocks(self.redis, self.keys, settings.lock_lease_s, self.worker_id)
        self.lifecycle = Lifecycle(
            self.store,
            self.bus,
            self.runtime,
            self.locks,
            sandbox_id=settings.sandbox_id,
            provision_timeout_s=settings.provision_timeout_s,
            ready_timeout_s=settings.ready_timeout_s,
            stop_timeout_s=settings.stop_timeout_s,
            limits=(settings.max_cpus, settings.max_memory_mb, settings.max_pids),
            fault_kill_at=settings.fault_kill_at,
        )
        self.lifecycle.before_bring_up = self._before_bring_up
        self.lifecycle.on_dockerd_ready = self._observe_dockerd_ready
        self.pool = WarmPool(
            self.runtime,
            self.redis,
            self.keys,
            settings.sandbox_id,
            target=settings.pool_size,
            ready_timeout_s=settings.ready_timeout_s,
            prepare=self._before_bring_up,
        )
        self._pool_loop: asyncio.Task[None] | None = None
        self._health_loop: asyncio.Task[None] | None = None
        # Last health finding per ready session (None: not looked at yet).
        self._health: dict[str, bool] = {}
        self.privilege_decided = False
        self._privilege_lock = asyncio.Lock()
        self.reconciler: Reconciler | None = None
        self._reconcile_loop: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        # available | draining | drained (what the heartbeat says; see drain()).
        self.status = "available"
        self._desktops_seen = 0
        self._drain: asyncio.Task[None] | None = None
        self._drain_watch: asyncio.Task[None] | None = None
        self.drained = asyncio.Event()
        self._metrics_server: asyncio.Server | None = None
        self.job_seconds = Histogram("orchestrator_job_duration_seconds", "Lifecycle job run time, by operation.")
        self.dockerd_ready_seconds = Histogram(
            "orchestrator_dockerd_ready_seconds", "From desktop start to its dockerd answering /_ping."
        )
        # Set once start-up (privilege probe, first reconcile pass) is done and jobs flow.
        self.started = asyncio.Event()
        self.arq = ResilientWorker(
            functions=[_job(op) for op in Operation],
            redis_settings=arq_redis_settings(settings),
            queue_name=self.keys.queue(settings.sandbox_id),
            job_serializer=job_serializer,
            job_deserializer=job_deserializer,
            poll_delay=settings.poll_delay_s,
            max_jobs=settings.max_jobs,
            job_timeout=int(settings.ready_timeout_s) + 2 * settings.stop_timeout_s + 60,
            # Jobs are idempotent, so a finished job may run again when re-requested; arq's
            # job key still suppresses duplicates while one is queued or running.
            keep_result=0,
            # A job waiting for a busy session is retried (deferred), not failed.
            max_tries=10_000,
            ctx={"lifecycle": self.lifecycle, "sandbox_worker": self},
            on_startup=self._on_startup,
            on_shutdown=self._on_shutdown,
            handle_signals=False,
        )

    async def store_requested(self, job: LifecycleJob) -> str | None:
        """A create job from a producer that bypassed the API: store the session it asks for
        (idempotently: the same id twice is one session). Returns why not, if it cannot."""
        assert job.spec is not None
        if job.generation != 1:
            return "a create job carrying a spec must be for generation 1"
        if job.spec.id not in (None, job.session):
            return f"spec.id {job.spec.id!r} differs from the job's session {job.session!r}"
        if job.spec.sandbox not in (None, self.settings.sandbox_id):
            return f"spec.sandbox {job.spec.sandbox!r} is not this sandbox ({self.settings.sandbox_id!r})"
        problem = resource_problem(
            job.spec.resources, self.settings.max_cpus, self.settings.max_memory_mb, self.settings.max_pids
        )
        if problem:
            return problem[1]
        request = msgspec.structs.replace(job.spec, id=job.session)
        await self.store.create(new_record(request, self.settings.sandbox_id, self.settings), request.env)
        return None

    async def choose_privilege(self) -> PrivilegeProfile:
        """Try the candidate profiles on the sandbox's daemon; the first that runs is used.
        Without the desktop image nothing can be tried: the choice waits for the first desktop."""
        async with self._privilege_lock:
            options = candidates(self.settings.privilege, *read_bounding_set())
            self.privilege_decided = True
            if len(options) == 1:
                return options[0]
            for profile in options:
                try:
                    why = await self.runtime.probe.try_profile(profile)
                except DesktopError as e:
                    log.warning("cannot probe privilege profiles yet (%s); will try before the first desktop", e)
                    self.privilege_decided = False
                    return options[-1]
                if why is None:
                    return profile
                log.info("privilege profile %s does not work here: %s", profile.describe(), why)
            log.warning("no privilege profile passed the probe; using %s", options[-1].describe())
            return options[-1]

    async def ensure_desktop_image(self) -> None:
        """Pull the desktop image from this level's registry if the daemon lacks it (a new
        sandbox's daemon starts empty). Without a registry the image must be loaded otherwise."""
        registry, image = self.settings.registry, self.settings.desktop_image
        if registry is None or await self.runtime.images.has(image):
            return
        log.info("pulling the desktop image %s from %s", image, registry)
        started = time.monotonic()
        try:
            found = await self.runtime.images.pull(registry, image)
        except DesktopError as e:
            log.warning("could not pull the desktop image: %s (will retry before the next desktop)", e)
            return
        if found:
            log.info("pulled %s from %s in %.1f s", image, registry, time.monotonic() - started)
        else:
            log.warning("%s has no %s yet (push it: make images); will retry before the next desktop", registry, image)

    async def _before_bring_up(self) -> None:
        await self.ensure_desktop_image()
        if not self.privilege_decided:
            self.profile = self.runtime.profile = await self.choose_privilege()
            log.info("desktops get privilege profile: %s", self.profile.describe())

    async def enforce_firewall(self) -> None:
        """Desktops kept off the sandbox's own networks (workers/firewall.py), when enabled."""
        if self.settings.firewall:
            await firewall.apply(await self.runtime.desktops.network_bridge(), self.settings.desktop_deny)

    async def _on_startup(self, ctx: dict[str, Any]) -> None:
        await self.runtime.desktops.ensure_network()
        # Fail closed: no desktop starts on a sandbox whose firewall could not be set.
        await self.enforce_firewall()
        await self.ensure_desktop_image()
        self.profile = self.runtime.profile = await self.choose_privilege()
        await self.arq.release_orphaned_jobs()
        self.lifecycle_queue = JobQueue(ctx["redis"], self.keys)
        self.reconciler = Reconciler(
            self.lifecycle, self.lifecycle_queue, grace_s=self.settings.orphan_grace_s, pool=self.pool
        )
        # Before any job is consumed: adopt, finish and clean up what an earlier run left.
        await self.reconciler.pass_once()
        self._reconcile_loop = asyncio.create_task(self._reconcile_forever(self.reconciler))
        self._pool_loop = asyncio.create_task(self.pool.run_forever())
        self._health_loop = asyncio.create_task(self._health_forever())
        log.info(
            "sandbox %s (depth %d) serving queue %s; desktops get privilege profile: %s",
            self.settings.sandbox_id,
            self.settings.depth,
            self.keys.queue(self.settings.sandbox_id),
            self.profile.describe(),
        )
        await self.beat()
        self._heartbeat = asyncio.create_task(self._beat_forever())
        self._drain_watch = asyncio.create_task(self._watch_drain_forever())
        self.started.set()

    async def _on_shutdown(self, ctx: dict[str, Any]) -> None:
        for task in (
            self._heartbeat,
            self._reconcile_loop,
            self._pool_loop,
            self._health_loop,
            self._drain_watch,
            self._drain,
        ):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.reconciler is not None:
            await self.reconciler.close()
        # Say goodbye: stop being a placement target now rather than when the heartbeat lapses,
        # and be listed as drained, not lost (its sessions are not failed: see watch_sandboxes).
        # Jobs still queued stay queued for the next worker of this sandbox (same id).
        self.status = "drained"
        with contextlib.suppress(Exception):
            await self.beat()

    async def _reconcile_forever(self, reconciler: Reconciler) -> None:
        while True:
            await asyncio.sleep(self.settings.reconcile_interval_s)
            try:
                await self.enforce_firewall()  # restores rules a restart (or a person) removed
                await reconciler.pass_once()
            except Exception:
                log.exception("reconcile pass failed")

    async def serve(self, stop: asyncio.Event) -> None:
        """Consume jobs until ``stop`` is set, a drain completes (or arq fails), then shut
        down gracefully. A sandbox drained through the API stays idle until it is undrained."""
        await self._serve_metrics()
        try:
            if not await self._wait_while_drained(stop):
                return
            run = asyncio.create_task(self.arq.async_run())
            stopping = asyncio.create_task(stop.wait())
            drained = asyncio.create_task(self.drained.wait())
            try:
                await asyncio.wait({run, stopping, drained}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
                drained.cancel()
                await self.close()
                with contextlib.suppress(asyncio.CancelledError):
                    await run
        finally:
            if self._metrics_server is not None:
                self._metrics_server.close()

    # -- drain ---------------------------------------------------------------------------

    def drain_requested(self) -> bool:
        """SIGTERM: drain, then exit. False when a drain already runs (a second signal stops)."""
        if self._drain is not None or not self.started.is_set():
            return False
        self._drain = asyncio.create_task(self.drain(by="signal", stop_desktops=False))
        return True

    async def drain(self, *, by: str, stop_desktops: bool) -> None:
        """Stop taking new sessions (the drain key keeps placement away), finish the jobs
        queued and running (bounded by drain_timeout_s), optionally stop the ready desktops
        (their inner containers get ``docker stop`` first), then end the worker."""
        sandbox = self.settings.sandbox_id
        key = self.keys.sandbox_drain(sandbox)
        started = time.monotonic()
        self.status = "draining"
        await self.redis.set(key, msgspec.json.encode(DrainRequest(by=by, stop_desktops=stop_desktops)), nx=True)
        self.pool.target = 0  # pooled desktops cannot be claimed any more: the pool loop removes them
        log.info("draining sandbox %s (by %s, stop desktops: %s)", sandbox, by, stop_desktops)
        await self.bus.publish(
            make_event("sandbox.draining", sandbox=sandbox, data={"by": by, "stop_desktops": stop_desktops})
        )
        await self.beat()
        deadline = started + self.settings.drain_timeout_s
        queue = self.keys.queue(sandbox)
        while time.monotonic() < deadline:
            running = [t for t in self.arq.tasks.values() if not t.done()]
            if not running and not await self.redis.zcard(queue):
                break
            await asyncio.sleep(0.2)
        left = int(await self.redis.zcard(queue))
        stopped = await self._stop_ready_sessions() if stop_desktops else []
        await self.pool.shrink()
        self.status = "drained"
        seconds = round(time.monotonic() - started, 3)
        await self.bus.publish(
            make_event(
                "sandbox.drained",
                sandbox=sandbox,
                data={"by": by, "seconds": seconds, "stopped_sessions": len(stopped), "jobs_left": left},
            )
        )
        if by == "signal":  # an API drain persists until undrained; a signal's ends with this run
            await self.redis.delete(key)
        log.info(
            "sandbox %s drained in %.1f s (%d sessions stopped, %d jobs left)", sandbox, seconds, len(stopped), left
        )
        self.drained.set()

    async def _stop_ready_sessions(self) -> list[str]:
        records = [
            r
            for r in await self.store.list()
            if r.sandbox == self.settings.sandbox_id and r.state in (S.READY, S.FAILED)
        ]

        async def stop(record: SessionRecord) -> str | None:
            try:
                await self.store.transition(record.id, S.STOPPING, generation=record.generation)
                result = await self.lifecycle.run("stop", record.id, record.generation)
            except Exception as e:  # one session's trouble must not stop the drain
                log.warning("drain: stopping %s failed: %s", record.id, e)
                return None
            return record.id if result == "stopped" else None

        results = await asyncio.gather(*(stop(r) for r in records))
        return [r for r in results if r is not None]

    async def _watch_drain_forever(self) -> None:
        """Picks up a drain asked for through the API (the key), within a second."""
        key = self.keys.sandbox_drain(self.settings.sandbox_id)
        while self._drain is None:
            try:
                raw = await self.redis.get(key)
            except RedisError:
                raw = None
            if raw is not None and self._drain is None:
                request = _decode_drain(raw)
                self._drain = asyncio.create_task(self.drain(by=request.by, stop_desktops=request.stop_desktops))
                return
            await asyncio.sleep(1.0)

    async def _wait_while_drained(self, stop: asyncio.Event) -> bool:
        """At start: a drain key left by a signal belongs to an earlier run (dropped); one set
        through the API keeps this sandbox idle, listed as drained, until it is undrained.
        Returns False when ``stop`` was set meanwhile."""
        key = self.keys.sandbox_drain(self.settings.sandbox_id)
        announced = False
        while True:
            raw = await self.redis.get(key)
            if raw is None:
                break
            if _decode_drain(raw).by != "api":
                await self.redis.delete(key)
                break
            if not announced:
                log.info("sandbox %s was drained through the API: idle until undrained", self.settings.sandbox_id)
                announced = True
            self.status = "drained"
            with contextlib.suppress(Exception):
                await self.beat()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.heartbeat_interval_s):
                    await stop.wait()
            if stop.is_set():
                await self.runtime.close()
                await self.redis.aclose()
                return False
        self.status = "available"
        return True

    # -- metrics -------------------------------------------------------------------------

    def _observe_dockerd_ready(self, seconds: float) -> None:
        self.dockerd_ready_seconds.observe(seconds)

    async def _serve_metrics(self) -> None:
        port = self.settings.worker_metrics_port
        if not port:
            return
        self._metrics_server = await asyncio.start_server(self._answer_metrics, "0.0.0.0", port)
        log.info("worker metrics on :%d/metrics", port)

    async def _answer_metrics(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A minimal HTTP/1.0 answer: GET /metrics (anything else: 404). Scrapers need no more."""
        try:
            async with asyncio.timeout(5):
                request = await reader.readuntil(b"\r\n\r\n")
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
            if path.split(b"?")[0] == b"/metrics":
                body, status = (await self.render_metrics()).encode(), b"200 OK"
            else:
                body, status = b"not found\n", b"404 Not Found"
            writer.write(
                b"HTTP/1.0 " + status + b"\r\nContent-Type: text/plain; version=0.0.4\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
            )
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, RedisError):
            pass
        finally:
            writer.close()

    async def render_metrics(self) -> str:
        sandbox = self.settings.sandbox_id
        queue = self.keys.queue(sandbox)
        depth = int(await self.redis.zcard(queue))
        oldest = await self.redis.zrange(queue, 0, 0, withscores=True)
        age = oldest_age_s(oldest, time.time())
        by_state = await self.sessions_by_state()
        ready = await self.pool.pooled()
        running = sum(1 for t in self.arq.tasks.values() if not t.done())
        one = {"sandbox": sandbox}
        lines = [
            *family("orchestrator_queue_depth", "gauge", "Jobs queued for this sandbox.", [(one, depth)]),
            *family(
                "orchestrator_queue_oldest_age_seconds",
                "gauge",
                "Age of the oldest queued job (0: none).",
                [(one, round(age, 3))],
            ),
            *family("orchestrator_jobs_running", "gauge", "Jobs this worker runs now.", [(one, running)]),
            *family(
                "orchestrator_sandbox_sessions",
                "gauge",
                "This sandbox's sessions by state.",
                [({**one, "state": k}, v) for k, v in by_state.items()],
            ),
            *family(
                "orchestrator_sandbox_capacity",
                "gauge",
                "Sessions this sandbox takes.",
                [(one, self.settings.max_sessions)],
            ),
            *family("orchestrator_pool_ready", "gauge", "Warm desktops ready and unclaimed.", [(one, len(ready))]),
            *family("orchestrator_pool_target", "gauge", "Warm desktops to keep ready.", [(one, self.pool.target)]),
            *family(
                "orchestrator_sandbox_status",
                "gauge",
                "1 for this sandbox's status.",
                [({**one, "status": s}, int(s == self.status)) for s in ("available", "draining", "drained")],
            ),
            *self.job_seconds.render(),
            *self.dockerd_ready_seconds.render(),
        ]
        return "\n".join(lines) + "\n"

    async def close(self) -> None:
        """Let running jobs finish (bounded), then stop consuming and close connections."""
        try:
            running = [t for t in self.arq.tasks.values() if not t.done()]
            if running:
                await asyncio.wait(running, timeout=self.settings.stop_timeout_s + 10)
            try:
                await self.arq.close()
            except asyncio.CancelledError:
                # arq re-raises the cancellation of the job tasks it cancels; only ours propagates.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
        finally:
            await self.runtime.close()
            await self.redis.aclose()

    async def beat(self) -> SandboxInfo:
        """Publish this sandbox's state: the info key (kept a day, for listings), the alive key
        (expires after lost_after_s by Redis's clock: its absence is what "unavailable" means)
        and a ``sandbox.heartbeat`` event."""
        keys = self.keys
        sandbox = self.settings.sandbox_id
        if self.status != "drained":  # first, whatever else is slow: liveness is this key
            await self.redis.set(keys.sandbox_alive(sandbox), now_rfc3339(), px=int(self.settings.lost_after_s * 1000))
        ready = await self.pool.pooled()
        pooled = self.pool.owned(ready)
        try:
            async with asyncio.timeout(DOCKER_PROBE_TIMEOUT_S):
                desktops = await self.runtime.desktops.list_desktops()
            self._desktops_seen = sum(1 for d in desktops if d.session not in pooled)
        except (DesktopError, DockerError, aiohttp.ClientError, OSError, TimeoutError) as e:
            # The worker is alive even while its dockerd restarts: keep beating (with the last
            # count), or the sandbox would be declared lost for a daemon restart.
            log.warning("heartbeat: the sandbox's dockerd does not answer (%s)", e)
        by_state = {k: v for k, v in (await self.sessions_by_state()).items() if v}
        info = SandboxInfo(
            id=self.settings.sandbox_id,
            depth=self.settings.depth,
            version=__version__,
            hostname=self.settings.hostname,
            sessions=self._desktops_seen,
            capacity=self.settings.max_sessions,
            load=os.getloadavg()[0],
            free_disk_bytes=(await asyncio.to_thread(shutil.disk_usage, "/")).free,
            privilege=self.profile.describe(),
            ts=now_rfc3339(),
            max_cpus=self.settings.max_cpus,
            max_memory_mb=self.settings.max_memory_mb,
            max_pids=self.settings.max_pids,
            address_pool=address_pool(self.settings.depth),
            pool_target=self.pool.target,
            pool_ready=len(ready),
            status=self.status,
            labels=self.settings.sandbox_labels,
            cpus=float(os.cpu_count() or 1),
            memory_mb=_machine_memory_mb(),
            sessions_by_state=by_state,
            lost_after_s=self.settings.lost_after_s,
        )
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.sandbox(info.id), msgspec.json.encode(info), ex=SANDBOX_INFO_TTL_S)
            pipe.sadd(keys.sandbox_index, info.id)
            if self.status == "drained":
                pipe.delete(keys.sandbox_alive(info.id))
            else:  # (the alive key was set first thing) back after being declared lost:
                pipe.delete(keys.sandbox_lost(info.id))  # a later silence is a new outage
            await pipe.execute()
        await self.bus.publish(make_event("sandbox.heartbeat", sandbox=info.id, data=to_data(info)))
        return info

    async def sessions_by_state(self) -> dict[str, int]:
        """This sandbox's sessions, counted by state (every state present, 0 when none)."""
        counts = dict.fromkeys((s.value for s in SessionState), 0)
        for record in await self.store.list():
            if record.sandbox == self.settings.sandbox_id:
                counts[record.state.value] += 1
        return counts

    async def check_health(self) -> None:
        """One pass over this sandbox's ready sessions: is the desktop running and does its
        dockerd answer? A ``desktop.health`` event marks each change (and a first finding of
        unhealthy); the reconciler restarts a stopped desktop (see its restart policy)."""
        records = [r for r in await self.store.list() if r.sandbox == self.settings.sandbox_id and r.state is S.READY]
        try:
            async with asyncio.timeout(DOCKER_PROBE_TIMEOUT_S):
                running: set[str] | None = {d.session for d in await self.runtime.desktops.list_desktops() if d.running}
        except (DesktopError, DockerError, aiohttp.ClientError, OSError, TimeoutError) as e:
            log.warning("the sandbox's dockerd does not answer (%s): its desktops are unhealthy", e)
            running = None  # restarting, say: every desktop is unreachable until it is back
        for record in records:
            if running is None:
                healthy, reason = False, "the sandbox's dockerd does not answer"
            elif record.id not in running:
                healthy, reason = False, "the desktop is not running"
            elif not await self.runtime.inner.answers(record.id):
                healthy, reason = False, "the desktop's dockerd does not answer /_ping"
            else:
                healthy, reason = True, "the desktop runs and its dockerd answers"
            previous = self._health.get(record.id)
            self._health[record.id] = healthy
            if previous == healthy or (previous is None and healthy):
                continue
            data = {"status": "healthy" if healthy else "unhealthy", "reason": reason}
            await self.bus.publish(
                make_event(
                    "desktop.health",
                    sandbox=self.settings.sandbox_id,
                    session=record.id,
                    generation=record.generation,
                    data=data,
                )
            )
        for gone in set(self._health) - {r.id for r in records}:
            del self._health[gone]

    async def _health_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            try:
                await self.check_health()
            except Exception:
                log.exception("health check failed; next in %.0f s", self.settings.health_interval_s)

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            try:
                await self.beat()
            except Exception:
                log.exception("heartbeat failed")
