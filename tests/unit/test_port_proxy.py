"""The port proxy's pure parts (orchestrator/port_proxy.py, port_grants.py): what the upstream
is sent, what the caller gets back, h11's exchange as bytes, grant checks; and the TCP bridge
(orchestrator/access_bridge.py) over real loopback sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import socket

import pytest

from orchestrator.access_bridge import bridge
from orchestrator.access_channel import FrameKind, StreamChannel
from orchestrator.auth import AuthError
from orchestrator.errors import ServiceError
from orchestrator.port_grants import TOKEN_RE, PortGrant, digest, new_token, verify
from orchestrator.port_proxy import (
    GRANT_COOKIE,
    Forwarded,
    HttpExchange,
    ResponseHead,
    Upstream,
    check_port,
    request_headers,
    response_headers,
    rewrite_location,
    rewrite_set_cookie,
    strip_cookie,
    strip_query_param,
    upstream_target,
    websocket_headers,
)

PREFIX = "/v1/sessions/s-abc/ports/8000"
FORWARDED = Forwarded(port=8000, prefix=PREFIX, client="10.1.2.3", scheme="https")


# -- the request's target -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw_path", "query", "target"),
    [
        (b"/v1/sessions/s-abc/ports/8000", b"", b"/"),
        (b"/v1/sessions/s-abc/ports/8000/", b"", b"/"),
        (b"/v1/sessions/s-abc/ports/8000/a/b.css", b"v=1", b"/a/b.css?v=1"),
        (b"/v1/sessions/s-abc/ports/8000/a%2Fb//c", b"", b"/a%2Fb//c"),  # raw: encoded slashes stay
        (b"/v1/sessions/s-abc/ports/8000/x", b"port_token=abc&q=%20", b"/x?q=%20"),
        (b"/v1/sessions/s-abc/ports/8000/x", b"port_token=abc", b"/x"),
        (b"/v1/sessions/s-abc/ports/8000/x", b"a=1&port%5Ftoken=abc&port_token&b", b"/x?a=1&b"),
    ],
)
def test_the_target_is_the_raw_path_below_the_prefix_without_the_grant(
    raw_path: bytes, query: bytes, target: bytes
) -> None:
    assert upstream_target(raw_path, query) == target


def test_query_and_cookie_stripping_keep_everything_else_byte_for_byte() -> None:
    assert strip_query_param(b"a=%41&b=+&&c", "port_token") == b"a=%41&b=+&&c"
    assert strip_query_param(b"", "port_token") == b""
    assert strip_cookie(b"a=1; orch_port_grant=t; b=2", GRANT_COOKIE) == b"a=1; b=2"
    assert strip_cookie(b"orch_port_grant=t", GRANT_COOKIE) == b""
    assert strip_cookie(b"orch_port_grant_x=1", GRANT_COOKIE) == b"orch_port_grant_x=1"  # another name


@pytest.mark.parametrize("port", [0, -1, 65536, 100000])
def test_ports_outside_tcps_range_are_400_invalid_port(port: int) -> None:
    with pytest.raises(ServiceError) as refused:
        check_port(port)
    assert (refused.value.status, refused.value.code, refused.value.field) == (400, "invalid_port", "port")


def test_ports_inside_are_fine() -> None:
    check_port(1)
    check_port(65535)


# -- the request's headers ------------------------------------------------------------------


def test_request_headers_drop_hop_by_hop_credentials_and_the_grant_and_say_where_from() -> None:
    given = [
        (b"Host", b"api.example.com"),
        (b"Authorization", b"Bearer secret"),
        (b"Connection", b"keep-alive, X-Private"),
        (b"X-Private", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Upgrade", b"h2c"),
        (b"TE", b"trailers"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"Expect", b"100-continue"),
        (b"Cookie", b"app=1; orch_port_grant=tok"),
        (b"X-Forwarded-For", b"192.0.2.1"),
        (b"X-Forwarded-Host", b"spoofed"),
        (b"X-Forwarded-Proto", b"gopher"),
        (b"Content-Length", b"5"),
        (b"Accept", b"text/html"),
    ]
    out = request_headers(given, FORWARDED)
    assert out == [
        (b"cookie", b"app=1"),
        (b"content-length", b"5"),
        (b"accept", b"text/html"),
        (b"host", b"127.0.0.1:8000"),
        (b"x-forwarded-for", b"192.0.2.1, 10.1.2.3"),
        (b"x-forwarded-host", b"api.example.com"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-prefix", PREFIX.encode()),
    ]


def test_authorization_is_passed_on_only_when_it_is_the_apps_own() -> None:
    given = [(b"authorization", b"token app")]
    assert (b"authorization", b"token app") not in request_headers(given, FORWARDED)
    app = dataclasses.replace(FORWARDED, app_authorization=True)
    assert (b"authorization", b"token app") in request_headers(given, app)


def test_a_grant_only_cookie_header_is_dropped_and_chunked_stays_chunked() -> None:
    out = dict(request_headers([(b"cookie", b"orch_port_grant=t"), (b"transfer-encoding", b"chunked")], FORWARDED))
    assert b"cookie" not in out
    assert out[b"transfer-encoding"] == b"chunked"
    # With a length the length frames it (h11 refuses both).
    both = request_headers([(b"content-length", b"3"), (b"transfer-encoding", b"chunked")], FORWARDED)
    assert (b"transfer-encoding", b"chunked") not in both


def test_websocket_handshake_headers_leave_the_handshake_to_wsproto() -> None:
    given = [
        (b"host", b"api"),
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-key", b"k"),
        (b"sec-websocket-version", b"13"),
        (b"sec-websocket-protocol", b"chat"),
        (b"origin", b"https://app.example.com"),
        (b"authorization", b"Bearer secret"),
    ]
    names = [name for name, _ in websocket_headers(given, FORWARDED)]
    assert names == [b"origin", b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-prefix"]


# -- the response's headers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "rewritten"),
    [
        (b"/login", PREFIX.encode() + b"/login"),
        (b"http://127.0.0.1:8000/a?b", PREFIX.encode() + b"/a?b"),
        (b"http://localhost:8000", PREFIX.encode() + b"/"),
        (b"http://127.0.0.1:80001/x", b"http://127.0.0.1:80001/x"),  # another port: not ours
        (b"https://example.com/x", b"https://example.com/x"),
        (b"//cdn.example.com/x", b"//cdn.example.com/x"),
        (b"relative/x", b"relative/x"),
    ],
)
def test_redirects_stay_under_the_prefix(location: bytes, rewritten: bytes) -> None:
    assert rewrite_location(location, PREFIX, 8000) == rewritten


def test_upstream_cookies_are_scoped_to_the_port() -> None:
    assert (
        rewrite_set_cookie(b"a=1; Path=/; Domain=localhost; Secure", PREFIX) == f"a=1; Path={PREFIX}/; Secure".encode()
    )
    assert rewrite_set_cookie(b"a=1; path=/x", PREFIX) == f"a=1; Path={PREFIX}/x".encode()
    assert rewrite_set_cookie(b"a=1", PREFIX) == b"a=1"  # no Path: the page's directory, already below


def test_response_headers_drop_hop_by_hop_and_keep_repeated_ones() -> None:
    given = [
        (b"Content-Type", b"text/html"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Connection", b"close, X-Hop"),
        (b"X-Hop", b"1"),
        (b"Set-Cookie", b"a=1; Path=/"),
        (b"Set-Cookie", b"b=2"),
        (b"Location", b"/next"),
    ]
    assert response_headers(given, PREFIX, 8000) == [
        (b"content-type", b"text/html"),
        (b"set-cookie", f"a=1; Path={PREFIX}/".encode()),
        (b"set-cookie", b"b=2"),
        (b"location", f"{PREFIX}/next".encode()),
    ]


# -- HTTP/1.1 as bytes ----------------------------------------------------------------------


def test_a_request_serializes_as_http_1_1_with_its_body_framed() -> None:
    exchange = HttpExchange()
    head = exchange.request(b"POST", b"/x?y=1", [(b"host", b"127.0.0.1:8000"), (b"transfer-encoding", b"chunked")])
    assert head == b"POST /x?y=1 HTTP/1.1\r\nhost: 127.0.0.1:8000\r\ntransfer-encoding: chunked\r\n\r\n"
    assert exchange.body(b"hello") == b"5\r\nhello\r\n"
    assert exchange.body(b"") == b""  # an empty chunk would end a chunked body: never sent
    assert exchange.end() == b"0\r\n\r\n"


def _events(exchange: HttpExchange) -> list[ResponseHead | bytes | Upstream]:
    events: list[ResponseHead | bytes | Upstream] = []
    while True:
        event = exchange.next_event()
        events.append(event)
        if event in (Upstream.NEED_DATA, Upstream.END):
            return events


def test_a_response_parses_head_first_then_body_then_end() -> None:
    exchange = HttpExchange()
    exchange.request(b"GET", b"/", [(b"host", b"h")])
    exchange.end()
    exchange.receive(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n")
    events = _events(exchange)
    assert events == [
        ResponseHead(200, b"OK", [(b"Transfer-Encoding", b"chunked"), (b"X-A", b"1")]),
        Upstream.NEED_DATA,
    ]
    exchange.receive(b"3\r\nabc\r\n0\r\n\r\n")
    assert _events(exchange) == [b"abc", Upstream.END]


def test_a_close_delimited_body_ends_with_the_connection() -> None:
    exchange = HttpExchange()
    exchange.request(b"GET", b"/", [(b"host", b"h")])
    exchange.end()
    exchange.receive(b"HTTP/1.0 200 OK\r\n\r\npart")
    assert _events(exchange)[1:] == [b"part", Upstream.NEED_DATA]
    exchange.receive(b"")
    assert _events(exchange) == [Upstream.END]


def test_an_upstream_that_is_not_http_or_ends_early_is_502() -> None:
    exchange = HttpExchange()
    exchange.request(b"GET", b"/", [(b"host", b"h")])
    exchange.receive(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    with pytest.raises(ServiceError) as refused:
        _events(exchange)
    assert (refused.value.status, refused.value.code) == (502, "upstream_protocol_error")

    exchange = HttpExchange()
    exchange.request(b"GET", b"/", [(b"host", b"h")])
    exchange.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    assert _events(exchange)[1:] == [b"abc", Upstream.NEED_DATA]
    exchange.receive(b"")
    with pytest.raises(ServiceError) as refused:
        _events(exchange)
    assert (refused.value.status, refused.value.code) == (502, "upstream_closed")

    exchange = HttpExchange()
    exchange.request(b"GET", b"/", [(b"host", b"h")])
    exchange.receive(b"")
    with pytest.raises(ServiceError) as refused:
        _events(exchange)
    assert refused.value.code == "upstream_closed"


def test_a_head_request_has_no_body_whatever_the_length_says() -> None:
    exchange = HttpExchange()
    exchange.request(b"HEAD", b"/", [(b"host", b"h")])
    exchange.end()
    exchange.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    events = _events(exchange)
    assert isinstance(events[0], ResponseHead) and events[1:] == [Upstream.END]


# -- grants ---------------------------------------------------------------------------------

GRANT = PortGrant(session="s-abc", port=8000, by="exec", tenant="acme", expires_at=1000.0)


def test_a_grant_opens_its_own_session_and_port_until_it_expires() -> None:
    assert verify(GRANT, "s-abc", 8000, now=999.0) is GRANT
    for session, port, now, status, code in [
        ("s-abc", 8000, 1000.0, 401, "invalid_port_token"),  # expired (Redis's TTL ends it too)
        ("s-abc", 8001, 999.0, 403, "port_token_mismatch"),
        ("s-abd", 8000, 999.0, 403, "port_token_mismatch"),
    ]:
        with pytest.raises(AuthError) as refused:
            verify(GRANT, session, port, now)
        assert (refused.value.status, refused.value.code) == (status, code)
    with pytest.raises(AuthError) as refused:
        verify(None, "s-abc", 8000, 0.0)
    assert (refused.value.status, refused.value.code) == (401, "invalid_port_token")


def test_grant_tokens_are_128_random_bits_stored_by_their_hash() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(TOKEN_RE.fullmatch(t) for t in tokens)
    token = tokens.pop()
    assert len(token) == 22  # 16 bytes, URL-safe base64 without padding
    assert len(digest(token)) == 64 and token not in digest(token)
    assert not TOKEN_RE.fullmatch(token + "x") and not TOKEN_RE.fullmatch("a/b" + token[3:])


# -- the bridge, over real loopback sockets --------------------------------------------------


async def _pair() -> tuple[StreamChannel, StreamChannel]:
    near, far = socket.socketpair()
    a = StreamChannel(*await asyncio.open_connection(sock=near))
    b = StreamChannel(*await asyncio.open_connection(sock=far))
    return a, b


async def test_the_bridge_passes_bytes_and_half_closes_both_ways() -> None:
    got: list[bytes] = []
    done = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(await reader.read())  # until the channel's EOF
        writer.write(b"answer " + got[0])
        await writer.drain()
        writer.close()
        done.set()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    near, far = await _pair()
    task = asyncio.create_task(bridge(far, *await asyncio.open_connection("127.0.0.1", port)))
    async with asyncio.timeout(5):
        await near.send(b"x" * 200_000)
        await near.send_eof()
        received = b""
        while True:
            kind, payload = await near.receive()
            if kind is FrameKind.EOF:
                break
            assert kind is FrameKind.DATA
            received += payload
        await done.wait()
        await task  # both sides half-closed: the bridge ends by itself
    assert got == [b"x" * 200_000]
    assert received == b"answer " + b"x" * 200_000
    assert await near.receive() == (FrameKind.CLOSE, b"")  # and it closed its end of the channel
    server.close()
    await near.aclose()


async def test_the_channels_close_ends_the_bridge_and_the_connection() -> None:
    closed = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # b"" once the bridge closes the connection
        closed.set()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    near, far = await _pair()
    task = asyncio.create_task(bridge(far, *await asyncio.open_connection("127.0.0.1", port)))
    await near.send(b"hello")
    await near.aclose()
    async with asyncio.timeout(5):
        await task
        await closed.wait()
    server.close()


async def test_the_bridge_reads_the_socket_no_faster_than_the_channel_drains() -> None:
    """Nobody reads the channel: the bridge stops reading the upstream once the socket buffers
    fill, instead of holding all of it in memory."""
    sent = 0
    stalled = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        chunk = b"y" * 65536
        try:
            while sent < 512 * 2**20:
                writer.write(chunk)
                try:
                    async with asyncio.timeout(0.5):
                        await writer.drain()
                except TimeoutError:
                    stalled.set()  # the bridge stopped reading: backpressure reached the upstream
                    return
                sent += len(chunk)
        finally:
            writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    near, far = await _pair()
    task = asyncio.create_task(bridge(far, *await asyncio.open_connection("127.0.0.1", port)))
    async with asyncio.timeout(20):
        await stalled.wait()
    assert sent < 64 * 2**20, f"the bridge read {sent} bytes nobody asked for"
    await near.aclose()
    async with asyncio.timeout(5):
        await task
    server.close()
