"""Which sandbox a new session goes to. Pure: the rule lives here, and production runs it:
``SessionStore.place`` reads the candidates from Redis, chooses with ``choose``, and reserves
the choice with a script that re-checks it (reservation.RESERVE_LUA), retrying when it changed.

The rule, least loaded with a hard cap:
1. candidates are the sandboxes that are available (heartbeat fresh, not draining), carry
   every label the session's constraints ask for, and, when the session names one, that one;
2. a candidate with ``placed >= cap`` is full and never chosen; nor is one whose last heartbeat
   said its disk is below its free-disk watermark (``low_disk``): its desktops keep the room
   that is left;
3. among the rest, the lowest ``placed / cap`` wins; ties go to fewer placed sessions, then
   to the smaller id, so the choice is deterministic;
4. for a create a warm desktop can serve, candidates that have one come first.

``placed`` counts the sessions a sandbox holds until they are deleted: a stopped session keeps
its place (its volume lives on that sandbox), so a resume is never refused for capacity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .schemas import Resources, SandboxInfo


class NoSandbox(Exception):
    """No sandbox is there to take the session (503 ``no_sandbox``)."""


class Unsatisfiable(Exception):
    """No known sandbox could ever take the session as asked (422): ``field`` says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class NoCapacity(Exception):
    """Sandboxes are there but every eligible one is full or low on disk (503 ``no_capacity``)."""


@dataclass(frozen=True)
class Candidate:
    id: str
    placed: int
    cap: int
    warm: bool = False
    # Below its free-disk watermark (``low_disk``): never chosen, as if full.
    low_disk: bool = False

    @property
    def full(self) -> bool:
        return self.placed >= self.cap


def better(a: Candidate, b: Candidate, prefer_warm: bool) -> bool:
    """Whether ``a`` beats ``b`` under the rule (exact: cross-multiplied ratios)."""
    aw, bw = prefer_warm and a.warm, prefer_warm and b.warm
    if aw != bw:
        return aw
    left, right = a.placed * b.cap, b.placed * a.cap
    if left != right:
        return left < right
    if a.placed != b.placed:
        return a.placed < b.placed
    return a.id < b.id


def choose(candidates: Sequence[Candidate], prefer_warm: bool = False) -> Candidate | None:
    """The winner among ``candidates`` that are neither full nor low on disk, or None."""
    best: Candidate | None = None
    for c in candidates:
        if c.full or c.low_disk:
            continue
        if best is None or better(c, best, prefer_warm):
            best = c
    return best


def eligible(
    sandboxes: Sequence[SandboxInfo], requested: str | None, constraints: Mapping[str, str]
) -> list[SandboxInfo]:
    """Rule step 1. Raises Unsatisfiable when no known sandbox could ever match (the caller's
    mistake) and NoSandbox when some could but none is available now."""
    if requested is not None:
        named = [s for s in sandboxes if s.id == requested]
        if not named:
            known = ", ".join(s.id for s in sandboxes) or "none"
            raise Unsatisfiable("sandbox", f"sandbox {requested!r} is unknown (known: {known})")
        sandboxes = named
    if constraints:
        wanted = ", ".join(f"{k}={v}" for k, v in sorted(constraints.items()))
        sandboxes = [s for s in sandboxes if all(s.labels.get(k) == v for k, v in constraints.items())]
        if not sandboxes:
            raise Unsatisfiable("constraints", f"no known sandbox has the labels {wanted}")
    available = [s for s in sandboxes if s.status == "available"]
    if not available:
        if requested is not None:
            raise NoSandbox(f"sandbox {requested!r} is {sandboxes[0].status}, not taking new sessions")
        raise NoSandbox("no sandbox that could take it is available (silent, draining or drained)")
    return available


def low_disk(sandbox: SandboxInfo) -> str | None:
    """Why placement skips ``sandbox`` for its disk (None: it does not). The worker measures
    its dockerd's data root each heartbeat and says its own watermark (0: none)."""
    floor = sandbox.min_free_disk_bytes
    if floor <= 0 or sandbox.free_disk_bytes >= floor:
        return None
    return f"{sandbox.id}: {_gib(sandbox.free_disk_bytes)} free, below its watermark of {_gib(floor)}"


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def resource_problem(
    resources: Resources, max_cpus: float, max_memory_mb: int, max_pids: int
) -> tuple[str, str] | None:
    """(field, message) for the first limit a session asks beyond the sandbox's maximum."""
    if resources.cpus is not None and max_cpus and resources.cpus > max_cpus:
        return "resources.cpus", f"cpus {resources.cpus:g} exceeds this sandbox's maximum of {max_cpus:g}"
    if resources.memory_mb is not None and max_memory_mb and resources.memory_mb > max_memory_mb:
        return "resources.memory_mb", f"memory_mb {resources.memory_mb} exceeds the maximum of {max_memory_mb}"
    if resources.pids is not None and max_pids and resources.pids > max_pids:
        return "resources.pids", f"pids {resources.pids} exceeds this sandbox's maximum of {max_pids}"
    return None
