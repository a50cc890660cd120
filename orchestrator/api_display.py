"""The display route: a graphical session's screen over a WebSocket, for noVNC (plain RFB in
binary frames), in one of two modes.

``POST /v1/sessions/{id}/display/url`` (scope ``sessions:exec``, body ``{"mode": "view" |
"control"}``) gives a ``ws(s)://`` URL holding a display grant (orchestrator/display_grants.py:
this session, this mode, one use, a minute). ``/v1/sessions/{id}/display`` (WebSocket) takes
it as ``?display_token=``, or an API token with ``sessions:exec`` as ``Authorization`` (then
``?mode=``, ``view`` by default). Refusals come before the upgrade, as HTTP answers: 404 for an
unknown session or another tenant's, 409 ``not_graphical`` for a minimal one, 409
``session_not_ready``, 401/403 for the token, 502 ``port_closed`` while the display is down.

The API connects to 127.0.0.1:``VNC_PORT`` of the desktop over the access route's port road
(a ``port`` ticket: the worker needs to know nothing more). For ``view``, what the client sends
goes through orchestrator/rfb.py's ViewFilter, which lets only pixel requests through (input
dropped, anything else closes with 1008); ``control`` passes the bytes as they are. Audited:
``display.url_issued``, ``display.opened`` and ``display.closed`` (who, mode; never a token)."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
from litestar import Request, WebSocket, post, websocket
from litestar.datastructures import State
from litestar.exceptions import WebSocketDisconnect
from litestar.params import FromPath, JSONBody

from . import auth
from .access_channel import Channel, ChannelClosed, FrameKind
from .api_ports import PortAccess, refuse_handshake
from .api_screen import graphical_record
from .auth import AuthError, authenticate
from .display_grants import DisplayGrants
from .errors import ServiceError
from .events import EventBus, make_event
from .guards import EXEC, caller
from .rfb import DisplayMode, ViewFilter
from .schemas import SessionRecord

log = logging.getLogger("orchestrator.api_display")

VNC_PORT = 5900  # Xvnc's -rfbport in the graphical image (docs/graphical.md)
GRANT_QUERY = "display_token"


class DisplayUrlRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    mode: DisplayMode = DisplayMode.VIEW


class DisplayUrl(msgspec.Struct, frozen=True, kw_only=True):
    url: str  # a WebSocket URL: hand it to noVNC as it is (the grant is in its query)
    mode: DisplayMode
    expires_at: float  # Unix seconds: the time left to open it (once)


async def _publish(state: State, record: SessionRecord, type: str, data: dict[str, Any]) -> None:
    bus: EventBus = state.bus
    await bus.publish(
        make_event(
            type,
            sandbox=record.sandbox or "",
            session=record.id,
            generation=record.generation,
            data=data,
            tenant=record.tenant,
        )
    )


@post(
    "/v1/sessions/{session_id:str}/display/url",
    status_code=201,
    summary="A one-use WebSocket URL for the session's screen (noVNC), to view or to control",
    guards=EXEC,
)
async def display_url(
    session_id: FromPath[str],
    request: Request[Any, Any, Any],
    state: State,
    data: JSONBody[DisplayUrlRequest | None] = None,
) -> DisplayUrl:
    """A grant for this session's display in ``mode`` (``view``: the screen only, input dropped
    by the API; ``control``: keyboard and pointer too), to be opened once within a minute.
    It opens nothing else (no port, no other session). Audited as ``display.url_issued``."""
    mode = (data or DisplayUrlRequest()).mode
    token = caller(request)
    record = await graphical_record(state, session_id, token.visible_tenant)
    raw, grant = await DisplayGrants(state.redis, state.core.keys).issue(
        session_id, mode, by=token.name, tenant=token.visible_tenant
    )
    await _publish(
        state, record, "display.url_issued", {"by": token.name, "mode": mode.value, "expires_at": grant.expires_at}
    )
    base = str(request.base_url).rstrip("/")
    scheme, _, rest = base.partition("://")
    ws_base = ("wss" if scheme == "https" else "ws") + "://" + rest
    return DisplayUrl(
        url=f"{ws_base}/v1/sessions/{session_id}/display?{GRANT_QUERY}={raw}", mode=mode, expires_at=grant.expires_at
    )


@dataclass(frozen=True)
class DisplayCaller:
    by: str
    tenant: str | None
    mode: DisplayMode


async def _authorize(socket: WebSocket[Any, Any, Any], session_id: str) -> DisplayCaller:
    presented = socket.query_params.get(GRANT_QUERY)
    if presented:
        grant = await DisplayGrants(socket.app.state.redis, socket.app.state.core.keys).take(presented, session_id)
        return DisplayCaller(by=f"grant:{grant.by}", tenant=grant.tenant, mode=grant.mode)
    # No ?access_token= here: a browser asks for a display URL instead (L2, a token in a URL).
    token = authenticate(socket.headers.get("authorization"), socket.app.state.tokens)
    auth.authorize(token, auth.SESSIONS_EXEC)
    try:
        mode = DisplayMode(socket.query_params.get("mode") or DisplayMode.VIEW)
    except ValueError:
        raise ServiceError(400, "invalid_request", "mode is view or control", "mode") from None
    return DisplayCaller(by=token.name, tenant=token.visible_tenant, mode=mode)


@websocket("/v1/sessions/{session_id:str}/display")
async def display(socket: WebSocket[Any, Any, Any], session_id: FromPath[str]) -> None:
    state = socket.app.state
    try:
        who = await _authorize(socket, session_id)
        record = await graphical_record(state, session_id, who.tenant)
        access: PortAccess = state.access
        channel = await access.open_port(record, VNC_PORT, by=who.by)
    except (ServiceError, AuthError) as e:
        await refuse_handshake(socket, e.status, e.code, e.message)
        return
    pump = _DisplayPump(socket, channel, ViewFilter() if who.mode is DisplayMode.VIEW else None)
    opened = False
    try:
        # noVNC offers no subprotocol by default; an older one offers "binary": take it then.
        offered = list(socket.scope.get("subprotocols", []))
        await socket.accept(subprotocols="binary" if "binary" in offered else None)
        opened = True
        await _publish(state, record, "display.opened", {"by": who.by, "mode": who.mode.value})
        await pump.run()
    finally:
        with contextlib.suppress(Exception):
            await channel.aclose()
        if opened:
            await _closed(state, record, who, pump)


async def _closed(state: State, record: SessionRecord, who: DisplayCaller, pump: _DisplayPump) -> None:
    closed: dict[str, Any] = {
        "by": who.by,
        "mode": who.mode.value,
        "reason": pump.ended_by,
        "duration_ms": round((time.monotonic() - pump.started) * 1000),
        "bytes_in": pump.bytes_in,
        "bytes_out": pump.bytes_out,
    }
    if pump.filter is not None:
        closed["dropped"] = dict(pump.filter.dropped)
        if pump.filter.violation is not None:
            closed["violation"] = pump.filter.violation.code
    with contextlib.suppress(Exception):
        await _publish(state, record, "display.closed", closed)


@dataclass
class _DisplayPump:
    """The WebSocket and the channel, both ways, until either ends. ``filter`` (view mode) is
    between the client and the channel; the screen's way is never touched."""

    socket: WebSocket[Any, Any, Any]
    channel: Channel
    filter: ViewFilter | None
    ended_by: str = "client_closed"
    bytes_in: int = 0  # from the client
    bytes_out: int = 0  # to the client
    started: float = field(default_factory=time.monotonic)

    async def run(self) -> None:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._client, tasks.cancel_scope)
            tasks.start_soon(self._screen, tasks.cancel_scope)

    async def _client(self, scope: anyio.CancelScope) -> None:
        try:
            while True:
                message: dict[str, Any] = dict(await self.socket.receive())
                if message["type"] == "websocket.disconnect":
                    break
                data = message.get("bytes") or (message.get("text") or "").encode()
                self.bytes_in += len(data)
                if self.filter is not None:
                    data = self.filter.feed(data)
                if data:
                    await self.channel.send(data)
                if self.filter is not None and self.filter.violation is not None:
                    self.ended_by = "violation"
                    log.info("display of %s: %s", self.socket.path_params, self.filter.violation.message)
                    await self._close(1008, self.filter.violation.code)
                    break
        except ChannelClosed:
            self.ended_by = "route_lost"
        scope.cancel()

    async def _screen(self, scope: anyio.CancelScope) -> None:
        try:
            while True:
                kind, payload = await self.channel.receive()
                if kind is FrameKind.DATA:
                    self.bytes_out += len(payload)
                    try:
                        await self.socket.send_bytes(payload)
                    except (WebSocketDisconnect, RuntimeError):  # the client left meanwhile
                        break
                elif kind in (FrameKind.EOF, FrameKind.CLOSE):
                    self.ended_by = "display_closed"
                    await self._close(1000, "display_closed")
                    break
        except ChannelClosed:
            self.ended_by = "route_lost"
            await self._close(1011, "display_lost")
        scope.cancel()

    async def _close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self.socket.close(code=code, reason=reason)


ROUTES = [display_url, display]
