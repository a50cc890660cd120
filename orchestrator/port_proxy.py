"""The port proxy's protocols, over a Channel whose far end is a raw TCP connection to
127.0.0.1:port inside a desktop: HTTP/1.1 with h11, WebSockets with wsproto.

Sans-I/O where it can be: what the upstream is sent (the request's target below the
``/ports/{port}`` prefix, its headers filtered and rewritten) and what the caller gets back (the
response's headers, its redirects and cookies moved under the prefix) are pure functions, and
``HttpExchange`` is one request and its response as bytes in, events out. The async parts
(``http_through``, ``websocket_through``, ``relay_websocket``) only move those bytes.

A connection to the upstream outlives its request when HTTP/1.1 lets it (``HttpExchange``
carries h11's state from one exchange to the next): orchestrator/port_pool.py keeps it for
the next request to the same port, as reverse proxies keep theirs."""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

import h11
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError as WsLocalProtocolError
from wsproto.utilities import RemoteProtocolError as WsRemoteProtocolError

from .access_channel import Channel, ChannelClosed, FrameKind, decode_control
from .errors import ServiceError

Headers = list[tuple[bytes, bytes]]

GRANT_QUERY = "port_token"  # a port URL's grant, on its first request
GRANT_COOKIE = "orch_port_grant"  # the grant after that (Path: the port's prefix)

