"""Health of this sandbox's ready desktops: is each running, does its dockerd answer, and (a
graphical one) is its screen up? A ``desktop.health`` event marks each change (and a first
finding of unhealthy); a screen whose server was restarted since the last look is a
``display.restarted`` event. Restarting a stopped desktop is the reconciler's job (its restart
policy); restarting a dead display server is start-display's, inside the desktop."""

from __future__ import annotations

import asyncio
import logging

from orchestrator.config import WorkerSettings
from orchestrator.events import EventBus, make_event
from orchestrator.schemas import DisplayRestarted, SessionRecord, to_data
from orchestrator.states import SessionState
from orchestrator.store import SessionStore

from .heartbeat import DOCKER_PROBE_TIMEOUT_S, DOCKER_UNREACHABLE
from .runtime import Runtime
from .runtime.display import display_of

log = logging.getLogger("workers.health")


class HealthCheck:
    def __init__(self, settings: WorkerSettings, store: SessionStore, bus: EventBus, runtime: Runtime) -> None:
        self.sandbox_id = settings.sandbox_id
        self.store = store
        self.bus = bus
        self.runtime = runtime
        # Last finding per ready session (absent: not looked at yet).
        self._healthy: dict[str, bool] = {}
        # Per ready graphical session: its display server's restarts when last seen up (the
        # first look is the baseline: a worker that restarts announces nothing old).
        self._restarts: dict[str, int] = {}

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
        for gone in set(self._restarts) - {r.id for r in records}:
            del self._restarts[gone]

    async def _probe(self, record: SessionRecord, running: set[str] | None) -> tuple[bool, str]:
        if running is None:
            return False, "the sandbox's dockerd does not answer"
        if record.id not in running:
            return False, "the desktop is not running"
        if not await self.runtime.inner.answers(record.id):
            return False, "the desktop's dockerd does not answer /_ping"
        if display_of(record.spec) is not None:
            marker = await self.runtime.inner.display_marker(record.id)
            if marker is None:
                return False, "the desktop's display is down (start-display is restarting it)"
            await self._seen_display(record, marker.restarts, marker.width, marker.height, marker.start_ms)
        return True, "the desktop runs and its dockerd answers"

    async def _seen_display(
        self, record: SessionRecord, restarts: int, width: int, height: int, start_ms: int | None
    ) -> None:
        before = self._restarts.get(record.id)
        self._restarts[record.id] = restarts
        if before is None or restarts <= before:
            return
        data = to_data(DisplayRestarted(restarts=restarts, width=width, height=height, start_ms=start_ms))
        event = make_event(
            "display.restarted", sandbox=self.sandbox_id, session=record.id, generation=record.generation, data=data
        )
        await self.bus.publish(event)
