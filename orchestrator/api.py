"""The HTTP API (Litestar): validation at the edge, errors as {code, message}, SSE events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any

import anyio
import msgspec
from litestar import Litestar, Request, Response, Router, delete, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, YamlRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter
from litestar.response import Stream
from litestar.types import ExceptionHandlersMap
from redis.exceptions import NoPermissionError, RedisError

from . import (
    __version__,
    api_dashboard,
    api_display,
    api_execs,
    api_files,
    api_metrics,
    api_ports,
    api_screen,
    api_terminal,
    auth,
    tracing,
)
from .access import AccessRouter
from .access_types import AccessRoute
from .auth import AuthError
from .commands import CommandConsumer
from .config import ApiSettings, Settings
from .core import connect
from .errors import ServiceError
from .events import EventBus
from .exec_output import ExecOutputHub
from .exec_service import ExecService
from .exec_store import ExecStore
from .guards import ADMIN, ANY_TOKEN, EVENTS, READ, WRITE, caller, token_of
from .http_headers import add_security_headers
from .hub import StreamHub
from .loops import every
from .monitor import SandboxMonitor
from .redis_conn import redis_client
from .schemas import ErrorBody, SandboxInfo, SandboxList, SandboxRetired, SessionCreate, SessionList, SessionRecord
from .service import Sessions, check_session_id
from .sse import EventFeed, EventFilter, StreamLimits, check_filter_counts, parse_after
from .states import SessionState

log = logging.getLogger("orchestrator.api")


def _error(status: int, code: str, message: str, field: str | None = None) -> Response[ErrorBody]:
    return Response(ErrorBody(code=code, message=message, field=field), status_code=status)


def _service_error(_: Request[Any, Any, Any], exc: ServiceError) -> Response[ErrorBody]:
    return _error(exc.status, exc.code, exc.message, exc.field)


_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]+)`")


def _validation_error(_: Request[Any, Any, Any], exc: ValidationException) -> Response[ErrorBody]:
    extra = exc.extra if isinstance(exc.extra, list) else []
    detail = extra[0] if extra and isinstance(extra[0], dict) else {}
    message = str(detail.get("message") or exc.detail)
    key = detail.get("key")
    field = None if key in (None, "body", "data") else str(key)
    unknown = _UNKNOWN_FIELD.search(message)
    if unknown:
        field = unknown.group(1)
    if field and field not in message:
        message = f"{field}: {message}"
    return _error(400, "invalid_request", message, field)


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorBody]:
    detail = str(exc.detail)
    if exc.status_code == 400 and "malformed" in detail.lower():
        return _error(400, "invalid_json", detail)
    codes = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 401: "unauthorized"}
    code = codes.get(exc.status_code, "bad_request" if exc.status_code == 400 else "http_error")
    if exc.status_code == 413:
        detail = f"request body is larger than {request.app.request_max_body_size} bytes"
    return _error(exc.status_code, code, detail)


def _redis_error(_: Request[Any, Any, Any], exc: RedisError) -> Response[ErrorBody]:
    """Redis away, or every pooled connection busy past the pool's wait: a dependency, not a
    bug (503, so clients retry), with the details in the log only."""
    if isinstance(exc, NoPermissionError):
        # Not an outage: this process's ACL user lacks a command or key (docs/redis.md).
        log.error("Redis refused a command by its ACL (fix the API user's ACL): %s", exc)
    else:
        log.warning("Redis unavailable for a request: %s", exc)
    return _error(503, "redis_unavailable", "the store is unavailable; retry shortly")


def _internal_error(_: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    log.exception("unhandled error", exc_info=exc)
    return _error(500, "internal_error", "internal error; the server log has the details")


def _auth_error(_: Request[Any, Any, Any], exc: AuthError) -> Response[ErrorBody]:
    response = _error(exc.status, exc.code, exc.message)
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="orchestrator"'
    return response


def _sessions(state: State) -> Sessions:
    sessions: Sessions = state.sessions
    return sessions


@post("/v1/sessions", status_code=202, summary="Create a session", guards=WRITE)
async def create_session(
    request: Request[Any, Any, Any],
    state: State,
    data: JSONBody[SessionCreate | None] = None,
    idempotency_key: Annotated[
        str | None, HeaderParameter(name="Idempotency-Key", description="a retried create returns the same session")
    ] = None,
) -> Response[SessionRecord]:
    # An empty body is a session with every default.
    # The session is the token's tenant's (admin tokens' too: admin sees all, but owns its own).
    created, record = await _sessions(state).create(data or SessionCreate(), idempotency_key, caller(request).tenant)
    return Response(record, status_code=202 if created else 200)


@get("/v1/sessions", summary="List sessions", guards=READ)
async def list_sessions(
    request: Request[Any, Any, Any],
    state: State,
    session_state: Annotated[SessionState | None, QueryParameter(name="state")] = None,
    label: Annotated[list[str] | None, QueryParameter(description="k=v; repeat to require several")] = None,
) -> SessionList:
    tenant = caller(request).visible_tenant
    return SessionList(sessions=await _sessions(state).list(session_state, _label_pairs(label), tenant))


# Each session verb sees the caller's tenant's sessions only (admin: all); another tenant's is
# 404 session_not_found, the answer an unknown id gets (service.py).


@get("/v1/sessions/{session_id:str}", summary="Get a session", guards=READ)
async def get_session(session_id: FromPath[str], request: Request[Any, Any, Any], state: State) -> SessionRecord:
    return await _sessions(state).get(session_id, caller(request).visible_tenant)


@post("/v1/sessions/{session_id:str}/stop", status_code=202, summary="Stop a session (keeps its volume)", guards=WRITE)
async def stop_session(session_id: FromPath[str], request: Request[Any, Any, Any], state: State) -> SessionRecord:
    return await _sessions(state).stop(session_id, caller(request).visible_tenant)


@post("/v1/sessions/{session_id:str}/start", status_code=202, summary="Start a stopped session again", guards=WRITE)
async def start_session(session_id: FromPath[str], request: Request[Any, Any, Any], state: State) -> SessionRecord:
    return await _sessions(state).start(session_id, caller(request).visible_tenant)


@delete(
    "/v1/sessions/{session_id:str}",
    status_code=202,
    summary="Delete a session, its desktop and volume",
    guards=WRITE,
)
async def delete_session(session_id: FromPath[str], request: Request[Any, Any, Any], state: State) -> SessionRecord:
    return await _sessions(state).delete(session_id, caller(request).visible_tenant)


def _sse(request: Request[Any, Any, Any], feed: EventFeed) -> Stream:
    """The stream, holding one of its token's slots (429 ``too_many_streams`` over a cap)."""
    limits: StreamLimits = request.app.state.stream_limits
    return Stream(
        limits.admit(token_of(request).name, feed.frames()),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _check_query(request: Request[Any, Any, Any], settings: ApiSettings) -> None:
    length = len(request.scope.get("query_string", b""))
    if length > settings.max_query_bytes:
        raise ServiceError(
            414, "query_too_long", f"the query string has {length} bytes; at most {settings.max_query_bytes}"
        )


def _filter(
    types: list[str] | None, sessions: list[str] | None, labels: list[str] | None, tenant: str | None
) -> EventFilter:
    check_filter_counts(type=types, session=sessions, label=labels)  # before any is parsed
    for session_id in sessions or []:
        check_session_id(session_id)
    return EventFilter(
        types=tuple(types or ()), sessions=frozenset(sessions or ()), labels=_label_pairs(labels), tenant=tenant
    )


async def _check_stream_exists(state: State, session_id: str, tenant: str | None) -> None:
    """A session's stream exists for a record or for a stream still kept (a deleted session's
    events stay readable until its stream expires); anything else is 404, so made-up ids open
    nothing. For a tenant's token (``tenant``), it must be its tenant's: the record's, or when
    the record is gone, the tenant its newest events carry; else the same 404."""
    keys = state.core.keys
    missing = ServiceError(404, "session_not_found", f"session {session_id!r} does not exist", "session_id")
    if tenant is None:
        if not await state.redis.exists(keys.session(session_id), keys.session_events(session_id)):  # one trip
            raise missing
        return
    record = await _sessions(state).store.get(session_id)
    owner: str | None
    if record is not None:
        owner = record.tenant
    else:
        bus: EventBus = state.bus
        owner = await bus.recent_tenant(keys.session_events(session_id))
    if owner != tenant:
        raise missing


def _label_pairs(items: list[str] | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ServiceError(400, "invalid_label_filter", f"label filter {item!r} must look like key=value", "label")
        labels[key] = value
    return labels


async def _labels_of(state: State, session_id: str, tenant: str | None) -> dict[str, str] | None:
    # The tenant too: an id another tenant made anew since must not lend its labels to old events.
    record = await _sessions(state).store.get(session_id, tenant=tenant)
    return None if record is None else record.spec.labels


TypeFilter = Annotated[
    list[str] | None, QueryParameter(name="type", description="event type, or prefix with *; repeatable")
]
LabelFilter = Annotated[list[str] | None, QueryParameter(description="k=v of the session's labels; repeatable")]
After = Annotated[str | None, QueryParameter(description="resume after this event id (or Last-Event-ID)")]
Follow = Annotated[bool, QueryParameter(description="false: send what is stored, then end")]


@get("/v1/events", summary="All events (Server-Sent Events)", guards=EVENTS)
async def firehose_events(
    request: Request[Any, Any, Any],
    state: State,
    after: After = None,
    follow: Follow = True,
    type_: TypeFilter = None,
    session: Annotated[list[str] | None, QueryParameter(description="session id; repeatable")] = None,
    label: LabelFilter = None,
) -> Stream:
    """Live by default; ``?after=0`` replays what is kept. A tenant's token gets its tenant's
    session events only; sandbox events (no session) and events without a tenant are admin's."""
    _check_query(request, state.settings)
    bus: EventBus = state.bus
    stream = bus.stream_key(None)
    tenant = caller(request).visible_tenant
    feed_filter = _filter(type_, session, label, tenant)
    start = parse_after(request.headers.get("last-event-id"), after)
    if start is None:
        start = await bus.last_id(stream) if follow else "0-0"
    return _sse(
        request,
        EventFeed(
            bus,
            stream,
            start,
            state.settings.sse_keepalive_s,
            follow,
            feed_filter,
            labels_of=lambda sid: _labels_of(state, sid, tenant),
            hub=state.hub,
        ),
    )


@get("/v1/sessions/{session_id:str}/events", summary="A session's events (Server-Sent Events)", guards=EVENTS)
async def session_events(
    session_id: FromPath[str],
    request: Request[Any, Any, Any],
    state: State,
    after: After = None,
    follow: Follow = True,
    type_: TypeFilter = None,
) -> Stream:
    """From the session's beginning by default: a dashboard sees the whole history."""
    _check_query(request, state.settings)
    check_session_id(session_id)
    bus: EventBus = state.bus
    start = parse_after(request.headers.get("last-event-id"), after) or "0-0"
    tenant = caller(request).visible_tenant
    # Filtered by tenant as well: a deleted id made anew by another tenant shares the stream key.
    feed_filter = _filter(type_, None, None, tenant)
    await _check_stream_exists(state, session_id, tenant)
    feed = EventFeed(
        bus, bus.stream_key(session_id), start, state.settings.sse_keepalive_s, follow, feed_filter, hub=state.hub
    )
    return _sse(request, feed)


@get("/v1/sandboxes", summary="Live sandboxes (from their heartbeats)", guards=ADMIN)
async def list_sandboxes(state: State) -> SandboxList:
    return SandboxList(sandboxes=await _sessions(state).sandboxes())


StopDesktops = Annotated[
    bool, QueryParameter(description="also stop its ready sessions (their dockerd stops containers); volumes stay")
]


@post("/v1/sandboxes/{sandbox_id:str}/drain", summary="Drain a sandbox", guards=ADMIN, status_code=202)
async def drain_sandbox(sandbox_id: FromPath[str], state: State, stop_desktops: StopDesktops = False) -> SandboxInfo:
    """No new sessions go there; its worker finishes queued and running jobs, optionally stops
    its desktops, publishes ``sandbox.drained`` and exits. Stays drained until undrained."""
    return await _sessions(state).drain(sandbox_id, stop_desktops)


@delete("/v1/sandboxes/{sandbox_id:str}/drain", summary="Undrain a sandbox", guards=ADMIN, status_code=200)
async def undrain_sandbox(sandbox_id: FromPath[str], state: State) -> SandboxInfo:
    """Take sessions again (a drained worker that was restarted resumes serving)."""
    return await _sessions(state).undrain(sandbox_id)


@post(
    "/v1/sandboxes/{sandbox_id:str}/retire",
    summary="Retire a sandbox that will not return",
    guards=ADMIN,
    status_code=202,
)
async def retire_sandbox(sandbox_id: FromPath[str], state: State) -> SandboxRetired:
    """For an unavailable or drained sandbox that is gone for good: each of its sessions is
    deleted (``reason: sandbox_retired``, ``volume_removed: false``), it is listed no more and
    its heartbeats are refused. 409 ``sandbox_live`` while it is available or draining."""
    return await _sessions(state).retire(sandbox_id)


@get("/healthz", summary="Liveness and Redis reachability")
async def healthz(state: State) -> Response[dict[str, Any]]:
    try:
        async with asyncio.timeout(2):
            await state.redis.ping()
    except Exception as e:
        # Open to anyone: the error (host, port, auth failure) goes to the log, not the caller.
        log.warning("healthz: Redis does not answer: %s", e)
        return Response({"status": "unhealthy", "redis": "unreachable"}, status_code=503)
    return Response({"status": "ok", "version": __version__})


@get("/metrics", summary="Prometheus metrics", media_type="text/plain; version=0.0.4", guards=ADMIN)
async def metrics(state: State) -> str:
    pool = state.get("port_connections")
    snapshot = await api_metrics.read_snapshot(
        _sessions(state),
        state.core,
        state.hub.followers,
        state.access.opened,
        await state.commands.lag(),
        None if pool is None else api_metrics.PortPoolStats(kept=len(pool), opened=pool.opened, reused=pool.reused),
    )
    return api_metrics.render(snapshot)


@get("/openapi.json", include_in_schema=False, guards=ANY_TOKEN)
async def openapi_json(request: Request[Any, Any, Any]) -> Response[bytes]:
    schema = request.app.openapi_schema.to_schema()
    return Response(msgspec.json.encode(schema), media_type="application/json")


async def _begin_trace(request: Request[Any, Any, Any]) -> None:
    """Each request is an operation with a trace id: the caller's (W3C traceparent) or new."""
    tracing.current.set(tracing.from_traceparent(request.headers.get("traceparent")) or tracing.new_trace_id())


async def _answer_trace(response: Response[Any]) -> Response[Any]:
    trace = tracing.current.get()
    if trace is not None:
        response.headers["traceparent"] = tracing.traceparent(trace)
    return response


ROUTES = [
    create_session,
    list_sessions,
    get_session,
    stop_session,
    start_session,
    delete_session,
    firehose_events,
    session_events,
    list_sandboxes,
    drain_sandbox,
    undrain_sandbox,
    retire_sandbox,
    healthz,
    metrics,
    openapi_json,
    *api_dashboard.ROUTES,
    *api_execs.ROUTES,
    *api_terminal.ROUTES,
    *api_files.ROUTES,
    *api_ports.ROUTES,
    *api_display.ROUTES,
    *api_screen.ROUTES,
]
EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    ServiceError: _service_error,
    AuthError: _auth_error,
    ValidationException: _validation_error,
    HTTPException: _http_error,
    RedisError: _redis_error,
    Exception: _internal_error,
}
OPENAPI = OpenAPIConfig(
    title="Nested desktop orchestrator",
    version=__version__,
    # Schema files under /docs, behind a token like everything but /healthz. No HTML viewer:
    # each of Litestar's loads third-party scripts (a CDN) into a page whose URL holds a token (L2).
    openapi_router=Router(path="/docs", route_handlers=[], guards=ANY_TOKEN),
    render_plugins=[JsonRenderPlugin(), YamlRenderPlugin()],
    security=[{"bearer": []}],
    components=Components(
        security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer", description="API token")}
    ),
)


def _lifespan(
    settings: ApiSettings, tokens: tuple[auth.Token, ...]
) -> Callable[[Litestar], AbstractAsyncContextManager[None]]:
    """What the app owns while it runs: one Core (Redis shared with the job queue), the SSE
    hub, the service, and the sandbox monitor running under a task group."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        core = connect(
            settings, max_connections=settings.redis_max_connections, pool_timeout_s=settings.redis_pool_timeout_s
        )
        hub = StreamHub(core.bus, block_ms=int(settings.sse_keepalive_s * 1000))
        stream_limits = StreamLimits(settings.sse_max_streams, settings.sse_max_streams_per_token)
        sessions = Sessions(core.store, core.queue, core.sandboxes, settings)
        monitor = SandboxMonitor(core.sandboxes, core.store, core.bus)
        execs = ExecStore(core.redis, core.keys, keep_s=settings.exec_keep_s)
        exec_hub = ExecOutputHub(core.redis, core.keys)
        exec_service = ExecService(execs, sessions, settings)
        # Its own client: each relayed access holds one connection blocked reading its stream.
        relay_reader = redis_client(settings)
        access = AccessRouter(
            core.redis, relay_reader, core.keys, core.sandboxes, route=AccessRoute(settings.access_route)
        )
        commands = CommandConsumer(
            core.redis,
            core.keys,
            core.bus,
            exec_service,
            tenants=frozenset(t.tenant for t in tokens),
            consumer=f"api@{socket.gethostname()}:{os.getpid()}",
            claim_idle_s=settings.command_claim_idle_s,
            deadline_s=settings.command_deadline_s,
        )
        app.state.update(
            tokens=tokens,
            settings=settings,
            core=core,
            redis=core.redis,
            bus=core.bus,
            hub=hub,
            sessions=sessions,
            stream_limits=stream_limits,
            execs=execs,
            exec_hub=exec_hub,
            exec_service=exec_service,
            access=access,
            commands=commands,
        )
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(every, settings.monitor_interval_s, monitor.pass_once, "sandbox monitor")
                tasks.start_soon(_forever, commands.run, "command stream")
                try:
                    yield
                finally:
                    tasks.cancel_scope.cancel()
        finally:
            await api_ports.close_port_connections(app.state)
            await hub.close()
            await exec_hub.close()
            await relay_reader.aclose()
            await core.aclose()

    return lifespan


async def _forever(run: Callable[[], Awaitable[None]], what: str) -> None:
    """A duty that must not end: restarted a second after a failure (Redis away, say)."""
    while True:
        try:
            await run()
        except (RedisError, OSError) as e:
            log.warning("%s: Redis unavailable (%s); restarting it", what, e)
        except Exception:
            log.exception("%s failed; restarting it", what)
        await anyio.sleep(1)


def create_app(settings: ApiSettings | None = None) -> Litestar:
    # Settings, not ApiSettings: a bad worker variable in a shared environment still fails loudly here.
    settings = settings or Settings.from_env()
    tracing.install()
    tokens = auth.parse_tokens(settings.tokens)
    if not tokens:
        log.warning("no API tokens configured (ORCH_TOKENS): every request but /healthz will get 401")
    return Litestar(
        route_handlers=ROUTES,
        before_request=_begin_trace,
        after_request=_answer_trace,
        lifespan=[_lifespan(settings, tokens)],
        exception_handlers=EXCEPTION_HANDLERS,
        openapi_config=OPENAPI,
        request_max_body_size=settings.max_body_bytes,
        before_send=[add_security_headers],
    )