# RFC 9110 7.6.1: meaningful for one connection only, never forwarded (with what Connection names).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Ours to say, not the caller's: replaced, never passed through. Expect is answered by the API's
# own server. (Authorization is dropped unless it is the app's own: Forwarded.app_authorization.)
_REPLACED = frozenset({b"host", b"expect", b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-prefix"})
_PREFIX_SEGMENTS = 6  # "", "v1", "sessions", id, "ports", port


def port_prefix(session_id: str, port: int) -> str:
    return f"/v1/sessions/{session_id}/ports/{port}"


def check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise ServiceError(400, "invalid_port", f"port {port} is not a TCP port (1-65535)", "port")


# -- requests: what the upstream is sent ------------------------------------------------------


def strip_query_param(query: bytes, name: str) -> bytes:
    """The query string without ``name`` (every occurrence); everything else byte for byte."""
    if not query:
        return b""
    kept = [item for item in query.split(b"&") if unquote_plus(item.partition(b"=")[0].decode("latin-1")) != name]
    return b"&".join(kept)


def strip_cookie(value: bytes, name: str) -> bytes:
    """A Cookie header's value without the cookie ``name`` ("" when nothing else is left)."""
    kept = [part.strip() for part in value.split(b";") if part.strip().partition(b"=")[0].strip() != name.encode()]
    return b"; ".join(p for p in kept if p)


def upstream_target(raw_path: bytes, query_string: bytes) -> bytes:
    """The request target the upstream sees: the raw path below ``/v1/sessions/{id}/ports/{port}``
    (``/`` for the bare prefix) and the query without the grant, both as the caller sent them."""
    parts = raw_path.split(b"/", _PREFIX_SEGMENTS)
    rest = b"/" + parts[_PREFIX_SEGMENTS] if len(parts) > _PREFIX_SEGMENTS else b"/"
    query = strip_query_param(query_string, GRANT_QUERY)
    return rest + b"?" + query if query else rest


def _connection_tokens(headers: Sequence[tuple[bytes, bytes]]) -> set[bytes]:
    return {
        token.strip().lower() for name, value in headers if name.lower() == b"connection" for token in value.split(b",")
    }


@dataclass(frozen=True)
class Forwarded:
    """What the upstream is told of the original request (X-Forwarded-*)."""

    port: int
    prefix: str
    client: str | None  # the caller's address
    scheme: str  # http or https, as the API was reached
    # The caller's Authorization is the app's own (the caller came with a grant, and the header
    # is no API token): passed on. Otherwise it is the caller's API token: the desktop never sees it.
    app_authorization: bool = False


def request_headers(headers: Sequence[tuple[bytes, bytes]], forwarded: Forwarded) -> Headers:
    """The caller's headers as the upstream gets them: hop-by-hop ones, the caller's API token
    (Authorization, unless it is the app's own) and the grant cookie dropped, Host rewritten to ``127.0.0.1:port``,
    X-Forwarded-For appended to, X-Forwarded-Host/-Proto/-Prefix set, the body's framing kept
    (a chunked body stays chunked; h11 sends none without a length or chunking). The
    connection to the upstream is kept alive (HTTP/1.1's default) whatever the caller's is."""
    named = _connection_tokens(headers)
    out: Headers = []
    host: bytes | None = None
    forwarded_for: list[bytes] = []
    chunked = False
    for raw_name, value in headers:
        name = raw_name.lower()
        if name == b"host":
            host = value
        elif name == b"transfer-encoding":
            chunked = chunked or b"chunked" in value.lower()
        elif name == b"x-forwarded-for":
            forwarded_for.append(value)
        elif name == b"authorization":
            if forwarded.app_authorization:
                out.append((name, value))
        elif name in HOP_BY_HOP or name in named or name in _REPLACED:
            continue
        elif name == b"cookie":
            value = strip_cookie(value, GRANT_COOKIE)
            if value:
                out.append((name, value))
        else:
            out.append((name, value))
    if forwarded.client:
        forwarded_for.append(forwarded.client.encode())
    if chunked and not any(name == b"content-length" for name, _ in out):
        out.append((b"transfer-encoding", b"chunked"))
    out.append((b"host", f"127.0.0.1:{forwarded.port}".encode()))
    if forwarded_for:
        out.append((b"x-forwarded-for", b", ".join(forwarded_for)))
    if host is not None:
        out.append((b"x-forwarded-host", host))
    out.append((b"x-forwarded-proto", forwarded.scheme.encode()))
    out.append((b"x-forwarded-prefix", forwarded.prefix.encode()))
    return out


# -- responses: what the caller gets back ------------------------------------------------------


def rewrite_location(value: bytes, prefix: str, port: int) -> bytes:
    """A redirect to the upstream's own origin or to an absolute path stays under the prefix
    (a page at ``/`` redirecting to ``/login`` must land on ``{prefix}/login``, not the API's)."""
    for origin in (f"http://127.0.0.1:{port}".encode(), f"http://localhost:{port}".encode()):
        if value.startswith(origin) and value[len(origin) : len(origin) + 1] in (b"", b"/", b"?", b"#"):
            value = value[len(origin) :] or b"/"
            break
    if value.startswith(b"/") and not value.startswith(b"//"):
        return prefix.encode() + value
    return value


def rewrite_set_cookie(value: bytes, prefix: str) -> bytes:
    """An upstream cookie under the port's prefix: its Path moved there, its Domain dropped (the
    upstream's host is 127.0.0.1, never the API's), so one port's cookies reach no other path."""
    name_value, *attributes = value.split(b";")
    kept = [name_value.strip()]
    for attribute in attributes:
        key, sep, attribute_value = attribute.strip().partition(b"=")
        lowered = key.strip().lower()
        if lowered == b"domain":
            continue
        if lowered == b"path" and sep:
            path = attribute_value.strip()
            attribute = b"Path=" + prefix.encode() + (path if path.startswith(b"/") else b"/" + path)
        kept.append(attribute.strip())
    return b"; ".join(kept)


def response_headers(headers: Sequence[tuple[bytes, bytes]], prefix: str, port: int) -> Headers:
    """The upstream's response headers as the caller gets them: hop-by-hop ones dropped (the
    API's server frames the body itself), Location and Set-Cookie moved under the prefix."""
    named = _connection_tokens(headers)
    out: Headers = []
    for raw_name, value in headers:
        name = raw_name.lower()
        if name in HOP_BY_HOP or name in named:
            continue
        if name == b"location":
            value = rewrite_location(value, prefix, port)
        elif name == b"set-cookie":
            value = rewrite_set_cookie(value, prefix)
        out.append((name, value))
    return out


# -- HTTP/1.1 over the channel ------------------------------------------------------------------


@dataclass(frozen=True)
class ResponseHead:
    status: int
    reason: bytes
    headers: Headers


class Upstream(enum.Enum):
    NEED_DATA = "need_data"  # feed more bytes (or b"" for the end)
    END = "end"  # the response is complete


class HttpExchange:
    """Requests and their responses on one connection, sans I/O: ``request``/``body``/``end``
    give the bytes to send, ``receive`` takes what came back, ``next_event`` says what it was:
    the response's head (informational 1xx skipped), a piece of its body (bytes), its end, or
    that more bytes are needed; ``next_cycle`` readies the connection for another request when
    both sides may go on. An upstream that does not speak HTTP/1.x is 502 ``upstream_protocol_error``."""

    def __init__(self, max_head_bytes: int = 64 * 1024) -> None:
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head_bytes)
        self._ended = False  # the upstream's side ended (b"" received)

    def request(self, method: bytes, target: bytes, headers: Headers) -> bytes:
        return self._conn.send(h11.Request(method=method, target=target, headers=headers)) or b""

    def body(self, chunk: bytes) -> bytes:
        return self._conn.send(h11.Data(data=chunk)) or b"" if chunk else b""

    def end(self) -> bytes:
        return self._conn.send(h11.EndOfMessage()) or b""

    def next_cycle(self) -> bool:
        """After a response read to its end: whether the connection may carry another request
        (neither side said ``Connection: close``, the request was sent whole, HTTP/1.1), and if
        so, ready for it."""
        if self._ended or self._conn.our_state is not h11.DONE or self._conn.their_state is not h11.DONE:
            return False
        self._conn.start_next_cycle()
        return True

    def receive(self, data: bytes) -> None:
        """``b""``: the upstream's side of the connection ended."""
        self._ended = self._ended or not data
        self._conn.receive_data(data)

    def next_event(self) -> ResponseHead | bytes | Upstream:
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as e:
                if self._ended:
                    raise ServiceError(502, "upstream_closed", f"the upstream's response ended early: {e}") from e
                raise ServiceError(502, "upstream_protocol_error", f"the upstream did not answer HTTP/1.1: {e}") from e
            if event is h11.NEED_DATA:
                return Upstream.NEED_DATA
            if isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue and the like: the API's own server speaks for itself
            if isinstance(event, h11.Response):
                return ResponseHead(event.status_code, bytes(event.reason), list(event.headers.raw_items()))
            if isinstance(event, h11.Data):
                return bytes(event.data)
            if isinstance(event, h11.EndOfMessage):
                return Upstream.END
            if isinstance(event, h11.ConnectionClosed):
                raise ServiceError(502, "upstream_closed", "the upstream closed the connection without a response")
            if event is h11.PAUSED:  # only after the end of the response
                return Upstream.END


async def _received(channel: Channel) -> bytes:
    """The next bytes from the upstream; ``b""`` once its side ended (EOF, CLOSE)."""
    while True:
        try:
            kind, payload = await channel.receive()
        except ChannelClosed as e:
            raise ServiceError(502, "upstream_disconnected", f"the route to the port broke: {e}") from e
        if kind is FrameKind.DATA:
            if payload:
                return payload
        elif kind is FrameKind.CONTROL:
            control = decode_control(payload)
            if control.type == "error":
                raise ServiceError(
                    502, control.code or "port_error", control.message or "the port could not be reached"
                )
        else:
            return b""


class HttpResponse:
    """The upstream's answer: its head known, its body still to read (``body()``, once), then
    ``aclose`` (which closes the channel and stops sending the request's body, if it still is)."""

    def __init__(self, head: ResponseHead, exchange: HttpExchange, channel: Channel, sender: asyncio.Future[None]):
        self.head = head
        self._exchange = exchange
        self._channel = channel
        self._sender = sender
        self.complete = False  # the body was read to its end

    @property
    def reusable(self) -> bool:
        """Whether the connection may carry another request now (port_pool decides)."""
        sent = self._sender.done() and not self._sender.cancelled() and self._sender.exception() is None
        return self.complete and sent

    async def body(self) -> AsyncIterator[bytes]:
        while True:
            event = self._exchange.next_event()
            if event is Upstream.END:
                self.complete = True
                return
            if event is Upstream.NEED_DATA:
                self._exchange.receive(await _received(self._channel))
            elif isinstance(event, bytes):
                yield event

    async def request_sent(self) -> None:
        """Once the request's body is sent (or its sending failed)."""
        await asyncio.wait({self._sender})

    async def aclose(self) -> None:
        self._sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._sender
        with contextlib.suppress(ChannelClosed, ConnectionError, OSError, RuntimeError):  # uvloop: a closed transport
            await self._channel.aclose()


async def http_through(
    channel: Channel,
    method: bytes,
    target: bytes,
    headers: Headers,
    body: AsyncIterable[bytes] | None,
    *,
    head_timeout_s: float,
    exchange: HttpExchange | None = None,
) -> HttpResponse:
    """Send the request (its body streamed beside, so an upstream may answer before reading it
    all) and read the response's head. The caller owns the channel until this returns; after,
    the response does (``aclose``, unless it is kept for another request). A body that fails
    before the head (too large, the caller gone) fails the request with its error. ``exchange``:
    the connection's state when it carried requests before."""
    exchange = HttpExchange() if exchange is None else exchange
    if body is None:  # the common case, without a task beside
        await _send(channel, exchange.request(method, target, headers) + exchange.end())
        sent = asyncio.get_running_loop().create_future()
        sent.set_result(None)
        try:
            async with asyncio.timeout(head_timeout_s):
                head = await _read_head(exchange, channel)
        except TimeoutError:
            raise _head_timeout(head_timeout_s) from None
        return HttpResponse(head, exchange, channel, sent)
    await _send(channel, exchange.request(method, target, headers))

    async def send_body() -> None:
        async for chunk in body:
            await _send(channel, exchange.body(chunk))
        await _send(channel, exchange.end())

    sender = asyncio.create_task(send_body())
    head_task = asyncio.create_task(_read_head(exchange, channel))
    try:
        async with asyncio.timeout(head_timeout_s):
            done, _ = await asyncio.wait({sender, head_task}, return_when=asyncio.FIRST_COMPLETED)
            if sender in done and sender.exception() is not None:
                sender.result()  # the body's own error (413, a disconnect): raised as itself
            head = await head_task
    except TimeoutError:
        await _cancel(sender, head_task)
        raise _head_timeout(head_timeout_s) from None
    except BaseException:
        await _cancel(sender, head_task)
        raise
    return HttpResponse(head, exchange, channel, sender)


def _head_timeout(seconds: float) -> ServiceError:
    return ServiceError(504, "upstream_timeout", f"the upstream sent no response within {seconds:g} s")


async def _read_head(exchange: HttpExchange, channel: Channel) -> ResponseHead:
    while True:
        event = exchange.next_event()
        if isinstance(event, ResponseHead):
            return event
        if event is Upstream.NEED_DATA:
            exchange.receive(await _received(channel))
        else:  # a body or an end before any head: h11 never does this
            raise ServiceError(502, "upstream_protocol_error", "the upstream sent a body before a response")


async def _send(channel: Channel, data: bytes) -> None:
    if not data:
        return
    try:
        await channel.send(data)
    except ChannelClosed as e:
        raise ServiceError(502, "upstream_disconnected", f"the route to the port broke: {e}") from e


async def _cancel(*tasks: asyncio.Task[Any]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


# -- WebSockets over the channel ----------------------------------------------------------------

# Close codes the protocol never puts on the wire (RFC 6455 7.4.1): said as 1000 instead.
_LOCAL_ONLY = frozenset({1005, 1006, 1015})
ABNORMAL = 1011  # the upstream's connection ended without a close: the caller gets this


def websocket_headers(headers: Sequence[tuple[bytes, bytes]], forwarded: Forwarded) -> Headers:
    """The upstream handshake's extra headers: ``request_headers`` without what wsproto writes
    itself (Host, the Sec-WebSocket-* handshake, framing and Connection)."""
    return [
        (name, value)
        for name, value in request_headers(headers, forwarded)
        if name not in (b"host", b"connection", b"content-length", b"transfer-encoding")
        and not name.startswith(b"sec-websocket-")
    ]


@dataclass(frozen=True)
class Closed:
    code: int
    reason: str


class UpstreamWebSocket:
    """An accepted WebSocket to the upstream, sans the caller: whole messages in and out."""

    def __init__(self, channel: Channel, conn: WSConnection, subprotocol: str | None, max_message_bytes: int):
        self.channel = channel
        self.subprotocol = subprotocol
        self._conn = conn
        self._max = max_message_bytes
        self._closed = False

    async def send(self, data: str | bytes) -> None:
        message = TextMessage(data=data) if isinstance(data, str) else BytesMessage(data=data)
        await _send(self.channel, self._conn.send(message))

    async def close(self, code: int, reason: str = "") -> None:
        if self._closed:
            return
        self._closed = True
        code = 1000 if code in _LOCAL_ONLY else code
        with contextlib.suppress(ServiceError, WsLocalProtocolError):
            await _send(self.channel, self._conn.send(CloseConnection(code=code, reason=reason or None)))

    async def receive(self) -> str | bytes | Closed:
        """The next whole message, or how the upstream closed (``ABNORMAL`` when its connection
        ended without a close, 1009 for a message over the cap)."""
        parts: list[Any] = []
        size = 0
        while True:
            for event in self._events():
                if isinstance(event, TextMessage | BytesMessage):
                    parts.append(event.data)
                    size += len(event.data)
                    if size > self._max:
                        await self.close(1009, "message too big")
                        return Closed(1009, f"a message over {self._max} bytes")
                    if event.message_finished:
                        return "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)
                elif isinstance(event, Ping):
                    await _send(self.channel, self._conn.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if not self._closed:
                        self._closed = True
                        with contextlib.suppress(ServiceError, WsLocalProtocolError):
                            await _send(self.channel, self._conn.send(event.response()))
                    return Closed(event.code, event.reason or "")
            try:
                data = await _received(self.channel)
            except ServiceError:
                data = b""
            if not data:
                return Closed(ABNORMAL, "the upstream's connection ended without a close")
            self._conn.receive_data(data)

    def _events(self) -> list[Event]:
        try:
            return list(self._conn.events())
        except WsRemoteProtocolError as e:
            return [CloseConnection(code=1002, reason=f"upstream protocol error: {e}")]

    async def aclose(self) -> None:
        with contextlib.suppress(ChannelClosed, ConnectionError, OSError, RuntimeError):  # uvloop: a closed transport
            await self.channel.aclose()


async def websocket_through(
    channel: Channel,
    target: str,
    port: int,
    headers: Headers,
    subprotocols: list[str],
    *,
    timeout_s: float,
    max_message_bytes: int,
) -> UpstreamWebSocket:
    """The upstream's handshake: the caller's subprotocols offered, the one it picks returned.
    A refusal (any answer but 101) is 502 ``upstream_refused_websocket`` with its status."""
    conn = WSConnection(ConnectionType.CLIENT)
    request = Request(host=f"127.0.0.1:{port}", target=target, subprotocols=subprotocols, extra_headers=headers)
    await _send(channel, conn.send(request))
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                for event in _handshake_events(conn):
                    if isinstance(event, AcceptConnection):
                        return UpstreamWebSocket(channel, conn, event.subprotocol, max_message_bytes)
                    if isinstance(event, RejectConnection):
                        raise ServiceError(
                            502,
                            "upstream_refused_websocket",
                            f"the upstream answered the WebSocket handshake with {event.status_code}",
                        )
                data = await _received(channel)
                if not data:
                    raise ServiceError(
                        502, "upstream_closed", "the upstream closed the connection during the handshake"
                    )
                conn.receive_data(data)
    except TimeoutError:
        raise ServiceError(504, "upstream_timeout", f"no WebSocket handshake within {timeout_s:g} s") from None


def _handshake_events(conn: WSConnection) -> list[Event]:
    try:
        return list(conn.events())
    except WsRemoteProtocolError as e:
        raise ServiceError(502, "upstream_protocol_error", f"the upstream's handshake is not WebSocket: {e}") from e


Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]


async def relay_websocket(upstream: UpstreamWebSocket, receive: Receive, send: Send, *, close_wait_s: float) -> None:
    """Messages both ways between the caller's accepted WebSocket (raw ASGI ``receive`` and
    ``send``) and the upstream's until one side closes; its close code and reason are passed to
    the other. A caller that leaves gets the upstream a close (and ``close_wait_s`` to answer)."""

    async def from_caller() -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.receive":
                data = message.get("text")
                await upstream.send(data if data is not None else message.get("bytes") or b"")
            elif message["type"] == "websocket.disconnect":
                await upstream.close(int(message.get("code", 1000)), str(message.get("reason") or ""))
                return

    async def from_upstream() -> Closed:
        while True:
            item = await upstream.receive()
            if isinstance(item, Closed):
                return item
            if isinstance(item, str):
                await send({"type": "websocket.send", "text": item})
            else:
                await send({"type": "websocket.send", "bytes": item})

    caller_task = asyncio.create_task(from_caller())
    upstream_task = asyncio.create_task(from_upstream())
    try:
        done, _ = await asyncio.wait({caller_task, upstream_task}, return_when=asyncio.FIRST_COMPLETED)
        if upstream_task in done:
            closed = upstream_task.result()
            code = 1000 if closed.code in _LOCAL_ONLY else closed.code
            with contextlib.suppress(Exception):  # the caller may be gone already
                await send({"type": "websocket.close", "code": code, "reason": closed.reason[:120]})
        else:
            caller_task.result()  # its error, if any
            with contextlib.suppress(TimeoutError, Exception):
                async with asyncio.timeout(close_wait_s):
                    await upstream_task  # the upstream's answering close
    finally:
        await _cancel(caller_task, upstream_task)
        await upstream.aclose()
