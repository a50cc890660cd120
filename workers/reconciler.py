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
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Literal, assert_never

from orchestrator.events import EventBus, make_event
from orchestrator.locks import Busy, LeaseLost, SessionLocks
from orchestrator.queue import JobQueue, Operation
from orchestrator.schemas import SessionRecord, TtlAction
from orchestrator.states import SessionState, TransitionError
from orchestrator.store import SessionNotFound, SessionStore, StaleGeneration

from .lifecycle import Lifecycle
from .pool import WarmPool
from .runtime import DesktopError, DockerObject, Runtime

log = logging.getLogger("workers.reconciler")
S = SessionState

# The operation that finishes a session found in each in-progress state.
RESUME = {
    S.CREATING: Operation.CREATE,
    S.STARTING: Operation.START,
    S.STOPPING: Operation.STOP,
    S.DELETING: Operation.DELETE,
}

# Actions: what one pass corrects, one type each, every one with its session and a reason for
# people (the log line and the event's ``reason``). Removals carry no generation: the object's
# session may be unknown.
SANDBOX_BACK = "its sandbox is back and so is its desktop"


@dataclass(frozen=True, kw_only=True)
class EnqueueCreate:
    """A pending session: the API may have died between storing it and enqueueing its job."""

    session: str
    generation: int
    reason: str = "pending without a running job"


@dataclass(frozen=True, kw_only=True)
class Resume:
    """An operation left half done (no lease held): run it again here."""

    session: str
    operation: Operation
    generation: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class DesktopLost:
    """A ready session's desktop is gone, or is an older incarnation's: the session fails."""

    session: str
    generation: int
    why: Literal["gone", "stale"]

    @property
    def reason(self) -> str:
        return f"the desktop is {self.why}"


@dataclass(frozen=True, kw_only=True)
class RestartDesktop:
    """Start the session's own desktop again (same container, same volume)."""

    session: str
    generation: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class Recover:
    """A session failed only because its sandbox went silent, whose desktop still runs."""

    session: str
    generation: int
    reason: str = SANDBOX_BACK


@dataclass(frozen=True, kw_only=True)
class Expire:
    """The TTL ran out: stop or delete, as the session's spec says."""

    session: str
    generation: int
    then: TtlAction
    reason: str = "ttl expired"


@dataclass(frozen=True, kw_only=True)
class RemoveDesktop:
    """A labelled desktop nobody needs (its session is unknown, deleted, stopped or failed)."""

    session: str
    name: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class RemoveVolume:
    """A labelled volume whose session is unknown or deleted."""

    session: str
    name: str
    reason: str


Action = EnqueueCreate | Resume | DesktopLost | RestartDesktop | Recover | Expire | RemoveDesktop | RemoveVolume


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
        if r.id not in busy:
            action = _session_action(r, desktop_of.get(r.id), now, grace_s)
            if action is not None:
                actions.append(action)
    unknown = "its session is unknown or deleted"
    for d in desktops:
        if d.session not in by_id and d.session not in pooled and now - d.created_at >= grace_s:
            actions.append(RemoveDesktop(session=d.session, name=d.name, reason=unknown))
    for v in volumes:
        if v.session not in by_id and v.session not in pooled and now - v.created_at >= grace_s:
            actions.append(RemoveVolume(session=v.session, name=v.name, reason=unknown))
    return actions


def _session_action(r: SessionRecord, desktop: DockerObject | None, now: float, grace_s: float) -> Action | None:
    """The correction one session (no lease held) needs, if any; ``desktop`` is its own."""
    session, generation = r.id, r.generation
    expired = r.expires_at is not None and now >= r.expires_at
    if r.state is S.PENDING:
        return EnqueueCreate(session=session, generation=generation)
    if r.state in RESUME:
        reason = f"{r.state.value} with no worker on it"
        return Resume(session=session, operation=RESUME[r.state], generation=generation, reason=reason)
    if r.state is S.READY:
        if desktop is not None and desktop.generation == generation and not desktop.running:
            # Policy: a ready session's stopped desktop is started again (same container, same
            # volume: its inner images and containers survive); the executor gives up after
            # a few restarts in a row and marks it desktop_lost.
            return RestartDesktop(session=session, generation=generation, reason="the desktop is not running")
        if desktop is None or desktop.generation != generation:
            return DesktopLost(session=session, generation=generation, why="gone" if desktop is None else "stale")
        if expired:
            return Expire(session=session, generation=generation, then=r.spec.ttl_action)
        return None
    if r.state is S.FAILED and lost_with_sandbox(r) and desktop is not None and desktop.generation == generation:
        # Failed only because its sandbox went silent, and the desktop is still here: the
        # sandbox is back, so is the session (never removed for having been declared lost).
        if desktop.running:
            return Recover(session=session, generation=generation)
        return RestartDesktop(session=session, generation=generation, reason=SANDBOX_BACK)
    if r.state in (S.STOPPED, S.FAILED):
        if r.state is S.STOPPED and r.spec.ttl_action == "delete" and expired:
            return Expire(session=session, generation=generation, then="delete")
        if desktop is not None and now - desktop.created_at >= grace_s:
            reason = f"left over by a {r.state.value} session"
            return RemoveDesktop(session=session, name=desktop.name, reason=reason)
    return None


