"""Port routes: HTTP and WebSockets proxied to a server listening in a ready session's desktop
(on 127.0.0.1 or 0.0.0.0 there), and short-lived port URLs for browsers and iframes.

``/v1/sessions/{id}/ports/{port}/{path}`` takes every method; the upstream sees ``/{path}`` and
the query (orchestrator/port_proxy.py has what is rewritten). The same paths take WebSockets.
Scope ``sessions:exec`` (a session of another tenant is 404, as an unknown one), or instead of
a token a port URL's grant (orchestrator/port_grants.py): ``?port_token=`` on the first
request, then the cookie that request sets, for that session's that port only.

The way into the desktop is ``state.access`` (``PortAccess``): for a session and a port it
opens a Channel whose far end is a TCP connection to 127.0.0.1:port in the desktop. HTTP
requests go over kept-alive ones where they can (orchestrator/port_pool.py); a WebSocket has
a channel of its own."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
from litestar import Request, WebSocket, post, route, websocket
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.enums import HttpMethod
from litestar.openapi import ResponseSpec
from litestar.params import FromPath
from litestar.types import Receive, Scope, Send

from .access import ready_record
from .access_channel import Channel
from .auth import SESSIONS_EXEC, AuthError, authenticate, authorize
from .config import ApiSettings
from .errors import ServiceError
from .events import EventBus, make_event
from .guards import EXEC, caller
from .http_headers import PROXIED
from .port_grants import PortGrants
from .port_pool import PortConnection, PortConnections
from .port_proxy import (
    GRANT_COOKIE,
    GRANT_QUERY,
    Forwarded,
    Headers,
    HttpResponse,
    check_port,
    http_through,
    port_prefix,
    relay_websocket,
    request_headers,
    response_headers,
    upstream_target,
    websocket_headers,
    websocket_through,
)
from .schemas import ErrorBody, SessionRecord


class PortAccess(Protocol):
    """The way into a desktop (``app.state.access``). ``open_port`` returns a Channel whose far
    end is a TCP connection to 127.0.0.1:``port`` inside the session's desktop, or raises
    ServiceError (503 ``sandbox_unreachable``, 502 ``port_closed``, ...)."""

    async def open_port(self, record: SessionRecord, port: int, *, by: str) -> Channel: ...


class PortUrl(msgspec.Struct, frozen=True, kw_only=True):
    url: str  # open it as it is: the grant is in its query
    expires_at: float  # Unix seconds


@dataclass(frozen=True)
class PortCaller:
    """Who reaches the port: a token's name, or a grant's issuer (``grant:<name>``)."""

    by: str
    tenant: str | None  # whose sessions it sees (None: every tenant's)
    grant: str | None = None  # a grant presented in the query: the answer sets its cookie
    grant_expires_at: float = 0.0
    app_authorization: bool = False  # an Authorization header beside a grant: the app's own


async def authorize_port(connection: ASGIConnection[Any, Any, Any, Any], session_id: str, port: int) -> PortCaller:
    """An API token (Authorization, scope ``sessions:exec``), else a grant: ``?port_token=``,
    else its cookie; a grant opens its own session and port only. With a grant, an
    Authorization header that is no API token is the page's own, for its app: passed on."""
    header = connection.headers.get("authorization")
    in_query = connection.query_params.get(GRANT_QUERY)
    presented = in_query or connection.cookies.get(GRANT_COOKIE)
    if header is not None:
        try:
            token = authenticate(header, connection.app.state.tokens)
        except AuthError:
            if not presented:
                raise
        else:
            authorize(token, SESSIONS_EXEC)
            return PortCaller(by=token.name, tenant=token.visible_tenant)
    if not presented:
        raise AuthError(401, "unauthorized", f"missing Authorization: Bearer <token> (or a port URL's {GRANT_QUERY})")
    state = connection.app.state
    grant = await PortGrants(state.redis, state.core.keys).check(presented, session_id, port)
    return PortCaller(
        by=f"grant:{grant.by}",
        tenant=grant.tenant,
        grant=presented if in_query else None,
        grant_expires_at=grant.expires_at,
        app_authorization=header is not None,
    )


