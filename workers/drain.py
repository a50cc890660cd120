"""Draining a sandbox, from the worker's side (the protocol is orchestrator/sandboxes.py).

A drain is asked for by the API (the drain key, ``by: api``) or by SIGTERM (``by: signal``).
The worker then: stops being a placement target (the key), empties its warm pool, lets the
queued and running jobs finish (bounded by drain_timeout_s), optionally stops its ready
desktops (each desktop's dockerd stops its containers as it exits), says ``sandbox.drained``
and ends. An API drain persists: a restarted worker idles, listed as drained, until the
sandbox is undrained.

A retired sandbox (an operator said it will not return, orchestrator/sandboxes.py) is not
drained: its worker, if it comes back anyway, stops working at once (its sessions and queue
are gone, its heartbeats refused) and, restarted, idles listed nowhere until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from orchestrator.config import WorkerSettings
from orchestrator.events import EventBus, make_event
from orchestrator.queue import Operation
from orchestrator.sandboxes import SandboxRegistry
from orchestrator.schemas import DrainRequest, SessionRecord
from orchestrator.states import SandboxStatus, SessionState
from orchestrator.store import SessionStore

from .jobs import JobRunner
from .lifecycle import Lifecycle
from .pool import WarmPool

log = logging.getLogger("workers.drain")

# How often a worker looks for a drain asked for through the API.
WATCH_INTERVAL_S = 1.0


class Drain:
    def __init__(
        self,
        settings: WorkerSettings,
        registry: SandboxRegistry,
        bus: EventBus,
        store: SessionStore,
        lifecycle: Lifecycle,
        pool: WarmPool,
        jobs: JobRunner,
        beat: Callable[[], Awaitable[object]],
    ) -> None:
        self.settings = settings
        self.sandbox_id = settings.sandbox_id
        self.registry = registry
        self.bus = bus
        self.store = store
        self.lifecycle = lifecycle
        self.pool = pool
        self.jobs = jobs
        self.beat = beat
        # What the heartbeat reports: available, then draining and drained.
        self.status = SandboxStatus.AVAILABLE
        self.drained = asyncio.Event()
        self._signalled = asyncio.Event()
        self._began = False

    def request_by_signal(self) -> bool:
        """SIGTERM: drain, then exit. False when a drain already runs (a second signal stops)."""
        if self._began or self._signalled.is_set():
            return False
        self._signalled.set()
        return True

    async def watch(self) -> None:
        """Until a drain happens: pick up a signal at once and an API request within a second,
        then carry the drain out (in this task, under the worker's task group)."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WATCH_INTERVAL_S):
                    await self._signalled.wait()
            if self._signalled.is_set():
                await self.run(DrainRequest(by="signal"))
                return
            try:
                request = await self.registry.drain_request(self.sandbox_id)
                retired = await self.registry.is_retired(self.sandbox_id)
            except RedisError:
                continue
            if retired:
                log.warning("sandbox %s was retired: this worker stops", self.sandbox_id)
                self.status = SandboxStatus.DRAINED
                self.drained.set()
                return
            if request is not None:
                await self.run(request)
                return

    async def run(self, request: DrainRequest) -> None:
        self._began = True
        started = time.monotonic()
        self.status = SandboxStatus.DRAINING
        await self.registry.request_drain(self.sandbox_id, request)  # placement skips us from now on
        self.pool.stop_refilling()  # pooled desktops cannot be claimed any more: the pool loop removes them
        log.info("draining sandbox %s (by %s, stop desktops: %s)", self.sandbox_id, request.by, request.stop_desktops)
        data: dict[str, object] = {"by": request.by, "stop_desktops": request.stop_desktops}
        await self.bus.publish(make_event("sandbox.draining", sandbox=self.sandbox_id, data=data))
        await self.beat()
        left = await self._wait_for_jobs(started + self.settings.drain_timeout_s)
        stopped = await self._stop_ready_sessions() if request.stop_desktops else []
        await self.pool.shrink()
        self.status = SandboxStatus.DRAINED
        seconds = round(time.monotonic() - started, 3)
        data = {"by": request.by, "seconds": seconds, "stopped_sessions": len(stopped), "jobs_left": left}
        await self.bus.publish(make_event("sandbox.drained", sandbox=self.sandbox_id, data=data))
        if request.by == "signal":  # an API drain persists until undrained; a signal's ends with this run
            await self.registry.clear_drain(self.sandbox_id)
        log.info(
            "sandbox %s drained in %.1f s (%d stopped, %d jobs left)", self.sandbox_id, seconds, len(stopped), left
        )
        self.drained.set()

    async def _wait_for_jobs(self, deadline: float) -> int:
        """Until nothing is queued or running (or the deadline); returns the jobs left queued."""
        queue = self.jobs.queue_name
        redis = self.jobs.arq.pool
        while time.monotonic() < deadline:
            if not self.jobs.running() and not await redis.zcard(queue):
                break
            await asyncio.sleep(0.2)
        return int(await redis.zcard(queue))

    async def _stop_ready_sessions(self) -> list[str]:
        mine = await self.store.list(sandbox=self.sandbox_id)
        records = [r for r in mine if r.state in (SessionState.READY, SessionState.FAILED)]

        async def stop(record: SessionRecord) -> str | None:
            try:
                await self.store.transition(record.id, SessionState.STOPPING, generation=record.generation)
                result = await self.lifecycle.run(Operation.STOP, record.id, record.generation)
            except Exception as e:  # one session's trouble must not stop the drain
                log.warning("drain: stopping %s failed: %s", record.id, e)
                return None
            return record.id if result == "stopped" else None

        results = await asyncio.gather(*(stop(r) for r in records))
        return [r for r in results if r is not None]

    async def wait_while_drained(self, stop: asyncio.Event) -> bool:
        """At start: a drain key left by a signal belongs to an earlier run (dropped); one set
        through the API keeps this sandbox idle, listed as drained, until it is undrained.
        Returns False when ``stop`` was set meanwhile."""
        announced = False
        while await self.registry.is_retired(self.sandbox_id):
            if not announced:
                log.warning("sandbox %s is retired: this worker idles until stopped", self.sandbox_id)
                announced = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.heartbeat_interval_s):
                    await stop.wait()
            if stop.is_set():
                return False
        while True:
            request = await self.registry.drain_request(self.sandbox_id)
            if request is None:
                break
            if request.by != "api":
                await self.registry.clear_drain(self.sandbox_id)
                break
            if not announced:
                log.info("sandbox %s was drained through the API: idle until undrained", self.sandbox_id)
                announced = True
            self.status = SandboxStatus.DRAINED
            with contextlib.suppress(Exception):
                await self.beat()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.heartbeat_interval_s):
                    await stop.wait()
            if stop.is_set():
                return False
        self.status = SandboxStatus.AVAILABLE
        return True
