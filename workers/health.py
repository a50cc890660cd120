"""Health of this sandbox's ready desktops: is each running, and does its dockerd answer?
A ``desktop.health`` event marks each change (and a first finding of unhealthy); restarting a
stopped desktop is the reconciler's job (its restart policy)."""

from __future__ import annotations

import asyncio
import logging

from orchestrator.config import WorkerSettings
from orchestrator.events import EventBus, make_event
from orchestrator.schemas import SessionRecord
from orchestrator.states import SessionState
from orchestrator.store import SessionStore

from .heartbeat import DOCKER_PROBE_TIMEOUT_S, DOCKER_UNREACHABLE
from .runtime import Runtime

log = logging.getLogger("workers.health")


class HealthCheck:
    def __init__(self, settings: WorkerSettings, store: SessionStore, bus: EventBus, runtime: Runtime) -> None:
        self.sandbox_id = settings.sandbox_id
        self.store = store
        self.bus = bus
        self.runtime = runtime
        # Last finding per ready session (absent: not looked at yet).
        self._healthy: dict[str, bool] = {}

    async def check(self) -> None:
        """One pass over this sandbox's ready sessions."""
        records = [r for r in await self.store.list(sandbox=self.sandbox_id) if r.state is SessionState.READY]
        try:
            async with asyncio.timeout(DOCKER_PROBE_TIMEOUT_S):
                running: set[str] | None = {d.session for d in await self.runtime.desktops.list_desktops() if d.running}
        except DOCKER_UNREACHABLE as e:
            log.warning("the sandbox's dockerd does not answer (%s): its desktops are unhealthy", e)
            running = None  # restarting, say: every desktop is unreachable until it is back
        for record in records:
            healthy, reason = await self._probe(record, running)
            previous = self._healthy.get(record.id)
            self._healthy[record.id] = healthy
            if previous == healthy or (previous is None and healthy):
                continue
            data = {"status": "healthy" if healthy else "unhealthy", "reason": reason}
            event = make_event(
                "desktop.health", sandbox=self.sandbox_id, session=record.id, generation=record.generation, data=data
            )
            await self.bus.publish(event)
        for gone in set(self._healthy) - {r.id for r in records}:
            del self._healthy[gone]

    async def _probe(self, record: SessionRecord, running: set[str] | None) -> tuple[bool, str]:
        if running is None:
            return False, "the sandbox's dockerd does not answer"
        if record.id not in running:
            return False, "the desktop is not running"
        if not await self.runtime.inner.answers(record.id):
            return False, "the desktop's dockerd does not answer /_ping"
        return True, "the desktop runs and its dockerd answers"
