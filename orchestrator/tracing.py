"""Trace ids through the queue: one id per API request (from a W3C ``traceparent`` header, or
new), carried in the lifecycle job, and found in every event and log line of that operation.

Held in a context variable: the API sets it per request, the worker per job (each arq job runs
in its own task, so jobs never see each other's). ``install`` puts it on every log record.
"""

from __future__ import annotations

import contextvars
import logging
import re
import secrets
from typing import Any

current: contextvars.ContextVar[str | None] = contextvars.ContextVar("orchestrator_trace", default=None)

# version-traceid-parentid-flags; an all-zero trace id is invalid.
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
TRACE_ID = re.compile(r"^[0-9a-f]{32}$")


def from_traceparent(header: str | None) -> str | None:
    """The trace id of a valid ``traceparent`` header, else None (a bad one is ignored, as the
    W3C spec asks, and a new trace starts)."""
    if not header:
        return None
    match = _TRACEPARENT.fullmatch(header.strip().lower())
    if match is None or match.group(1) == "0" * 32:
        return None
    return match.group(1)


def new_trace_id() -> str:
    return secrets.token_hex(16)


def traceparent(trace_id: str) -> str:
    """A header that continues ``trace_id`` (with a new span id) for whoever we call or answer."""
    return f"00-{trace_id}-{secrets.token_hex(8)}-01"


_installed = False


def install() -> None:
    """Every log record gets ``trace`` (the current id, or "-"), so a format can show it."""
    global _installed
    if _installed:
        return
    _installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.trace = current.get() or "-"
        return record

    logging.setLogRecordFactory(factory)
