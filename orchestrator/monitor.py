"""The sandbox monitor: every API process runs one. A sandbox whose heartbeats stopped is
declared unavailable once per outage and its sessions fail with ``desktop_lost``; the
sandbox's own reconciler recovers them if it returns with their desktops
(workers/reconciler.py)."""

from __future__ import annotations

import logging
import time

from . import states
from .events import EventBus, make_event
from .sandboxes import SandboxRegistry
from .schemas import SandboxInfo, SessionError
from .states import SandboxStatus, SessionState
from .store import Mutation, SessionNotFound, SessionStore

log = logging.getLogger("orchestrator.monitor")

# Sessions in these states have nothing running that a silent sandbox could have lost.
_UNAFFECTED = frozenset({SessionState.STOPPED, SessionState.FAILED, SessionState.DELETING, SessionState.DELETED})


class SandboxMonitor:
    def __init__(self, registry: SandboxRegistry, store: SessionStore, bus: EventBus) -> None:
        self.registry = registry
        self.store = store
        self.bus = bus
        # Since when this monitor has seen Redis answer without a break (None: not now).
        self._redis_seen_since: float | None = None

    async def pass_once(self) -> list[str]:
        """One pass; returns the ids of the sessions it failed. Every pass repeats the failing,
        so a monitor dying half-way loses nothing.

        A sandbox is judged only once Redis has answered for longer than the sandbox's
        lost_after_s: after a Redis outage (or restart) every alive key may have lapsed, and
        workers need one threshold's time to beat again before their silence means anything."""
        try:
            await self.bus.ping()
        except Exception:
            self._redis_seen_since = None
            raise
        self._redis_seen_since = self._redis_seen_since or time.monotonic()
        seen_for = time.monotonic() - self._redis_seen_since
        lost = [
            s for s in await self.registry.list() if s.status is SandboxStatus.UNAVAILABLE and seen_for > s.lost_after_s
        ]
        if not lost:
            return []
        for sandbox in lost:
            if await self.registry.declare_lost(sandbox.id, sandbox.ts):
                log.warning("sandbox %s is silent since %s: declaring it unavailable", sandbox.id, sandbox.ts)
                data = {"last_heartbeat": sandbox.ts, "lost_after_s": sandbox.lost_after_s}
                await self.bus.publish(make_event("sandbox.unavailable", sandbox=sandbox.id, data=data))
        failed = await self._fail_sessions_of({s.id: s for s in lost})
        if failed:
            log.warning("failed %d sessions of unavailable sandboxes (desktop_lost)", len(failed))
        return failed

    async def _fail_sessions_of(self, lost: dict[str, SandboxInfo]) -> list[str]:
        failed = []
        for record in await self.store.list():
            gone = lost.get(record.sandbox)
            if gone is None or record.state in _UNAFFECTED:
                continue
            error = SessionError(
                code="desktop_lost",
                message=f"sandbox {gone.id!r} has been silent since {gone.ts}",
                cause="sandbox_unavailable",
            )
            try:
                await self.store.transition(record.id, SessionState.FAILED, mutate=_with_error(error))
            except (states.TransitionError, SessionNotFound):
                continue  # it moved on meanwhile
            failed.append(record.id)
        return failed


def _with_error(error: SessionError) -> Mutation:
    return lambda _: {"error": error}
