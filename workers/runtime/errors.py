"""The port's one error, and the one place where Docker's 404 means "absent"."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from aiodocker.exceptions import DockerError

T = TypeVar("T")


class DesktopError(Exception):
    """A failure with a stable code, recorded on the session as its error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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
