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
    """A labelled desktop nobody needs: its session was deleted (tombstone), is the pool's own
    unfinished one, or is stopped or failed."""

    session: str
    name: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class RemoveVolume:
    """A labelled volume whose session was deleted (tombstone) or is the pool's unfinished one."""

    session: str
    name: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class KeepUnknown:
    """A labelled object that no record, tombstone or pool entry explains. Never removed on
    the absence of evidence (Redis may have been emptied, or this worker reads another db or
    prefix): kept, and an alarm raised. An operator re-adopts it (README "The reconciler")."""

    session: str
    name: str
    kind: Literal["desktop", "volume"]
    reason: str
    # None of the sandbox's labelled objects is known to Redis: emptied, or the wrong db/prefix.
    redis_looks_empty: bool = False


Action = (
    EnqueueCreate
    | Resume
    | DesktopLost
    | RestartDesktop
    | Recover
    | Expire
    | RemoveDesktop
    | RemoveVolume
    | KeepUnknown
)


@dataclass(frozen=True)
class Evidence:
    """What Redis positively says about sessions that have no record: removable, and why."""

    # A tombstone (session-deleted:<id>): deleted within ORCH_TOMBSTONE_TTL.
    deleted: frozenset[str] = frozenset()
    # In the pool's making set (pool-making:<sandbox>) and not being made now: a warm desktop
    # the pool made and never handed out.
    pool_made: frozenset[str] = frozenset()

    def why(self, session: str) -> str | None:
        if session in self.deleted:
            return "its session was deleted"
        if session in self.pool_made:
            return "a warm desktop the pool never finished"
        return None


NOTHING = Evidence()
MAX_REMOVALS = 20
# Names one alarm event carries at most (the count is exact).
ALARM_NAMES = 100
UNKNOWN = "no record, tombstone or pool entry explains it: kept"


def plan(
    records: Iterable[SessionRecord],
    desktops: Iterable[DockerObject],
    volumes: Iterable[DockerObject],
    *,
    busy: set[str],
    now: float,
    grace_s: float,
    pooled: frozenset[str] = frozenset(),
    evidence: Evidence = NOTHING,
    max_removals: int = MAX_REMOVALS,
) -> list[Action]:
    """Corrections for one sandbox. ``records`` are this sandbox's sessions; ``busy`` are those
    whose lease is held (some worker is on it: leave them alone); ``pooled`` are the warm
    pool's desktops (no record yet, and none of the reconciler's business). An object with no
    record goes only on ``evidence``; at most ``max_removals`` objects go per pass."""
    by_id = {r.id: r for r in records}
    desktops, volumes = list(desktops), list(volumes)
    desktop_of = {d.session: d for d in desktops}
    actions: list[Action] = []
    for r in by_id.values():
        if r.id not in busy:
            action = _session_action(r, desktop_of.get(r.id), now, grace_s)
            if action is not None:
                actions.append(action)
    orphans = [o for o in (*desktops, *volumes) if o.session not in by_id and o.session not in pooled]
    actions.extend(_orphan_actions(orphans, evidence, now, grace_s, everything=len(desktops) + len(volumes)))
    return _capped(actions, max_removals)


def _orphan_actions(
    orphans: list[DockerObject], evidence: Evidence, now: float, grace_s: float, *, everything: int
) -> list[Action]:
    """Record-less objects: removed on evidence (once past the grace: a create may be between
    its steps), else kept and reported. None known at all means Redis looks empty or foreign."""
    unknown = [o for o in orphans if evidence.why(o.session) is None]
    keep, empty = UNKNOWN, bool(unknown) and len(unknown) == everything
    if empty:
        keep = f"{UNKNOWN}; Redis looks empty or foreign: none of this sandbox's {everything} objects is known to it"
    actions: list[Action] = []
    for o in orphans:
        if now - o.created_at < grace_s:
            continue
        why = evidence.why(o.session)
        if why is None:
            actions.append(
                KeepUnknown(session=o.session, name=o.name, kind=o.kind, reason=keep, redis_looks_empty=empty)
            )
        elif o.kind == "desktop":
            actions.append(RemoveDesktop(session=o.session, name=o.name, reason=why))
        else:
            actions.append(RemoveVolume(session=o.session, name=o.name, reason=why))
    return actions


