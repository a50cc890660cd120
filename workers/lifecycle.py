"""Lifecycle jobs: what a worker does for create, start, stop and delete.

Each job re-reads the session, acts only if the record is at the job's generation and in
a state the job is for, and moves it on with compare-and-set transitions. So a job run
twice, or after a crash at any point, converges instead of duplicating anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from orchestrator.events import EventBus, make_event
from orchestrator.names import volume_name
from orchestrator.schemas import DesktopStarted, DockerdReady, SessionRecord, VolumeCreated, to_data
from orchestrator.states import SessionState, TransitionError
from orchestrator.store import SessionNotFound, SessionStore, StaleGeneration

from .docker import DesktopError, DesktopRuntime

log = logging.getLogger("workers.lifecycle")
S = SessionState


class Lifecycle:
    def __init__(
        self,
        store: SessionStore,
        bus: EventBus,
        runtime: DesktopRuntime,
        *,
        sandbox_id: str,
        ready_timeout_s: float,
        stop_timeout_s: int,
    ) -> None:
        self.store = store
        self.bus = bus
        self.runtime = runtime
        self.sandbox_id = sandbox_id
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        # One operation per session at a time within this worker; jobs queue behind it (FIFO).
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    @asynccontextmanager
    async def _exclusive(self, session_id: str) -> AsyncIterator[None]:
        lock = self._locks[session_id]
        async with lock:
            try:
                yield
            finally:
                if not lock._waiters:  # drop idle locks so the dict does not grow forever
                    self._locks.pop(session_id, None)

    async def _current(self, session_id: str, generation: int) -> SessionRecord | None:
        record = await self.store.get(session_id)
        if record is None:
            log.info("session %s is gone; nothing to do", session_id)
            return None
        if record.generation != generation:
            log.info("job for %s generation %d is stale (now %d)", session_id, generation, record.generation)
            return None
        return record

    async def _event(self, record: SessionRecord, type: str, data: dict[str, Any]) -> None:
        await self.bus.publish(
            make_event(type, sandbox=self.sandbox_id, session=record.id, generation=record.generation, data=data)
        )

    # -- jobs -------------------------------------------------------------------------------

    async def create(self, session_id: str, generation: int) -> str:
        async with self._exclusive(session_id):
            record = await self._current(session_id, generation)
            if record is None:
                return "skipped"
            try:
                if record.state is S.PENDING:
                    record = await self.store.transition(session_id, S.CREATING, generation=generation)
                if record.state not in (S.CREATING, S.STARTING):
                    return f"nothing to do in state {record.state.value}"
                return await self._bring_up(record)
            except (StaleGeneration, TransitionError, SessionNotFound) as e:
                return f"superseded: {e}"

    async def start(self, session_id: str, generation: int) -> str:
        async with self._exclusive(session_id):
            record = await self._current(session_id, generation)
            if record is None:
                return "skipped"
            if record.state is not S.STARTING:
                return f"nothing to do in state {record.state.value}"
            try:
                return await self._bring_up(record)
            except (StaleGeneration, TransitionError, SessionNotFound) as e:
                return f"superseded: {e}"

    async def stop(self, session_id: str, generation: int) -> str:
        async with self._exclusive(session_id):
            record = await self._current(session_id, generation)
            if record is None:
                return "skipped"
            try:
                if record.state in (S.READY, S.FAILED):
                    record = await self.store.transition(session_id, S.STOPPING, generation=generation)
                if record.state is not S.STOPPING:
                    return f"nothing to do in state {record.state.value}"
                try:
                    await self.runtime.remove_desktop(session_id, self.stop_timeout_s)
                    self.runtime.remove_socket_dir(session_id)
                except DesktopError as e:
                    await self.store.fail(session_id, generation, e.code, e.message)
                    return f"failed: {e.code}"
                await self.store.transition(session_id, S.STOPPED, generation=generation)
                return "stopped"
            except (StaleGeneration, TransitionError, SessionNotFound) as e:
                return f"superseded: {e}"

    async def delete(self, session_id: str, generation: int) -> str:
        async with self._exclusive(session_id):
            record = await self._current(session_id, generation)
            if record is None:
                return "skipped"
            if record.state is not S.DELETING:
                return f"nothing to do in state {record.state.value}"
            try:
                try:
                    await self.runtime.remove_desktop(session_id, self.stop_timeout_s)
                    self.runtime.remove_socket_dir(session_id)
                    removed = await self.runtime.remove_volume(session_id)
                except DesktopError as e:
                    await self.store.fail(session_id, generation, e.code, e.message)
                    return f"failed: {e.code}"
                await self.store.transition(
                    session_id, S.DELETED, generation=generation, event_data={"volume_removed": removed}
                )
                return "deleted"
            except (StaleGeneration, TransitionError, SessionNotFound) as e:
                return f"superseded: {e}"

    # -- the shared path of create and start ----------------------------------------------

    async def _bring_up(self, record: SessionRecord) -> str:
        session_id, generation = record.id, record.generation
        try:
            if record.state is S.CREATING:
                if await self.runtime.ensure_volume(session_id):
                    await self._event(record, "volume.created", to_data(VolumeCreated(name=volume_name(session_id))))
            elif not await self.runtime.volume_exists(session_id):
                # A resume must find the volume: a new empty one would silently lose the session's data.
                raise DesktopError("volume_lost", f"the session's volume {volume_name(session_id)} is gone")
            desktop = await self.runtime.create_desktop(session_id, generation)
            if record.state is S.CREATING:
                record = await self.store.transition(session_id, S.STARTING, generation=generation)
            started_at = time.monotonic()
            await self.runtime.start_desktop(session_id)
            await self._event(
                record,
                "desktop.started",
                to_data(
                    DesktopStarted(container=desktop.name, id=desktop.id[:12], privilege=self.runtime.profile.kind)
                ),
            )
            info = await self.runtime.wait_dockerd(session_id, started_at, self.ready_timeout_s)
            ready = DockerdReady(
                duration_ms=info.duration_ms,
                storage_driver=info.storage_driver,
                backing_filesystem=info.backing_filesystem,
                server_version=info.server_version,
                depth=self.runtime.depth + 1,
                address_pool=self.runtime.desktop_address_pool(),
            )
            await self._event(record, "dockerd.ready", to_data(ready))
            await self.store.transition(session_id, S.READY, generation=generation)
            return "ready"
        except DesktopError as e:
            await self._fail(record, e.code, e.message)
            return f"failed: {e.code}"
        except (StaleGeneration, TransitionError, SessionNotFound):
            raise
        except Exception as e:  # never leave a session silently stuck in creating/starting
            log.exception("bringing up %s failed", session_id)
            await self._fail(record, "internal_error", f"{type(e).__name__}: {e}")
            return "failed: internal_error"

    async def _fail(self, record: SessionRecord, code: str, message: str) -> None:
        # A desktop that never became ready is useless: remove it, keep the volume (it goes
        # with the session on delete), and record why.
        try:
            await self.runtime.remove_desktop(record.id, stop_timeout=2)
        except DesktopError:
            log.exception("could not remove the failed desktop of %s", record.id)
        try:
            await self.store.fail(record.id, record.generation, code, message)
        except (StaleGeneration, TransitionError, SessionNotFound) as e:
            log.info("not marking %s failed: %s", record.id, e)
