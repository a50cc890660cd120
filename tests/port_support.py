"""What the port proxy's tests (and its benchmark) stand on: a real upstream (aiohttp on
127.0.0.1) and ``LoopbackAccess``, a stand-in for ``state.access`` whose channels are real
framed sockets (a socketpair, StreamChannel at both ends) with the far end bridged by
``access_bridge.bridge`` to the upstream, as the worker bridges a desktop's port."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web
from litestar import Litestar

from orchestrator.access_bridge import bridge
from orchestrator.access_channel import Channel, StreamChannel
from orchestrator.api_ports import PortAccess
from orchestrator.errors import ServiceError
from orchestrator.schemas import SessionRecord

CHUNK = 64 * 1024


def with_ports(app: Litestar, access: PortAccess | None = None) -> Litestar:
    """``app`` (create_app's, which has the port routes); with ``access``, that as its
    ``state.access`` instead of the real route's, set once its lifespan has set its own
    (on_startup hooks run after the lifespan managers)."""
    if access is None:
        return app

    def install(app: Litestar) -> None:
        app.state.access = access

    app.on_startup.append(install)
    return app


class LoopbackAccess:
    """``PortAccess`` for tests: the port is 127.0.0.1:port of this machine (the test's
    upstream); refused connections are 502 ``port_closed``, as the real route says it."""

    def __init__(self) -> None:
        self.ports_opened: list[tuple[str, int, str]] = []  # (session, port, by), in order
        # By road, as AccessRouter.opened counts them (the metrics read it): the loopback is direct.
        self.opened: dict[str, int] = {}
        self._bridges: set[asyncio.Task[None]] = set()

    async def open_port(self, record: SessionRecord, port: int, *, by: str) -> Channel:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as e:
            raise ServiceError(502, "port_closed", f"nothing listens on port {port} in the desktop: {e}") from e
        near, far = socket.socketpair()
        near_reader, near_writer = await asyncio.open_connection(sock=near)
        far_reader, far_writer = await asyncio.open_connection(sock=far)
        task = asyncio.create_task(bridge(StreamChannel(far_reader, far_writer), reader, writer))
        self._bridges.add(task)
        task.add_done_callback(self._bridges.discard)
        self.ports_opened.append((record.id, port, by))
        self.opened["direct"] = self.opened.get("direct", 0) + 1
        return StreamChannel(near_reader, near_writer)

    @property
    def bridges(self) -> int:
        """Bridges still running (each ends when its exchange does)."""
        return len(self._bridges)

    async def aclose(self) -> None:
        for task in list(self._bridges):
            task.cancel()
        for task in list(self._bridges):
            with contextlib.suppress(asyncio.CancelledError):
                await task


@dataclass
class Upstream:
    """The server "in the desktop": what it saw, for the tests to check."""

    port: int
    requests: list[dict[str, Any]] = field(default_factory=list)
    drop_next: int = 0  # requests to read and then close the connection on, unanswered
    ws_closes: list[int | None] = field(default_factory=list)  # the close codes its sockets got


def upstream_app(seen: Upstream) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        if seen.drop_next:
            seen.drop_next -= 1
            assert request.transport is not None
            request.transport.close()  # read, never answered: the keep-alive race's far side
            raise asyncio.CancelledError
        if request.headers.get("x-close-later"):
            assert request.transport is not None
            asyncio.get_running_loop().call_later(0.05, request.transport.close)
        body = await request.read()
        info = {
            "method": request.method,
            "path_qs": request.raw_path,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body_bytes": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }
        seen.requests.append(info)
        return web.json_response(info)

    async def big(request: web.Request) -> web.StreamResponse:
        """``?mb=N`` MiB of a known pattern, chunked (no Content-Length)."""
        response = web.StreamResponse()
        response.content_type = "application/octet-stream"
        await response.prepare(request)
        for index in range(int(request.query.get("mb", "1")) * 16):
            await response.write(pattern(index))
        await response.write_eof()
        return response

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/echo/after-redirect")

    async def cookie(request: web.Request) -> web.Response:
        response = web.Response(text="cookie set")
        response.headers.add("Set-Cookie", "app=1; Path=/; Domain=127.0.0.1; HttpOnly")
        response.headers.add("Set-Cookie", "other=2; Path=/sub")
        return response

    async def ws(request: web.Request) -> web.WebSocketResponse:
        socket_ = web.WebSocketResponse(protocols=("chat",))
        await socket_.prepare(request)
        async for message in socket_:
            if message.type is WSMsgType.TEXT:
                if message.data.startswith("close:"):
                    await socket_.close(code=int(message.data.split(":")[1]), message=b"asked to")
                    break
                await socket_.send_str("echo:" + message.data)
            elif message.type is WSMsgType.BINARY:
                await socket_.send_bytes(message.data[::-1])
        seen.ws_closes.append(socket_.close_code)
        return socket_

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/echo{tail:.*}", echo)
    app.router.add_route("*", "/url", echo)  # beside the API's POST .../ports/{port}/url
    app.router.add_get("/big", big)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/cookie", cookie)
    app.router.add_get("/ws", ws)
    return app


def pattern(index: int) -> bytes:
    """The ``index``-th 64 KiB chunk of /big: distinct per chunk, so a reorder or a loss shows."""
    return index.to_bytes(4, "big") * (CHUNK // 4)


def big_sha256(mb: int) -> str:
    digest = hashlib.sha256()
    for index in range(mb * 16):
        digest.update(pattern(index))
    return digest.hexdigest()


@contextlib.asynccontextmanager
async def running_upstream() -> AsyncIterator[Upstream]:
    seen = Upstream(port=0)
    runner = web.AppRunner(upstream_app(seen), access_log=None)
    await runner.setup()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    seen.port = listener.getsockname()[1]
    await web.SockSite(runner, listener).start()
    try:
        yield seen
    finally:
        await runner.cleanup()