async def ready_session(state: State, session_id: str, tenant: str | None) -> SessionRecord:
    """The session, ready (access.ready_record: 404 for another tenant's, 409 not ready)."""
    return await ready_record(state.sessions, session_id, tenant, "ports")


def grant_cookie(who: PortCaller, prefix: str, secure: bool) -> bytes:
    """The grant as a cookie for the port's pages (HttpOnly; Path its prefix; as long as the
    grant). Over https it is SameSite=None, so an iframe on another site carries it."""
    max_age = max(0, int(who.grant_expires_at - time.time()))
    same_site = "SameSite=None; Secure" if secure else "SameSite=Lax"
    return f"{GRANT_COOKIE}={who.grant}; Path={prefix}/; Max-Age={max_age}; HttpOnly; {same_site}".encode()


def _forwarded(
    connection: ASGIConnection[Any, Any, Any, Any], session_id: str, port: int, who: PortCaller
) -> Forwarded:
    client = connection.client
    return Forwarded(
        port=port,
        prefix=port_prefix(session_id, port),
        client=client.host if client else None,
        scheme="https" if connection.scope.get("scheme") in ("https", "wss") else "http",
        app_authorization=who.app_authorization,
    )


def _raw_path(scope: Scope) -> bytes:
    raw = scope.get("raw_path")
    return bytes(raw) if raw else scope["path"].encode()