def _capped(actions: list[Action], max_removals: int) -> list[Action]:
    """At most ``max_removals`` removals (the first ones: desktops before their volumes); the
    rest wait for the next pass. A bound on what one wrong pass can destroy."""
    out: list[Action] = []
    removals = 0
    for a in actions:
        if isinstance(a, RemoveDesktop | RemoveVolume):
            removals += 1
            if removals > max_removals:
                continue
        out.append(a)
    return out


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
    def __init__(
        self,
        lifecycle: Lifecycle,
        queue: JobQueue,
        *,
        grace_s: float,
        pool: WarmPool | None = None,
        max_removals: int = MAX_REMOVALS,
    ) -> None:
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
        self.max_removals = max_removals
        # Objects kept for want of evidence: how many the last pass saw (the worker's gauge),
        # and the names already alarmed about in this run (one event per object per run).
        self.unknown_objects = 0
        self._alarmed: set[str] = set()
        # Recent restarts per session (monotonic times): the restart budget.
        self._restarts: dict[str, list[float]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def pass_once(self) -> list[Action]:
        # The pool first: a claim turns a pooled id into a record atomically, so read in this
        # order no claimed desktop is ever seen with neither.
        pooled = frozenset(await self.pool.known()) if self.pool is not None else frozenset()
        records = await self.store.list(sandbox=self.sandbox_id)
        desktops = await self.runtime.desktops.list_desktops()
        volumes = await self.runtime.desktops.list_volumes()
        busy = await self.locks.held([r.id for r in records])
        known = {r.id for r in records} | pooled
        pooled, evidence = await self._evidence(known, pooled, {o.session for o in (*desktops, *volumes)})
        actions = plan(
            records,
            desktops,
            volumes,
            busy=busy,
            now=time.time(),
            grace_s=self.grace_s,
            pooled=pooled,
            evidence=evidence,
            max_removals=self.max_removals,
        )
        await self._alarm([a for a in actions if isinstance(a, KeepUnknown)])
        for action in actions:
            if isinstance(action, KeepUnknown):
                continue
            try:
                await self._apply(action)
            except (StaleGeneration, TransitionError, SessionNotFound) as e:
                log.info("reconcile %s %s: superseded (%s)", _name(action), action.session, e)
            except Exception:
                log.exception("reconcile %s %s failed; the next pass retries", _name(action), action.session)
        return actions

    async def _evidence(
        self, known: set[str], pooled: frozenset[str], present: set[str]
    ) -> tuple[frozenset[str], Evidence]:
        """Read after the Docker listing, for the objects the records did not explain: which
        have a record by now (made meanwhile: not orphans), which a tombstone, which are the
        pool's own unfinished ones. Redis emptied or foreign answers none: nothing is removable."""
        # Every pass (also forgets making-set ids whose objects are all gone).
        pool_made = await self.pool.leftovers(present) if self.pool is not None else set()
        unknown = sorted(present - known)
        if not unknown:
            return pooled, NOTHING
        now_known = await self.store.existing(unknown)
        if self.pool is not None:
            now_known |= await self.pool.known()  # made ready meanwhile
        rest = [i for i in unknown if i not in now_known]
        deleted = await self.store.deleted(rest)
        return pooled | frozenset(now_known), Evidence(frozenset(deleted), frozenset(pool_made) - now_known)

    async def _alarm(self, kept: list[KeepUnknown]) -> None:
        """Objects kept for want of evidence: a gauge every pass; a warning and a
        ``reconcile.unknown_objects`` event for each object the first time this run sees it."""
        self.unknown_objects = len(kept)
        new = [k for k in kept if k.name not in self._alarmed]
        if not new:
            return
        self._alarmed.update(k.name for k in new)
        names = [k.name for k in new]
        reason, empty = new[0].reason, any(k.redis_looks_empty for k in kept)
        log.warning(
            "reconcile: %d labelled object(s) with no record, tombstone or pool entry kept, not removed (%s): %s",
            len(kept),
            reason,
            ", ".join(names[:20]),
        )
        data = {
            "count": len(kept),
            "names": names[:ALARM_NAMES],
            "sessions": sorted({k.session for k in new})[:ALARM_NAMES],
            "redis_looks_empty": empty,
            "reason": reason,
        }
        await self.bus.publish(make_event("reconcile.unknown_objects", sandbox=self.sandbox_id, data=data))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _event(self, type: str, action: Action, **data: object) -> None:
        payload = {"reason": action.reason, **data}
        if isinstance(action, RemoveDesktop | RemoveVolume | KeepUnknown):
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
            case KeepUnknown():
                pass  # never removed: alarmed about in pass_once
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
            if e.code != "desktop_gone":
                # A failed start spends one attempt of the budget and the next pass tries again
                # (a sandbox daemon that is itself restarting refuses starts for a moment).
                log.warning("reconcile: restarting %s's desktop failed (%s); the next pass retries", action.session, e)
                return
            await self.store.fail(action.session, action.generation, "desktop_lost", e.message)
            return
        await self._event("desktop.restarted", action, attempt=len(recent) + 1)

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resume(self, operation: Operation, session_id: str, generation: int) -> None:
        try:
            result = await self.lifecycle.run(operation, session_id, generation, resumed=True)
            log.info("reconcile: resumed %s of %s: %s", operation, session_id, result)
        except Busy:
            log.info("reconcile: %s of %s is already being worked on", operation, session_id)
        except LeaseLost as e:
            # Stopped midway (within lifecycle.run's deadline, like every resume): the next
            # holder, or a later pass, carries on.
            log.warning("reconcile: resuming %s of %s stopped: %s", operation, session_id, e)
        except Exception:
            log.exception("reconcile: resuming %s of %s failed", operation, session_id)
