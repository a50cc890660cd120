"""The reconciler: converge what Redis says to what Docker has, on this sandbox.

``plan`` is pure: from the session records, the labelled desktops and volumes, the sessions
whose lease is held, and the clock, it decides corrections. ``Reconciler`` carries them out,
each with an event. It runs at worker start-up (before jobs are consumed) and periodically.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from orchestrator.events import EventBus, make_event
from orchestrator.locks import Busy, SessionLocks
from orchestrator.queue import JobQueue, Operation
from orchestrator.schemas import SessionRecord, TtlAction
from orchestrator.states import SessionState, TransitionError
from orchestrator.store import SessionNotFound, SessionStore, StaleGeneration

from .docker import DesktopError, DesktopRuntime, DockerObject
from .lifecycle import Lifecycle
from .pool import WarmPool

log = logging.getLogger("workers.reconciler")
S = SessionState

# The operation that finishes a session found in each in-progress state.
RESUME = {
    S.CREATING: Operation.CREATE,
    S.STARTING: Operation.START,
    S.STOPPING: Operation.STOP,
    S.DELETING: Operation.DELETE,
}


@dataclass(frozen=True)
class Action:
    # enqueue_create | resume | desktop_lost | restart_desktop | recover | expire | remove_desktop | remove_volume
    kind: str
    session: str
    reason: str
    operation: Operation | None = None  # resume
    then: TtlAction | None = None  # expire
    name: str | None = None  # the Docker object, for removals
    generation: int | None = None


def plan(
    records: Iterable[SessionRecord],
    desktops: Iterable[DockerObject],
    volumes: Iterable[DockerObject],
    *,
    busy: set[str],
    now: float,
    grace_s: float,
    pooled: frozenset[str] = frozenset(),
) -> list[Action]:
    """Corrections for one sandbox. ``records`` are this sandbox's sessions; ``busy`` are those
    whose lease is held (some worker is on it: leave them alone); ``pooled`` are the warm
    pool's desktops (no record yet, and none of the reconciler's business)."""
    by_id = {r.id: r for r in records}
    desktop_of = {d.session: d for d in desktops}
    actions: list[Action] = []
    for r in by_id.values():
        if r.id in busy:
            continue
        desktop = desktop_of.get(r.id)
        if r.state is S.PENDING:
            # The API may have died between storing the record and enqueueing its job.
            actions.append(Action("enqueue_create", r.id, "pending without a running job", generation=r.generation))
        elif r.state in RESUME:
            actions.append(
                Action(
                    "resume", r.id, f"{r.state.value} with no worker on it", RESUME[r.state], generation=r.generation
                )
            )
        elif r.state is S.READY:
            if desktop is not None and desktop.generation == r.generation and not desktop.running:
                # Policy: a ready session's stopped desktop is started again (same container, same
                # volume: its inner images and containers survive); the executor gives up after
                # a few restarts in a row and marks it desktop_lost.
                actions.append(Action("restart_desktop", r.id, "the desktop is not running", generation=r.generation))
            elif desktop is None or desktop.generation != r.generation:
                why = "is gone" if desktop is None else "is stale"
                actions.append(Action("desktop_lost", r.id, f"the desktop {why}", generation=r.generation))
            elif r.expires_at is not None and now >= r.expires_at:
                actions.append(Action("expire", r.id, "ttl expired", then=r.spec.ttl_action, generation=r.generation))
        elif (
            r.state is S.FAILED and lost_with_sandbox(r) and desktop is not None and desktop.generation == r.generation
        ):
            # Failed only because its sandbox went silent, and the desktop is still here: the
            # sandbox is back, so is the session (never removed for having been declared lost).
            kind = "recover" if desktop.running else "restart_desktop"
            actions.append(Action(kind, r.id, "its sandbox is back and so is its desktop", generation=r.generation))
        elif r.state in (S.STOPPED, S.FAILED):
            if (
                r.state is S.STOPPED
                and r.spec.ttl_action == "delete"
                and r.expires_at is not None
                and now >= r.expires_at
            ):
                actions.append(Action("expire", r.id, "ttl expired", then="delete", generation=r.generation))
            elif desktop is not None and now - desktop.created_at >= grace_s:
                actions.append(
                    Action("remove_desktop", r.id, f"left over by a {r.state.value} session", name=desktop.name)
                )
    for d in desktops:
        if d.session not in by_id and d.session not in pooled and now - d.created_at >= grace_s:
            actions.append(Action("remove_desktop", d.session, "its session is unknown or deleted", name=d.name))
    for v in volumes:
        if v.session not in by_id and v.session not in pooled and now - v.created_at >= grace_s:
            actions.append(Action("remove_volume", v.session, "its session is unknown or deleted", name=v.name))
    return actions


def lost_with_sandbox(record: SessionRecord) -> bool:
    """Failed by the API's sandbox monitor (its sandbox went silent), not by anything here."""
    return record.error is not None and record.error.cause == "sandbox_unavailable"


# A ready session's desktop is restarted at most this many times within the window.
MAX_RESTARTS = 3
RESTART_WINDOW_S = 600.0