def _name(action: Action) -> str:
    return type(action).__name__


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
        self.runtime: Runtime = lifecycle.runtime
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
        desktops = await self.runtime.desktops.list_desktops()
        volumes = await self.runtime.desktops.list_volumes()
        busy = await self.locks.held([r.id for r in records])
        actions = plan(records, desktops, volumes, busy=busy, now=time.time(), grace_s=self.grace_s, pooled=pooled)
        for action in actions:
            try:
                await self._apply(action)
            except (StaleGeneration, TransitionError, SessionNotFound) as e:
                log.info("reconcile %s %s: superseded (%s)", _name(action), action.session, e)
            except Exception:
                log.exception("reconcile %s %s failed; the next pass retries", _name(action), action.session)
        return actions

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _event(self, type: str, action: Action, **data: object) -> None:
        payload = {"reason": action.reason, **data}
        if isinstance(action, RemoveDesktop | RemoveVolume):
            # About an object whose session may be unknown: firehose only.
            session, generation = None, None
            payload["session"] = action.session
        else:
            session, generation = action.session, action.generation
        await self.bus.publish(
            make_event(type, sandbox=self.sandbox_id, session=session, generation=generation, data=payload)
        )

    async def _apply(self, action: Action) -> None:
        log.info("reconcile: %s %s (%s)", _name(action), action.session, action.reason)
        match action:
            case EnqueueCreate(session=session, generation=generation):
                # arq refuses a job id that is queued or running: only a lost job is enqueued again.
                if await self.queue.enqueue(Operation.CREATE, self.sandbox_id, session, generation):
                    await self._event("reconcile.requeued", action, operation=Operation.CREATE.verb)
            case Resume(session=session, operation=operation, generation=generation):
                await self._event("reconcile.resumed", action, operation=operation.verb)
                self._spawn(self._resume(operation, session, generation))
            case DesktopLost(session=session, generation=generation):
                with contextlib.suppress(DesktopError):
                    await self.runtime.desktops.remove(session, stop_timeout=2)
                await self.store.fail(session, generation, "desktop_lost", action.reason)
            case Recover(session=session, generation=generation):
                if await self.runtime.inner.answers(session):
                    await self.store.transition(session, S.READY, generation=generation, event_data={"recovered": True})
            case RestartDesktop():
                await self._restart(action)
            case Expire(session=session, generation=generation, then=then):
                await self._event("session.expired", action, then=then)
                target, operation = (S.STOPPING, Operation.STOP) if then == "stop" else (S.DELETING, Operation.DELETE)
                record = await self.store.transition(session, target, generation=generation)
                await self.queue.enqueue(operation, self.sandbox_id, record.id, record.generation)
            case RemoveDesktop(name=name):
                await self.runtime.desktops.remove_container_by_name(name)
                await self._event("reconcile.removed", action, kind="desktop", name=name)
            case RemoveVolume(name=name):
                await self.runtime.desktops.remove_volume_by_name(name)
                await self._event("reconcile.removed", action, kind="volume", name=name)
            case _:
                assert_never(action)

    async def _restart(self, action: RestartDesktop) -> None:
        now = time.monotonic()
        recent = [t for t in self._restarts.get(action.session, []) if now - t < RESTART_WINDOW_S]
        if len(recent) >= MAX_RESTARTS:
            with contextlib.suppress(DesktopError):
                await self.runtime.desktops.remove(action.session, stop_timeout=2)
            message = f"the desktop kept stopping ({MAX_RESTARTS} restarts in {RESTART_WINDOW_S / 60:g} min)"
            await self.store.fail(action.session, action.generation, "desktop_lost", message)
            self._restarts.pop(action.session, None)
            return
        self._restarts[action.session] = [*recent, now]
        try:
            await self.runtime.desktops.start(action.session)
        except DesktopError as e:
            with contextlib.suppress(DesktopError):
                await self.runtime.desktops.remove(action.session, stop_timeout=2)
            await self.store.fail(action.session, action.generation, "desktop_lost", f"restarting it failed: {e}")
            return
        await self._event("desktop.restarted", action, attempt=len(recent) + 1)

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resume(self, operation: Operation, session_id: str, generation: int) -> None:
        try:
            result = await self.lifecycle.run(operation, session_id, generation)
            log.info("reconcile: resumed %s of %s: %s", operation, session_id, result)
        except Busy:
            log.info("reconcile: %s of %s is already being worked on", operation, session_id)
        except LeaseLost as e:
            # Stopped midway (within lifecycle.run's deadline, like every resume): the next
            # holder, or a later pass, carries on.
            log.warning("reconcile: resuming %s of %s stopped: %s", operation, session_id, e)
        except Exception:
            log.exception("reconcile: resuming %s of %s failed", operation, session_id)
