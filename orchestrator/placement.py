"""Which sandbox a new session goes to. Pure."""

from __future__ import annotations

from collections.abc import Sequence

from .schemas import SandboxInfo


class NoSandbox(Exception):
    pass


def choose_sandbox(live: Sequence[SandboxInfo], requested: str | None, default: str) -> str:
    """A requested sandbox must be live; otherwise the live one with the most free room wins
    (ties by id, so placement is deterministic). With none live, the configured default takes
    the job: its queue holds it until that sandbox's worker comes up."""
    if requested is not None:
        if live and requested not in {s.id for s in live}:
            raise NoSandbox(f"sandbox {requested!r} is not running (live: {', '.join(s.id for s in live)})")
        return requested
    candidates = [s for s in live if s.sessions < s.capacity]
    if candidates:
        return min(candidates, key=lambda s: (s.sessions / max(s.capacity, 1), s.id)).id
    if live:
        raise NoSandbox("every live sandbox is at capacity")
    return default
