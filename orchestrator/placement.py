"""Which sandbox a new session goes to. Pure."""

from __future__ import annotations

from collections.abc import Sequence

from .schemas import Resources, SandboxInfo


class NoSandbox(Exception):
    pass


def choose_sandbox(live: Sequence[SandboxInfo], requested: str | None, default: str | None) -> str:
    """A requested sandbox must be live; otherwise the live one with the most free room wins
    (ties by id, so placement is deterministic). With none live, the configured default (if
    any) takes the job: its queue holds it until that sandbox's worker comes up."""
    if requested is not None:
        if live and requested not in {s.id for s in live}:
            raise NoSandbox(f"sandbox {requested!r} is not running (live: {', '.join(s.id for s in live)})")
        return requested
    candidates = [s for s in live if s.sessions < s.capacity]
    if candidates:
        return min(candidates, key=lambda s: (s.sessions / max(s.capacity, 1), s.id)).id
    if live:
        raise NoSandbox("every live sandbox is at capacity")
    if default is None:
        raise NoSandbox("no sandbox is running (none has sent a heartbeat recently)")
    return default


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
