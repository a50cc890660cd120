"""Exec routes: run a command in a ready session's desktop, read its status and its output
(SSE, resumable), kill it. Scope ``sessions:exec``; a session of another tenant is 404, as an
unknown one. The route to the desktop is Redis: the API puts the exec on its sandbox's exec
stream and reads its output stream, so it works wherever the worker reaches Redis, at any depth,
with no connection from the API to the sandbox."""

from __future__ import annotations

import time
from typing import Annotated, Any

from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.response import Stream

from .config import ApiSettings
from .errors import ServiceError
from .exec_output import ExecOutputHub, collect, output_frames
from .exec_service import ExecService
from .exec_store import ExecStore
from .exec_types import (
    ExecFailure,
    ExecRecord,
    ExecRequest,
    ExecResult,
    ExecState,
    check_exec_id,
)
from .guards import EXEC, caller
from .service import Sessions
from .sse import StreamLimits, parse_after


async def _exec_of(state: State, request: Request[Any, Any, Any], session_id: str, exec_id: str) -> ExecRecord:
    sessions: Sessions = state.sessions
    await sessions.get(session_id, caller(request).visible_tenant)  # 404 for another tenant's
    check_exec_id(exec_id)
    store: ExecStore = state.execs
    record = await store.settle(exec_id)
    if record is None or record.session != session_id:
        raise ServiceError(
            404, "exec_not_found", f"exec {exec_id!r} of session {session_id!r} does not exist", "exec_id"
        )
    return record


@post(
    "/v1/sessions/{session_id:str}/exec",
    status_code=202,
    summary="Run a command in the session's desktop",
    guards=EXEC,
)
async def create_exec(
    session_id: FromPath[str], request: Request[Any, Any, Any], state: State, data: JSONBody[ExecRequest]
) -> Response[ExecRecord] | Response[ExecResult]:
    """202 with the exec's record (its ``id``); with ``wait: true``, 200 with its result when it
    ends (its output capped at ``max_output_bytes``, ``truncated`` when more was printed). A
    timeout kills the command's whole process tree and keeps what it printed."""
    token = caller(request)
    service: ExecService = state.exec_service
    _, record = await service.submit(session_id, data, by=token.name, tenant=token.visible_tenant)
    store: ExecStore = state.execs
    if not data.wait:
        return Response(record, status_code=202)
    hub: ExecOutputHub = state.exec_hub
    return Response(await collect(store, hub, record), status_code=200)


@get("/v1/sessions/{session_id:str}/execs/{exec_id:str}", summary="An exec's status and result", guards=EXEC)
async def get_exec(
    session_id: FromPath[str], exec_id: FromPath[str], request: Request[Any, Any, Any], state: State
) -> ExecRecord:
    return await _exec_of(state, request, session_id, exec_id)


@get(
    "/v1/sessions/{session_id:str}/execs/{exec_id:str}/output",
    summary="An exec's output (Server-Sent Events)",
    guards=EXEC,
)
async def exec_output(
    session_id: FromPath[str],
    exec_id: FromPath[str],
    request: Request[Any, Any, Any],
    state: State,
    after: Annotated[str | None, QueryParameter(description="resume after this entry id (or Last-Event-ID)")] = None,
) -> Stream:
    """``event: stdout`` / ``stderr`` (``{"data": text}``, or ``{"base64": ...}`` for bytes
    that are not UTF-8), then ``event: exit`` with the final record. ``id:`` is the output
    stream's entry id: reconnect with ``Last-Event-ID`` (or ``?after=``) to go on from there."""
    await _exec_of(state, request, session_id, exec_id)
    start = parse_after(request.headers.get("last-event-id"), after) or "0-0"
    settings: ApiSettings = state.settings
    limits: StreamLimits = state.stream_limits
    frames = output_frames(state.execs, state.exec_hub, exec_id, start, settings.sse_keepalive_s)
    return Stream(
        limits.admit(caller(request).name, frames),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@post(
    "/v1/sessions/{session_id:str}/execs/{exec_id:str}/kill",
    status_code=202,
    summary="Kill a running exec (its whole process tree)",
    guards=EXEC,
)
async def kill_exec(
    session_id: FromPath[str], exec_id: FromPath[str], request: Request[Any, Any, Any], state: State
) -> ExecRecord:
    """A queued exec ends at once (``killed_before_start``); a running one is killed by its
    worker (TERM, then KILL a second later) and ends ``exited`` with ``killed: true``. An ended
    one is answered as it is."""
    record = await _exec_of(state, request, session_id, exec_id)
    store: ExecStore = state.execs
    if record.state is ExecState.QUEUED:
        failed = await store.fail_if(
            exec_id, (ExecState.QUEUED,), ExecFailure.KILLED_BEFORE_START, "killed before it started", time.time()
        )
        if failed is not None:
            return failed
        record = await _exec_of(state, request, session_id, exec_id)
    if record.state is ExecState.RUNNING:
        await store.request_kill(record)
    return record


ROUTES = [create_exec, get_exec, exec_output, kill_exec]
