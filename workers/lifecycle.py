"""Lifecycle jobs: what a worker does for create, start, stop and delete.

Each operation holds the session's lease (one operation per session at a time, across all
workers), re-reads the record, acts only if the record is at the job's generation and in a
state the job is for, and moves it on with compare-and-set transitions. Every Docker step
is idempotent by name. So a job run twice, or resumed by the reconciler after a crash at
any point, converges instead of duplicating anything.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import anyio
from redis.exceptions import RedisError

from orchestrator import tracing
from orchestrator.config import operation_deadline
from orchestrator.events import EventBus, command_request, command_request_of, make_event
from orchestrator.locks import LeaseLost, SessionLocks
from orchestrator.placement import resource_problem
from orchestrator.queue import Operation
from orchestrator.schemas import Flavor, SessionRecord
from orchestrator.states import SessionState, TransitionError
from orchestrator.store import SessionNotFound, SessionStore, StaleGeneration

from .bring_up import BringUpSteps, Phases
from .runtime import DesktopError, Runtime

log = logging.getLogger("workers.lifecycle")
S = SessionState
SUPERSEDED = (StaleGeneration, TransitionError, SessionNotFound)

# The running operation's lease token, which every transition it stores carries as its fence
# (store.CAS_LUA). A context variable, so that each step does not pass it along by hand; set
# by ``Lifecycle.run`` for its own task (and the tasks it starts) only.
_fence: ContextVar[str | None] = ContextVar("lifecycle_fence", default=None)

# Steps where the test-only fault hook (ORCH_FAULT_KILL_AT) can kill the worker.
FAULT_POINTS = (
    "create:after_volume",
    "create:after_container",
    "create:after_start",
    "create:before_ready_event",
    "create:after_ready_event",
    "delete:after_desktop_removed",
    "delete:after_volume_removed",
)


class Lifecycle:
    def __init__(
        self,
        store: SessionStore,
        bus: EventBus,
        runtime: Runtime,
        locks: SessionLocks,
        *,
        sandbox_id: str,
        provision_timeout_s: float,
        ready_timeout_s: float,
        stop_timeout_s: int,
        preload_timeout_s: float = 300.0,
        operation_timeout_s: float | None = None,
        limits: tuple[float, int, int] = (0.0, 0, 0),
        fault_kill_at: str | None = None,
    ) -> None:
        self.store = store
        self.bus = bus
        self.runtime = runtime
        self.locks = locks
        self.sandbox_id = sandbox_id
        self.provision_timeout_s = provision_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        # One deadline over a whole operation, whatever step hangs (a stalled desktop).
        self.preload_timeout_s = preload_timeout_s
        self.operation_timeout_s = operation_timeout_s or operation_deadline(
            provision_timeout_s, ready_timeout_s, preload_timeout_s, stop_timeout_s
        )
        self.limits = limits
        self.fault_kill_at = fault_kill_at
        # Called before each desktop is made, with its flavor (the worker settles its privilege
        # profile and ensures the flavor's image there).
        self.before_bring_up: Callable[[Flavor], Awaitable[None]] | None = None
        # Told each dockerd readiness time (seconds from desktop start), for the worker's metrics.
        self.on_dockerd_ready: Callable[[float], None] | None = None
        # The bring-up's Docker steps (bring_up.py). Their deadlines stay here and are passed at
        # each call, so a change to a live lifecycle's timeouts (the fencing tests) takes effect.
        self.steps = BringUpSteps(runtime, self._event, self._fault)

    def _fault(self, point: str) -> None:
        if point == self.fault_kill_at:
            log.warning("fault hook: killing this worker at %s", point)
            os.kill(os.getpid(), signal.SIGKILL)

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

    async def run(self, operation: Operation, session_id: str, generation: int, *, resumed: bool = False) -> str:
        """Run ``operation`` under the session's lease, within the operation deadline.
        ``resumed``: the reconciler carries on an operation whose job no worker ran (the
        record's in-progress state); its events carry the request id of the command that moved
        the record there, as the job's own would have.
        Raises locks.Busy when another operation holds it (the caller retries later), and
        locks.LeaseLost when the lease was lost midway (the operation was stopped)."""
        async with self.locks.hold(session_id, operation.verb) as lease:
            fenced = _fence.set(lease.token)
            commanded = command_request.set(None)
            try:
                record = await self._current(session_id, generation)
                if record is None:
                    return "skipped"
                # The job a command enqueued (or its resumption): its events carry the command's
                # request id.
                if resumed:
                    command_request.set(record.request_id)
                else:
                    command_request.set(command_request_of(record.request_id, record.tenant, tracing.current.get()))
                with anyio.move_on_after(self.operation_timeout_s):
                    return await self._dispatch(operation, record)
                return await self._timed_out(operation, record)
            except SUPERSEDED as e:
                return f"superseded: {e}"
            finally:
                command_request.reset(commanded)
                _fence.reset(fenced)

    async def _transition(self, session_id: str, target: SessionState, **kwargs: Any) -> SessionRecord:
        """A store transition fenced by the running operation's lease."""
        return await self.store.transition(session_id, target, fence=_fence.get(), **kwargs)

    async def _timed_out(self, operation: Operation, record: SessionRecord) -> str:
        """The operation deadline passed: end with a coded failure, under the lease still, and
        bounded too (removing a desktop is the sandbox's daemon's work, not the stalled one's)."""
        message = f"{operation.value} took longer than its deadline ({self.operation_timeout_s:g} s)"
        log.warning("%s of %s: %s", operation.value, record.id, message)
        with anyio.move_on_after(self.stop_timeout_s + 30):
            match operation:
                case Operation.CREATE | Operation.START:
                    await self._fail(record, "operation_timeout", message)  # desktop removed, volume kept
                case Operation.STOP:
                    fence = _fence.get()
                    await self.store.fail(record.id, record.generation, "operation_timeout", message, fence=fence)
                case Operation.DELETE:
                    pass  # stays deleting: the reconciler resumes it on a later pass
        return "retry later: operation_timeout" if operation is Operation.DELETE else "failed: operation_timeout"

    async def _dispatch(self, operation: Operation, record: SessionRecord) -> str:
        match operation:
            case Operation.CREATE:
                return await self._create(record)
            case Operation.START:
                return await self._start(record)
            case Operation.STOP:
                return await self._stop(record)
            case Operation.DELETE:
                return await self._delete(record)

    # -- operations (called with the lease held) --------------------------------------------

    async def _create(self, record: SessionRecord) -> str:
        queued_since = record.updated_at  # when it was requested: the job's wait starts there
        if record.state is S.PENDING:
            record = await self._transition(record.id, S.CREATING, generation=record.generation)
        if record.state not in (S.CREATING, S.STARTING):
            return f"nothing to do in state {record.state.value}"
        return await self._bring_up(record, queued_since)

    async def _start(self, record: SessionRecord) -> str:
        if record.state is not S.STARTING:
            return f"nothing to do in state {record.state.value}"
        return await self._bring_up(record, record.updated_at)

    async def _stop(self, record: SessionRecord) -> str:
        session_id, generation = record.id, record.generation
        # Only a record already moved to stopping (by the API, a drain or a TTL expiry, each
        # under its rules): a stop job alone, from anyone with queue access, stops nothing.
        if record.state is not S.STOPPING:
            return f"nothing to do in state {record.state.value}"
        try:
            # The desktop's SIGTERM reaches its dockerd, which stops its containers itself, each
            # with its grace (shutdown-timeout, 10 s): a daemon's shutdown is not a stop by
            # hand, so `unless-stopped` containers come back at the next start, as `always`
            # ones do. (A `docker stop` of each first would keep them down after a resume.)
            await self.runtime.desktops.remove(session_id, self.stop_timeout_s)
            self.runtime.desktops.remove_socket_dir(session_id)
        except DesktopError as e:
            await self.store.fail(session_id, generation, e.code, e.message, fence=_fence.get())
            return f"failed: {e.code}"
        await self._transition(session_id, S.STOPPED, generation=generation)
        return "stopped"

    async def _delete(self, record: SessionRecord) -> str:
        session_id, generation = record.id, record.generation
        if record.state is not S.DELETING:
            return f"nothing to do in state {record.state.value}"
        try:
            await self.runtime.desktops.remove(session_id, self.stop_timeout_s)
            self.runtime.desktops.remove_socket_dir(session_id)
            self._fault("delete:after_desktop_removed")
            removed = await self.runtime.desktops.remove_volume(session_id)
            self._fault("delete:after_volume_removed")
        except DesktopError as e:
            # Stays deleting: the reconciler resumes the delete on its next pass.
            log.warning("deleting %s: %s; the reconciler retries", session_id, e)
            return f"retry later: {e.code}"
        await self._transition(session_id, S.DELETED, generation=generation, event_data={"volume_removed": removed})
        return "deleted"

    # -- the shared path of create and start ----------------------------------------------

    async def _bring_up(self, record: SessionRecord, queued_since: str) -> str:
        """The error policy of create and start: a coded failure fails the session (desktop
        removed, volume kept), Redis away ends the job for the reconciler to resume, anything
        else is an internal_error (never a session silently stuck in creating/starting)."""
        try:
            return await self._bring_up_steps(record, Phases(queued_since))
        except DesktopError as e:
            await self._fail(record, e.code, e.message)
            return f"failed: {e.code}"
        except (*SUPERSEDED, LeaseLost):
            raise
        except RedisError:
            # Redis is away: nothing says the session failed, and recording it would fail too.
            # The job ends; once Redis is back the reconciler resumes it (the lease lapses).
            log.warning("bringing up %s stopped: Redis is unreachable; the reconciler resumes it", record.id)
            raise
        except Exception:
            log.exception("bringing up %s failed", record.id)
            await self._fail(record, "internal_error", "the worker hit an unexpected error (details in its log)")
            return "failed: internal_error"

    async def _bring_up_steps(self, record: SessionRecord, phases: Phases) -> str:
        problem = resource_problem(record.spec.resources, *self.limits)
        if problem:
            raise DesktopError("resources_exceed_sandbox", problem[1])
        env = await self.store.get_env(record.id) if record.spec.env_keys else {}
        if self.before_bring_up is not None:
            await self.before_bring_up(record.spec.flavor)
        phases.mark("prepare")
        desktop = await self.steps.provision(record, env, phases, self.provision_timeout_s)
        if record.state is S.CREATING:
            record = await self._transition(record.id, S.STARTING, generation=record.generation)
        ready = await self.steps.start_and_wait(record, desktop, phases, self.ready_timeout_s)
        if self.on_dockerd_ready is not None:
            self.on_dockerd_ready(ready.duration_ms / 1000)
        self._fault("create:after_ready_event")
        if record.spec.preload_images:
            await self.steps.preload(record, self.preload_timeout_s)
            phases.mark("preload")
        await self._transition(
            record.id, S.READY, generation=record.generation, event_data={"phases_ms": phases.result()}
        )
        return "ready"

    async def _fail(self, record: SessionRecord, code: str, message: str) -> None:
        # Rule: a desktop that never became ready is removed; the volume stays with the
        # session (its data may matter) until the session is deleted.
        try:
            await self.runtime.desktops.remove(record.id, stop_timeout=2)
        except DesktopError:
            log.exception("could not remove the failed desktop of %s", record.id)
        try:
            await self.store.fail(record.id, record.generation, code, message, fence=_fence.get())
        except SUPERSEDED as e:
            log.info("not marking %s failed: %s", record.id, e)
