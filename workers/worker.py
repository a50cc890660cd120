"""The worker of one sandbox: the composition root. It builds each part once and runs the
background duties under one task group:

- jobs.py       arq consuming the sandbox's queue (the lifecycle jobs)
- heartbeat.py  the sandbox's heartbeat (orchestrator/sandboxes.py is the protocol)
- health.py     desktop.health of the ready desktops
- reconciler.py converging Redis and Docker; firewall.py re-checked with it
- pool.py       the warm pool
- drain.py      drain by the API or SIGTERM
- metrics.py    the worker's /metrics

Run it with ``orchestrator worker`` or ``python -m workers``."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import anyio
from redis.asyncio import Redis

from orchestrator import tracing
from orchestrator.config import WorkerSettings
from orchestrator.core import Core, connect
from orchestrator.exec_store import ExecStore
from orchestrator.keys import Keys
from orchestrator.locks import SessionLocks
from orchestrator.loops import every
from orchestrator.queue import oldest_age_s
from orchestrator.redis_conn import redis_client
from orchestrator.states import SandboxStatus

from . import firewall
from .access import AccessServer, advertised_host
from .access_handlers import AccessHandlers
from .disk import DiskGauge
from .drain import Drain
from .execs import ExecRunner
from .health import HealthCheck
from .heartbeat import Heartbeat, sessions_by_state
from .jobs import JobContext, JobRunner
from .lifecycle import Lifecycle
from .metrics import Snapshot, WorkerMetrics, serving
from .pool import WarmPool
from .prepare import DesktopPreparation, PrivilegeRefused
from .privilege import candidates, read_bounding_set, read_uid_map
from .reconciler import Reconciler
from .runtime import DesktopRuntime
from .uid_ranges import RedisSlotLedger, machine_id

log = logging.getLogger("workers.worker")


class SandboxWorker:
    def __init__(self, settings: WorkerSettings) -> None:
        tracing.install()
        self.settings = settings
        core = self.core = connect(settings)
        self.redis, self.keys, self.bus, self.store = core.redis, core.keys, core.bus, core.store
        self.runtime = _runtime(settings)
        self.uid_ranges = _uid_ranges(core.redis, core.keys, settings.sandbox_id)
        if self.uid_ranges is not None:
            self.runtime.desktops.volumes.ledger = self.uid_ranges
        self.preparation = DesktopPreparation(self.runtime, settings)
        self.worker_id = f"{settings.sandbox_id}@{settings.hostname}:{os.getpid()}"
        self.metrics = WorkerMetrics(settings.sandbox_id)
        self.lifecycle = _lifecycle(settings, core, self.runtime, self.worker_id)
        self.lifecycle.before_bring_up = self.preparation.before_desktop
        self.lifecycle.on_dockerd_ready = self.metrics.observe_dockerd_ready
        self.pool = WarmPool(
            self.runtime,
            self.redis,
            self.keys,
            settings.sandbox_id,
            targets={"minimal": settings.pool_size, "graphical": settings.pool_graphical_size},
            ready_timeout_s=settings.ready_timeout_s,
            prepare=self.preparation.before_desktop,
        )
        self.lifecycle_queue = core.queue
        self.reconciler = Reconciler(
            self.lifecycle,
            core.queue,
            grace_s=settings.orphan_grace_s,
            pool=self.pool,
            max_removals=settings.reconcile_max_removals,
        )
        self.disk = DiskGauge(self.runtime.desktops, settings.min_free_disk_mb)
        context = JobContext(
            self.lifecycle, self.store, settings, self.metrics.observe_job, self.metrics.observe_rejected, self.disk
        )
        self.jobs = JobRunner(self.redis, self.keys.queue(settings.sandbox_id), context)
        self.drain = Drain(
            settings, core.sandboxes, self.bus, self.store, self.lifecycle, self.pool, self.jobs, self._beat
        )
        self.heartbeat = Heartbeat(
            settings,
            core.sandboxes,
            self.bus,
            self.store,
            self.runtime,
            self.pool,
            self.preparation,
            status=lambda: self.drain.status,
            disk=self.disk,
        )
        self.health = HealthCheck(settings, self.store, self.bus, self.runtime)
        self.execs = _exec_runner(settings, core, self.runtime, self.worker_id)
        # Its own client: each relayed access blocks one connection reading its stream.
        self.relay_redis = redis_client(settings)
        self.access = _access_server(settings, core, self.relay_redis, self.runtime, self.worker_id)
        # Set once start-up (privilege probe, first reconcile pass) is done and jobs flow.
        self.started = asyncio.Event()

    async def _beat(self) -> None:
        await self.heartbeat.beat()

    def drain_requested(self) -> bool:
        """SIGTERM: drain, then exit. False (stop at once) before start-up is done or when a
        drain already runs (a second signal)."""
        return self.started.is_set() and self.drain.request_by_signal()

    async def serve(self, stop: asyncio.Event) -> None:
        """Consume jobs until ``stop`` is set, a drain completes or the job loop fails, then
        shut down gracefully. A sandbox drained through the API stays idle until undrained."""
        try:
            async with serving(self.settings.worker_metrics_port, self.metrics, self._snapshot):
                if await self.drain.wait_while_drained(stop):
                    await self._start()
                    await self._run(stop)
                    await self._say_goodbye()
                    if self.preparation.refused is not None:
                        # Decided before a desktop (the image came late): serve no more.
                        raise self.preparation.refused
        finally:
            await self.reconciler.close()
            await self.runtime.close()
            await self.relay_redis.aclose()
            await self.core.aclose()

    async def _start(self) -> None:
        settings = self.settings
        await self.runtime.desktops.ensure_network()
        # Fail closed: no desktop starts on a sandbox whose firewall could not be set.
        await self._enforce_firewall()
        await self.preparation.at_start()
        await self.jobs.release_orphaned_jobs()
        # Before any job is consumed: adopt, finish and clean up what an earlier run left.
        await self.reconciler.pass_once()
        await self._sweep_uid_ranges()
        await self.access.listen()
        self.heartbeat.access_address = self.access.address
        log.info(
            "sandbox %s (depth %d) serving queue %s; desktops get privilege profile: %s",
            settings.sandbox_id,
            settings.depth,
            self.jobs.queue_name,
            self.preparation.profile.describe(),
        )
        await self.heartbeat.beat()

    async def _run(self, stop: asyncio.Event) -> None:
        settings = self.settings
        jobs_ended = asyncio.Event()

        async def consume() -> None:
            try:
                await self.jobs.run()
            finally:
                jobs_ended.set()

        async with anyio.create_task_group() as duties:
            duties.start_soon(consume)
            duties.start_soon(every, settings.heartbeat_interval_s, self.heartbeat.beat, "heartbeat")
            duties.start_soon(every, settings.health_interval_s, self.health.check, "health check")
            duties.start_soon(every, settings.reconcile_interval_s, self._reconcile, "reconcile pass")
            duties.start_soon(self.pool.run_forever)
            duties.start_soon(self.execs.run)
            duties.start_soon(self.access.run)
            duties.start_soon(self.drain.watch)
            self.started.set()
            await _first_of(stop, self.drain.drained, jobs_ended, self.preparation.refused_event)
            await self.jobs.finish(settings.stop_timeout_s + 10)
            duties.cancel_scope.cancel()

    async def _reconcile(self) -> None:
        await self._enforce_firewall()  # restores rules a restart (or a person) removed
        await self.reconciler.pass_once()
        await self._sweep_uid_ranges()

    async def _sweep_uid_ranges(self) -> None:
        """The machine's uid range ledger agrees with this sandbox's volumes (workers/uid_ranges.py)."""
        if self.uid_ranges is not None:
            await self.uid_ranges.sweep(
                self.runtime.desktops.volumes.slots, now=time.time(), grace_s=self.settings.orphan_grace_s
            )

    async def _enforce_firewall(self) -> None:
        """Desktops kept off everything but the internet (workers/firewall.py), when enabled.
        sandbox-init loaded the same rules before dockerd; this restores what a person removed."""
        if self.settings.firewall:
            await firewall.apply(await asyncio.to_thread(firewall.facts_of, self.settings))

    async def _say_goodbye(self) -> None:
        """Stop being a placement target now rather than when the heartbeat lapses, listed as
        drained, not lost (its sessions are not failed). Queued jobs stay queued for the next
        worker of this sandbox (same id)."""
        self.drain.status = SandboxStatus.DRAINED
        try:
            await self.heartbeat.beat()
        except Exception as e:
            log.warning("could not say goodbye (%s): the sandbox will look lost, then recover", e)

    async def _snapshot(self) -> Snapshot:
        queue = self.jobs.queue_name
        depth = int(await self.redis.zcard(queue))
        oldest = await self.redis.zrange(queue, 0, 0, withscores=True)
        ready = await self.pool.ready_by_flavor()
        return Snapshot(
            queue_depth=depth,
            oldest_queued_age_s=round(oldest_age_s(oldest, time.time()), 3),
            jobs_running=self.jobs.running(),
            sessions_by_state=await sessions_by_state(self.store, self.settings.sandbox_id),
            capacity=self.settings.max_sessions,
            pool_ready=sum(ready.values()),
            pool_target=self.pool.target,
            status=self.drain.status,
            pool_by_flavor={f: (n, self.pool.targets[f]) for f, n in ready.items()},
            unknown_objects=self.reconciler.unknown_objects,
        )


def _uid_ranges(redis: Redis, keys: Keys, sandbox_id: str) -> RedisSlotLedger | None:
    try:
        machine = machine_id()
    except (OSError, ValueError) as e:  # not Linux, or a kernel without one: the sandbox's own
        log.warning("no machine id (%s): uid ranges are unique per sandbox only", e)
        return None
    return RedisSlotLedger(redis, keys, sandbox_id=sandbox_id, machine=machine)


def _lifecycle(settings: WorkerSettings, core: Core, runtime: DesktopRuntime, worker_id: str) -> Lifecycle:
    return Lifecycle(
        core.store,
        core.bus,
        runtime,
        SessionLocks(core.redis, core.keys, settings.lock_lease_s, worker_id),
        sandbox_id=settings.sandbox_id,
        provision_timeout_s=settings.provision_timeout_s,
        ready_timeout_s=settings.ready_timeout_s,
        stop_timeout_s=settings.stop_timeout_s,
        preload_timeout_s=settings.preload_timeout_s,
        operation_timeout_s=settings.operation_deadline_s,
        limits=(settings.max_cpus, settings.max_memory_mb, settings.max_pids),
        fault_kill_at=settings.fault_kill_at,
    )


def _exec_runner(settings: WorkerSettings, core: Core, runtime: DesktopRuntime, worker_id: str) -> ExecRunner:
    return ExecRunner(
        ExecStore(core.redis, core.keys, keep_s=settings.exec_keep_s),
        core.bus,
        runtime.execs,
        sandbox_id=settings.sandbox_id,
        worker_id=worker_id,
        max_running=settings.exec_max_running,
    )


def _access_server(
    settings: WorkerSettings, core: Core, relay_redis: Redis, runtime: DesktopRuntime, worker_id: str
) -> AccessServer:
    handlers = AccessHandlers(
        runtime.terminals, runtime.files, runtime.ports, core.bus, sandbox_id=settings.sandbox_id, screen=runtime.screen
    )
    return AccessServer(
        core.redis,
        relay_redis,
        core.keys,
        handlers.handle,
        sandbox_id=settings.sandbox_id,
        consumer=worker_id,
        host=advertised_host(settings.worker_access_host),
        port=settings.worker_access_port,
    )


def _runtime(settings: WorkerSettings) -> DesktopRuntime:
    return DesktopRuntime(
        docker_host=settings.docker_host,
        image=settings.desktop_image,
        graphical_image=settings.graphical_image,
        sandbox_id=settings.sandbox_id,
        depth=settings.depth,
        socket_dir=settings.socket_dir,
        # The first candidate until DesktopPreparation has tried them on the daemon.
        profile=candidates(settings.privilege, *read_bounding_set(), uid_map=read_uid_map())[0],
        registry=settings.registry,
        registry_credentials=settings.registry_credentials,
        read_timeout_s=settings.docker_read_timeout_s,
        exec_connections=settings.exec_max_running + 8,
    )


async def _first_of(*events: asyncio.Event) -> None:
    async with anyio.create_task_group() as waiters:

        async def wait(event: asyncio.Event) -> None:
            await event.wait()
            waiters.cancel_scope.cancel()

        for event in events:
            waiters.start_soon(wait, event)


def main() -> None:
    """Run this sandbox's worker until SIGINT, or SIGTERM (which drains first)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s [%(trace)s]: %(message)s")
    tracing.install()

    async def run() -> None:
        worker = SandboxWorker(WorkerSettings.from_env())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_term() -> None:
            # The first SIGTERM drains (finish queued and running jobs, then exit: what an
            # orchestrator's stop or scale-down sends); a second one stops at once.
            if not worker.drain_requested():
                stop.set()

        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, on_term)
        await worker.serve(stop)

    try:
        asyncio.run(run())
    except PrivilegeRefused:
        # Logged at error where it was decided (workers/prepare.py), with what to do.
        raise SystemExit(2) from None
