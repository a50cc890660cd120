"""Exec routes: run a command in a ready session's desktop, read its status and its output
(SSE, resumable), kill it. Scope ``sessions:exec``; a session of another tenant is 404, as an
unknown one. The route to the desktop is Redis: the API puts the exec on its sandbox's exec
stream and reads its output stream, so it works wherever the worker reaches Redis, at any depth,
with no connection from the API to the sandbox."""

from __future__ import annotations

import base64
import time
from typing import Annotated, Any

from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.response import Stream

from .config import ApiSettings
from .errors import ServiceError
from .exec_output import ExecOutputHub, collect, output_frames
from .exec_store import ExecStore
from .exec_types import (
    ExecFailure,
    ExecJob,
    ExecLimits,
    ExecRecord,
    ExecRequest,
    ExecResult,
    ExecState,
    check_exec_id,
    check_limits,
    exec_argv,
    exec_stdin,
    new_exec_id,
)
from .guards import EXEC, caller
from .service import Sessions
from .sse import StreamLimits, parse_after
from .states import SessionState


def _limits(settings: ApiSettings) -> ExecLimits:
    return ExecLimits(
        max_timeout_s=settings.exec_max_timeout_s,
        max_output_bytes=settings.exec_max_output_bytes,
        max_stdin_bytes=settings.exec_max_stdin_bytes,
    )


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
    settings: ApiSettings = state.settings
    limits = _limits(settings)
    argv = exec_argv(data)
    stdin = exec_stdin(data, limits)
    check_limits(data, limits)
    token = caller(request)
    sessions: Sessions = state.sessions
    session = await sessions.get(session_id, token.visible_tenant)
    if session.state is not SessionState.READY or session.sandbox is None:
        raise ServiceError(
            409, "session_not_ready", f"session {session_id} is {session.state.value}; execs run in ready sessions"
        )
    record = ExecRecord(
        id=new_exec_id(),
        session=session_id,
        sandbox=session.sandbox,
        state=ExecState.QUEUED,
        by=token.name,
        tenant=session.tenant,
        created_at=time.time(),
        timeout_s=data.timeout_s,
        max_output_bytes=data.max_output_bytes,
    )
    job = ExecJob(
        id=record.id,
        session=session_id,
        argv=argv,
        env=dict(data.env),
        cwd=data.cwd,
        user=data.user,
        stdin_base64=base64.b64encode(stdin).decode(),
        timeout_s=data.timeout_s,
        max_output_bytes=data.max_output_bytes,
    )
    store: ExecStore = state.execs
    await store.submit(record, job, session.sandbox, settings.exec_max_per_session)
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