class ProxiedResponse:
    """The upstream's answer as an ASGI app: its status and headers, then its body as it comes.
    A caller that leaves stops the reading; an upstream that ends early aborts the answer (the
    caller sees a broken response, never a short one that looks whole)."""

    def __init__(
        self, upstream: HttpResponse, headers: Headers, connection: PortConnection, pool: PortConnections
    ) -> None:
        self.upstream = upstream
        self._headers = headers
        self._connection = connection
        self._pool = pool
        self.headers: dict[str, str] = {}  # what after_request hooks add (the trace id)
        self._gone = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[PROXIED] = True  # type: ignore[literal-required]  # the API's page headers stay off it
        watch = asyncio.create_task(self._caller_gone(receive))
        try:
            await self._pump(send)
        except ServiceError:
            if not self._gone:
                raise
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watch
            if self._gone or not self.upstream.reusable:
                await self.upstream.aclose()
            else:  # read whole, sent whole: the connection may carry the next request
                await self._pool.release(self._connection, reusable=True)

    async def _pump(self, send: Send) -> None:
        head = self.upstream.head
        headers = self._headers + [(k.lower().encode(), v.encode()) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": head.status, "headers": headers})
        async for chunk in self.upstream.body():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _caller_gone(self, receive: Receive) -> None:
        """The caller left (its server's sends are dropped silently then): closing the channel
        ends the pump's read, so the upstream is read no further."""
        await self.upstream.request_sent()  # the body is the sender's to receive until then
        while (await receive())["type"] != "http.disconnect":
            pass
        self._gone = True
        await self.upstream.aclose()


async def _limited(request: Request[Any, Any, Any], limit: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise ServiceError(
                413, "body_too_large", f"the request body is over {limit} bytes (ORCH_PORT_MAX_BODY_BYTES)"
            )
        yield chunk


def _has_body(request: Request[Any, Any, Any]) -> bool:
    length = request.headers.get("content-length")
    return "transfer-encoding" in request.headers or (length is not None and length.strip() not in ("", "0"))


PROXY_PATHS = [
    "/v1/sessions/{session_id:str}/ports/{port:int}",
    "/v1/sessions/{session_id:str}/ports/{port:int}/{path:path}",
]
ALL_METHODS = [m for m in HttpMethod if m is not HttpMethod.TRACE]  # TRACE would echo our headers back


_GATEWAY_ERRORS: dict[int, ResponseSpec] = {
    502: ResponseSpec(ErrorBody, description="`port_closed`, `upstream_closed`, `upstream_protocol_error`, ..."),
    504: ResponseSpec(ErrorBody, description="`upstream_timeout`: no response head within ORCH_PORT_TIMEOUT"),
}


@route(
    PROXY_PATHS,
    http_method=ALL_METHODS,
    status_code=200,
    summary="Proxy a request to a port in the session's desktop",
    request_max_body_size=None,  # streamed to the desktop, capped by ORCH_PORT_MAX_BODY_BYTES instead
    description="The upstream is 127.0.0.1:{port} inside the desktop; its status, headers and body come back."
    " It sees the path below the port and the query (without `port_token`), the caller's headers minus"
    " hop-by-hop ones and the caller's API token, Host 127.0.0.1:{port} and X-Forwarded-For/-Host/-Proto/-Prefix."
    " Authorization: a bearer token with `sessions:exec`, or a port URL's grant (`?port_token=`, then its"
    " cookie). WebSockets on the same paths are relayed too (subprotocols offered upstream, close codes passed"
    " on). `POST .../url` is the port URL route: the upstream's own `/url` takes every other method.",
    responses=_GATEWAY_ERRORS,
)
async def proxy_http(
    session_id: FromPath[str],
    port: FromPath[int],
    request: Request[Any, Any, Any],
    state: State,
) -> ProxiedResponse:
    check_port(port)
    who = await authorize_port(request, session_id, port)
    record = await ready_session(state, session_id, who.tenant)
    settings: ApiSettings = state.settings
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > settings.port_max_body_bytes:
        raise ServiceError(
            413,
            "body_too_large",
            f"the request body is over {settings.port_max_body_bytes} bytes (ORCH_PORT_MAX_BODY_BYTES)",
        )
    forwarded = _forwarded(request, session_id, port, who)
    headers = request_headers(list(request.scope["headers"]), forwarded)
    target = upstream_target(_raw_path(request.scope), request.scope.get("query_string", b""))
    body = _limited(request, settings.port_max_body_bytes) if _has_body(request) else None
    pool = port_connections(state)
    method = request.method.encode()
    connection = await pool.connect(record, port, by=who.by, method=method, replayable=body is None)
    while True:
        try:
            upstream = await http_through(
                connection.channel,
                method,
                target,
                headers,
                body,
                head_timeout_s=settings.port_timeout_s,
                exchange=connection.exchange,
            )
            break
        except ServiceError as e:
            await connection.aclose()
            if not (connection.reused and e.code in _LOST_RACE):
                raise
            # A kept connection the upstream closed as it was reused (its keep-alive ran out):
            # the request (idempotent, bodiless) goes again on a new one.
            connection = await pool.fresh(record, port, by=who.by)
        except BaseException:
            await connection.aclose()
            raise
    answer = response_headers(upstream.head.headers, forwarded.prefix, port)
    if who.grant is not None:
        answer.append((b"set-cookie", grant_cookie(who, forwarded.prefix, forwarded.scheme == "https")))
    return ProxiedResponse(upstream, answer, connection, pool)


# What a kept connection that the upstream closed meanwhile fails with, before any answer.
_LOST_RACE = frozenset({"upstream_closed", "upstream_disconnected"})


def port_connections(state: State) -> PortConnections:
    """This process's kept connections to desktop ports (made on first use, over ``state.access``)."""
    pool: PortConnections | None = state.get("port_connections")
    if pool is None:
        settings: ApiSettings = state.settings
        pool = PortConnections(state.access, idle_s=settings.port_keepalive_s)
        state.port_connections = pool
    return pool


async def close_port_connections(state: State) -> None:
    pool: PortConnections | None = state.get("port_connections")
    if pool is not None:
        await pool.aclose()


# The upstream's own /url: every method but the POST that issues port URLs (below), and OPTIONS,
# which Litestar answers itself on a path with handlers of its own.
proxy_http_url = route(
    "/v1/sessions/{session_id:str}/ports/{port:int}/url",
    http_method=[m for m in ALL_METHODS if m not in (HttpMethod.POST, HttpMethod.OPTIONS)],
    name="proxy_http_url",
    status_code=200,  # the upstream's, in fact
    request_max_body_size=None,
    include_in_schema=False,
)(proxy_http.fn)


@websocket(PROXY_PATHS)
async def proxy_websocket(socket: WebSocket[Any, Any, Any], session_id: FromPath[str], port: FromPath[int]) -> None:
    """The same paths' WebSockets: the upstream's handshake first (the caller's subprotocols
    offered), then the caller's accepted with the one it chose. A refusal before that is an
    HTTP answer with the usual error body (the status the same route's HTTP answer would have)."""
    settings: ApiSettings = socket.app.state.settings
    try:
        check_port(port)
        who = await authorize_port(socket, session_id, port)
        record = await ready_session(socket.app.state, session_id, who.tenant)
        forwarded = _forwarded(socket, session_id, port, who)
        target = upstream_target(_raw_path(socket.scope), socket.scope.get("query_string", b"")).decode("latin-1")
        access: PortAccess = socket.app.state.access
        channel = await access.open_port(record, port, by=who.by)
        try:
            upstream = await websocket_through(
                channel,
                target,
                port,
                websocket_headers(list(socket.scope["headers"]), forwarded),
                list(socket.scope.get("subprotocols", [])),
                timeout_s=settings.port_timeout_s,
                max_message_bytes=settings.port_ws_max_message_bytes,
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await channel.aclose()
            raise
    except (ServiceError, AuthError) as e:
        await refuse_handshake(socket, e.status, e.code, e.message)
        return
    cookie = [(b"set-cookie", grant_cookie(who, forwarded.prefix, forwarded.scheme == "https"))] if who.grant else []
    try:
        await socket.accept(subprotocols=upstream.subprotocol, headers=cookie)
    except BaseException:
        await upstream.aclose()
        raise
    await relay_websocket(upstream, socket.receive, socket.send, close_wait_s=5.0)


async def refuse_handshake(socket: WebSocket[Any, Any, Any], status: int, code: str, message: str) -> None:
    """Before the accept: an HTTP answer where the server can send one (ASGI's
    websocket.http.response, which uvicorn has), else a close (the handshake's 403)."""
    await socket.receive()  # websocket.connect
    if "websocket.http.response" not in (socket.scope.get("extensions") or {}):
        await socket.close(code=4000 + status, reason=code)
        return
    body = msgspec.json.encode(ErrorBody(code=code, message=message))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="orchestrator"'))
    await socket.send({"type": "websocket.http.response.start", "status": status, "headers": headers})
    await socket.send({"type": "websocket.http.response.body", "body": body, "more_body": False})


@post(
    "/v1/sessions/{session_id:str}/ports/{port:int}/url",
    status_code=201,
    summary="A short-lived URL for a port of the session (for browsers and iframes)",
    guards=EXEC,
)
async def port_url(
    session_id: FromPath[str], port: FromPath[int], request: Request[Any, Any, Any], state: State
) -> PortUrl:
    """A grant for this session's this port only, valid ``ORCH_PORT_URL_TTL`` seconds: open
    ``url`` (it carries ``?port_token=``); that first answer sets a cookie for the port's path,
    so the page's relative links work. It opens no other port, session or route. Audited as
    ``port.url_issued`` (who, port, expires_at; never the token)."""
    check_port(port)
    token = caller(request)
    record = await ready_session(state, session_id, token.visible_tenant)
    settings: ApiSettings = state.settings
    grants = PortGrants(state.redis, state.core.keys)
    raw, grant = await grants.issue(
        session_id, port, by=token.name, tenant=token.visible_tenant, ttl_s=settings.port_url_ttl_s
    )
    bus: EventBus = state.bus
    await bus.publish(
        make_event(
            "port.url_issued",
            sandbox=record.sandbox,
            session=session_id,
            generation=record.generation,
            data={"by": token.name, "port": port, "expires_at": grant.expires_at},
            tenant=record.tenant,
        )
    )
    base = settings.port_url_base or str(request.base_url).rstrip("/")
    return PortUrl(url=f"{base}{port_prefix(session_id, port)}/?{GRANT_QUERY}={raw}", expires_at=grant.expires_at)


ROUTES = [port_url, proxy_http, proxy_http_url, proxy_websocket]