class Reconciler:
    def __init__(self, lifecycle: Lifecycle, queue: JobQueue, *, grace_s: float, pool: WarmPool | None = None) -> None:
        # The same store, bus, Docker runtime and leases the lifecycle jobs use.
        self.lifecycle = lifecycle
        self.store: SessionStore = lifecycle.store
        self.bus: EventBus = lifecycle.bus
        self.runtime: DesktopRuntime = lifecycle.runtime
        self.locks: SessionLocks = lifecycle.locks
        self.sandbox_id = lifecycle.sandbox_id
        self.queue = queue
        self.grace_s = grace_s
        self.pool = pool
        # Recent restarts per session (monotonic times): the restart budget.
        self._restarts: dict[str, list[float]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def pass_once(self) -> list[Action]:
        # The pool first: a claim turns a pooled id into a record atomically, so read in this
        # order no claimed desktop is ever seen with neither.
        pooled = frozenset(await self.pool.known()) if self.pool is not None else frozenset()
        records = [r for r in await self.store.list() if r.sandbox == self.sandbox_id]
        desktops = await self.runtime.list_desktops()
        volumes = await self.runtime.list_volumes()
        busy = await self.locks.held([r.id for r in records])
        actions = plan(records, desktops, volumes, busy=busy, now=time.time(), grace_s=self.grace_s, pooled=pooled)
        for action in actions:
            try:
                await self._apply(action)
            except (StaleGeneration, TransitionError, SessionNotFound) as e:
                log.info("reconcile %s %s: superseded (%s)", action.kind, action.session, e)
            except Exception:
                log.exception("reconcile %s %s failed; the next pass retries", action.kind, action.session)
        return actions

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _event(self, type: str, action: Action, **data: object) -> None:
        # Removals are about objects whose session may be unknown: firehose only.
        session = None if action.kind.startswith("remove_") else action.session
        payload = {"reason": action.reason, **data}
        if session is None:
            payload["session"] = action.session
        await self.bus.publish(
            make_event(type, sandbox=self.sandbox_id, session=session, generation=action.generation, data=payload)
        )

    async def _apply(self, action: Action) -> None:
        log.info("reconcile: %s %s (%s)", action.kind, action.session, action.reason)
        if action.kind == "enqueue_create":
            assert action.generation is not None
            # arq refuses a job id that is queued or running: only a lost job is enqueued again.
            if await self.queue.enqueue(Operation.CREATE, self.sandbox_id, action.session, action.generation):
                await self._event("reconcile.requeued", action, operation=Operation.CREATE.verb)
        elif action.kind == "resume":
            assert action.operation and action.generation is not None
            await self._event("reconcile.resumed", action, operation=action.operation.verb)
            self._spawn(self._resume(action.operation, action.session, action.generation))
        elif action.kind == "desktop_lost":
            with contextlib.suppress(DesktopError):
                await self.runtime.remove_desktop(action.session, stop_timeout=2)
            await self.store.fail(
                action.session, action.generation, "desktop_lost", f"the desktop {action.reason[12:]}"
            )
        elif action.kind == "recover":
            assert action.generation is not None
            if await self.runtime.dockerd_answers(action.session):
                await self.store.transition(
                    action.session, S.READY, generation=action.generation, event_data={"recovered": True}
                )
        elif action.kind == "restart_desktop":
            assert action.generation is not None
            await self._restart(action)
        elif action.kind == "expire":
            assert action.then and action.generation is not None
            await self._event("session.expired", action, then=action.then)
            target, operation = (
                (S.STOPPING, Operation.STOP) if action.then == "stop" else (S.DELETING, Operation.DELETE)
            )
            record = await self.store.transition(action.session, target, generation=action.generation)
            await self.queue.enqueue(operation, self.sandbox_id, record.id, record.generation)
        elif action.kind == "remove_desktop":
            assert action.name
            await self.runtime.remove_container_by_name(action.name)
            await self._event("reconcile.removed", action, kind="desktop", name=action.name)
        elif action.kind == "remove_volume":
            assert action.name
            await self.runtime.remove_volume_by_name(action.name)
            await self._event("reconcile.removed", action, kind="volume", name=action.name)

    async def _restart(self, action: Action) -> None:
        assert action.generation is not None
        now = time.monotonic()
        recent = [t for t in self._restarts.get(action.session, []) if now - t < RESTART_WINDOW_S]
        if len(recent) >= MAX_RESTARTS:
            with contextlib.suppress(DesktopError):
                await self.runtime.remove_desktop(action.session, stop_timeout=2)
            message = f"the desktop kept stopping ({MAX_RESTARTS} restarts in {RESTART_WINDOW_S / 60:g} min)"
            await self.store.fail(action.session, action.generation, "desktop_lost", message)
            self._restarts.pop(action.session, None)
            return
        self._restarts[action.session] = [*recent, now]
        try:
            await self.runtime.start_desktop(action.session)
        except DesktopError as e:
            with contextlib.suppress(DesktopError):
                await self.runtime.remove_desktop(action.session, stop_timeout=2)
            await self.store.fail(action.session, action.generation, "desktop_lost", f"restarting it failed: {e}")
            return
        await self._event("desktop.restarted", action, attempt=len(recent) + 1)

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resume(self, operation: Operation, session_id: str, generation: int) -> None:
        try:
            result = await self.lifecycle.run(operation, session_id, generation)
            log.info("reconcile: resumed %s of %s: %s", operation, session_id, result)
        except Busy:
            log.info("reconcile: %s of %s is already being worked on", operation, session_id)
        except Exception:
            log.exception("reconcile: resuming %s of %s failed", operation, session_id)
