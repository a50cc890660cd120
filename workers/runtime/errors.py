"""The port's one error, and the one place where Docker's 404 means "absent"."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Literal, TypeVar

from aiodocker.exceptions import DockerError

from orchestrator.errors import CodedError

T = TypeVar("T")

# The stable codes a DesktopError carries; a session's error.code is one of these, or
# desktop_lost / internal_error (README "Deadlines and failures").
DesktopErrorCode = Literal[
    "desktop_create_failed",
    "desktop_exited",
    "desktop_gone",
    "desktop_not_userns",
    "desktop_remove_failed",
    "desktop_start_failed",
    "display_timeout",
    "dockerd_timeout",
    "exec_failed",
    "image_missing",
    "image_pull_failed",
    "preload_failed",
    "preload_timeout",
    "privilege_refused",
    "provision_timeout",
    "resources_exceed_sandbox",
    "terminal_failed",
    "volume_create_failed",
    "volume_lost",
    "volume_not_userns",
    "volume_remove_failed",
]


class DesktopError(CodedError):
    """A failure with a stable code, recorded on the session as its error."""

    code: DesktopErrorCode

    def __init__(self, code: DesktopErrorCode, message: str) -> None:
        super().__init__(code, message)


async def unless_absent(call: Awaitable[T]) -> T | None:
    """``await call``, or None when Docker answers 404 (the object does not exist)."""
    try:
        return await call
    except DockerError as e:
        if e.status == 404:
            return None
        raise


async def existed(call: Awaitable[None]) -> bool:
    """Run a removal: True if it removed something, False if there was nothing (404)."""

    async def done() -> bool:
        await call
        return True

    return await unless_absent(done()) is not None
