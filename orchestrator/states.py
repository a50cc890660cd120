"""The session state machine: pure, no I/O. Every stored transition is checked here first."""

from __future__ import annotations

import enum


class SessionState(enum.StrEnum):
    PENDING = "pending"
    CREATING = "creating"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    DELETING = "deleting"
    DELETED = "deleted"
    FAILED = "failed"


S = SessionState

# States in which a job is (or should be) working on the session.
IN_PROGRESS: frozenset[SessionState] = frozenset({S.PENDING, S.CREATING, S.STARTING, S.STOPPING, S.DELETING})

_FORWARD: dict[SessionState, frozenset[SessionState]] = {
    S.PENDING: frozenset({S.CREATING}),
    S.CREATING: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.READY}),
    S.READY: frozenset({S.STOPPING}),
    S.STOPPING: frozenset({S.STOPPED}),
    S.STOPPED: frozenset({S.STARTING}),
    # A failed session can still be stopped (its desktop removed, volume kept) or deleted.
    # failed -> ready: only a session failed because its sandbox went silent, recovered by
    # that sandbox's reconciler when it returns with the desktop still answering.
    S.FAILED: frozenset({S.STOPPING, S.READY}),
    S.DELETING: frozenset({S.DELETED}),
    S.DELETED: frozenset(),
}


class TransitionError(Exception):
    def __init__(self, current: SessionState, target: SessionState) -> None:
        super().__init__(f"a session cannot go from {current.value!r} to {target.value!r}")
        self.current = current
        self.target = target


def allowed(current: SessionState, target: SessionState) -> bool:
    if current is S.DELETED:
        return False
    if target is S.DELETING:
        return current is not S.DELETING
    if target is S.FAILED:
        # A ready session fails too when its desktop is lost (the reconciler finds it gone).
        # A delete never turns into a failure (say, of the create it interrupted): once asked
        # for, it is carried out, retried by the reconciler if a step fails.
        return (current in IN_PROGRESS and current is not S.DELETING) or current is S.READY
    return target in _FORWARD[current]


def check(current: SessionState, target: SessionState) -> None:
    if not allowed(current, target):
        raise TransitionError(current, target)


def is_final(state: SessionState) -> bool:
    return state is S.DELETED


class SandboxStatus(enum.StrEnum):
    """A sandbox as placement and operators see it (orchestrator/sandboxes.py owns the protocol).

    A worker reports available, draining or drained in its heartbeat; a reader reports
    unavailable when the sandbox's alive key has expired (its heartbeats stopped)."""

    AVAILABLE = "available"
    DRAINING = "draining"
    DRAINED = "drained"
    UNAVAILABLE = "unavailable"

    @property
    def live(self) -> bool:
        """Heartbeats are fresh (it may still be finishing work while draining)."""
        return self in (SandboxStatus.AVAILABLE, SandboxStatus.DRAINING)
