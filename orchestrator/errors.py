"""The project's coded errors: a stable machine ``code`` and a ``message`` for people.

Every refusal that crosses a boundary is one of these (the HTTP API answers with
``{"code", "message", "field"}``; the lifecycle records ``code`` and ``message`` on the
session), so callers branch on codes, never on message text."""

from __future__ import annotations


class CodedError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ServiceError(CodedError):
    """A refusal with an HTTP status (4xx for the caller's mistakes, 503 when a dependency is away)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(code, message)
        self.status = status
        self.field = field
