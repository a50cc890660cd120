"""The display route over the real API (uvicorn, wsproto) and a real Redis, to a stand-in VNC
server (a minimal RFB 3.8 server on 127.0.0.1, recording what reaches it) through real framed
channels (tests/port_support.py's LoopbackAccess). No worker, no Docker: sessions are made ready
by hand through the store. What is asserted is what reaches the server: for a view grant, the
pixel requests and never the input."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import redis.asyncio as aioredis

from orchestrator.access_channel import Channel
from orchestrator.api import create_app
from orchestrator.api_display import VNC_PORT
from orchestrator.auth import token_entry
from orchestrator.config import Settings
from orchestrator.events import EventBus, decode_entries
from orchestrator.keys import Keys
from orchestrator.schemas import Event, SessionRecord
from orchestrator.states import SessionState as S
from orchestrator.store import SessionStore
from tests.port_support import LoopbackAccess, with_ports

from .conftest import running_api

TOKENS = {
    "exec": (["sessions:exec"], None),
    "writer": (["sessions:write"], None),
    "beta-exec": (["sessions:exec"], "beta"),
}
RAW = {name: f"raw-display-token-of-{name}" for name in TOKENS}
SERVER_INIT = struct.pack("!HH", 64, 48) + bytes([32, 24, 0, 1]) + struct.pack("!HHH", 255, 255, 255)
SERVER_INIT += bytes([16, 8, 0, 0, 0, 0]) + struct.pack("!I", 4) + b"fake"
FBUR = struct.pack("!BBHHHH", 3, 0, 0, 0, 64, 48)
ENCODINGS = struct.pack("!BBHi", 2, 0, 1, 0)
KEY = struct.pack("!BBxxI", 4, 1, 0x61)
POINTER = struct.pack("!BBHH", 5, 1, 10, 20)
CUT = struct.pack("!Bxxxi", 6, 5) + b"hello"


VENDOR = Path(__file__).resolve().parents[2] / "orchestrator" / "static" / "vendor"


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {RAW[name]}"}


class FakeVnc:
    """An RFB 3.8 server with security None; what each connection sent after the handshake."""

    def __init__(self) -> None:
        self.connections: list[bytearray] = []
        self.client_inits: list[int] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen = bytearray()
        self.connections.append(seen)
        try:
            writer.write(b"RFB 003.008\n")
            await reader.readexactly(12)
            writer.write(b"\x01\x01")  # one security type: None
            await reader.readexactly(1)
            writer.write(b"\x00\x00\x00\x00")  # SecurityResult: OK
            self.client_inits.append((await reader.readexactly(1))[0])
            writer.write(SERVER_INIT)
            await writer.drain()
            while data := await reader.read(65536):
                seen += data
                writer.write(struct.pack("!BxH", 0, 0))  # an empty FramebufferUpdate for each read
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class VncAccess(LoopbackAccess):
    """The desktop's 127.0.0.1:5900 is the fake server's port."""

    def __init__(self, vnc: FakeVnc) -> None:
        super().__init__()
        self.vnc = vnc
        self.asked: list[int] = []

    async def open_port(self, record: SessionRecord, port: int, *, by: str) -> Channel:
        self.asked.append(port)
        return await super().open_port(record, self.vnc.port if port == VNC_PORT else port, by=by)


@dataclasses.dataclass
class Display:
    url: str
    http: httpx.AsyncClient
    vnc: FakeVnc
    access: VncAccess
    store: SessionStore
    redis: aioredis.Redis
    keys: Keys

    async def session(self, flavor: str = "graphical", ready: bool = True, token: str = "writer") -> str:
        body = {"flavor": flavor} if flavor != "minimal" else {}
        answer = await self.http.post(f"{self.url}/v1/sessions", json=body, headers=bearer(token))
        assert answer.status_code == 202, answer.text
        session_id: str = answer.json()["id"]
        for target in (S.CREATING, S.STARTING, S.READY) if ready else ():
            await self.store.transition(session_id, target)
        return session_id

    async def grant(self, session_id: str, mode: str, token: str = "exec") -> dict[str, Any]:
        answer = await self.http.post(
            f"{self.url}/v1/sessions/{session_id}/display/url", json={"mode": mode}, headers=bearer(token)
        )
        assert answer.status_code == 201, answer.text
        body: dict[str, Any] = answer.json()
        return body

    async def events(self, session_id: str) -> list[Event]:
        raw = await self.redis.xrange(self.keys.session_events(session_id))
        return [event for _, event in decode_entries(raw, skip_bad=True)]


@pytest.fixture
async def display(settings: Settings, redis: aioredis.Redis) -> AsyncIterator[Display]:
    tokens = ";".join(token_entry(name, RAW[name], scopes, tenant) for name, (scopes, tenant) in TOKENS.items())
    settings = dataclasses.replace(settings, tokens=tokens)
    vnc = FakeVnc()
    await vnc.start()
    access = VncAccess(vnc)
    keys = Keys(settings.key_prefix)
    bus = EventBus(redis, keys)
    async with running_api(settings, with_ports(create_app(settings), access)) as url, httpx.AsyncClient() as http:
        yield Display(url, http, vnc, access, SessionStore(redis, bus), redis, keys)
    await access.aclose()
    await vnc.stop()


async def handshake(ws: aiohttp.ClientWebSocketResponse) -> bytes:
    """The client's side up to ServerInit (what noVNC does first); the server's bytes read."""
    got = bytearray()

    async def read(n: int) -> None:
        while len(got) < n:
            message = await asyncio.wait_for(ws.receive(), 10)
            assert message.type is aiohttp.WSMsgType.BINARY, message
            got.extend(message.data)

    await read(12)
    await ws.send_bytes(b"RFB 003.008\n")
    await read(14)
    await ws.send_bytes(b"\x01")
    await read(18)
    await ws.send_bytes(b"\x00")  # ClientInit, exclusive: the API makes it shared
    await read(18 + len(SERVER_INIT))
    return bytes(got)


async def wait_for(condition: Any, what: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)
    assert condition(), what


async def test_a_view_grant_passes_pixel_requests_and_drops_input(display: Display) -> None:
    session = await display.session()
    grant = await display.grant(session, "view")
    assert grant["mode"] == "view" and grant["url"].startswith("ws://")
    async with aiohttp.ClientSession() as http, http.ws_connect(grant["url"]) as ws:
        assert (await handshake(ws)).endswith(SERVER_INIT)
        for message in (ENCODINGS, KEY, POINTER, CUT, FBUR, KEY[:3], KEY[3:], FBUR):
            await ws.send_bytes(message)
        await wait_for(lambda: bytes(display.vnc.connections[0]) == ENCODINGS + FBUR + FBUR, "the requests")
        assert display.vnc.client_inits == [1]  # forced shared
    assert display.access.asked == [VNC_PORT]
    await wait_for(lambda: len(display.vnc.connections) == 1, "one connection")


async def test_a_control_grant_passes_everything(display: Display) -> None:
    session = await display.session()
    grant = await display.grant(session, "control")
    async with aiohttp.ClientSession() as http, http.ws_connect(grant["url"]) as ws:
        await handshake(ws)
        await ws.send_bytes(KEY + POINTER + CUT + FBUR)
        await wait_for(lambda: bytes(display.vnc.connections[0]) == KEY + POINTER + CUT + FBUR, "everything")
        assert display.vnc.client_inits == [0]  # as sent


async def test_an_unknown_message_in_view_mode_closes_and_goes_nowhere(display: Display) -> None:
    session = await display.session()
    grant = await display.grant(session, "view")
    async with aiohttp.ClientSession() as http, http.ws_connect(grant["url"]) as ws:
        await handshake(ws)
        await ws.send_bytes(FBUR + b"\x07whatever" + KEY)
        while (message := await asyncio.wait_for(ws.receive(), 10)).type is aiohttp.WSMsgType.BINARY:
            pass
        assert message.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 1008
    await asyncio.sleep(0.2)  # what could still arrive late
    assert bytes(display.vnc.connections[0]) == FBUR


async def test_grants_are_one_use_bound_to_their_session_and_not_port_grants(display: Display) -> None:
    session, other = await display.session(), await display.session()
    grant = await display.grant(session, "control")
    token = grant["url"].rpartition("display_token=")[2]
    async with aiohttp.ClientSession() as http:
        # Another session's display, then the port road with the same token: refused.
        for url, status in (
            (grant["url"].replace(session, other), 403),
            (f"{display.url}/v1/sessions/{session}/ports/{VNC_PORT}/?port_token={token}", 401),
        ):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                async with http.ws_connect(url.replace("http://", "ws://")):
                    pass
            assert refused.value.status == status, url
        answer = await display.http.get(f"{display.url}/v1/sessions/{session}/ports/{VNC_PORT}/?port_token={token}")
        assert answer.status_code == 401 and answer.json()["code"] == "invalid_port_token"
        # The 403 above used it up (one use, whoever presents it).
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with http.ws_connect(grant["url"]):
                pass
        assert refused.value.status == 401
        fresh = await display.grant(session, "view")
        async with http.ws_connect(fresh["url"]) as ws:
            await handshake(ws)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with http.ws_connect(fresh["url"]):
                pass
        assert refused.value.status == 401
        # A port grant for 5900 opens no display.
        port_grant = await display.http.post(
            f"{display.url}/v1/sessions/{session}/ports/{VNC_PORT}/url", headers=bearer("exec")
        )
        port_token = port_grant.json()["url"].rpartition("port_token=")[2]
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with http.ws_connect(f"{display.url}/v1/sessions/{session}/display?display_token={port_token}"):
                pass
        assert refused.value.status == 401
    assert len(display.vnc.connections) == 1  # the fresh grant's only


async def test_refusals_before_the_upgrade(display: Display) -> None:
    graphical, minimal = await display.session(), await display.session("minimal")
    pending = await display.session(ready=False)
    base = f"{display.url}/v1/sessions"

    async def url_answer(session: str, token: str = "exec", body: Any = None) -> tuple[int, str]:
        answer = await display.http.post(
            f"{base}/{session}/display/url", json=body or {"mode": "view"}, headers=bearer(token)
        )
        return answer.status_code, answer.json().get("code", "") if answer.status_code != 201 else ""

    assert await url_answer(minimal) == (409, "not_graphical")
    assert await url_answer(pending) == (409, "session_not_ready")
    assert await url_answer("s-nothing-here") == (404, "session_not_found")
    assert await url_answer(graphical, "beta-exec") == (404, "session_not_found")  # another tenant's
    assert await url_answer(graphical, "writer") == (403, "forbidden")
    assert (await url_answer(graphical, body={"mode": "admin"}))[0] == 400
    async with aiohttp.ClientSession() as http:
        for session, token, status in (
            (minimal, "exec", 409),
            (pending, "exec", 409),
            ("s-nothing-here", "exec", 404),
            (graphical, "beta-exec", 404),
            (graphical, "writer", 403),
            (graphical, None, 401),
        ):
            headers = bearer(token) if token else {}
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                async with http.ws_connect(f"{base}/{session}/display".replace("http://", "ws://"), headers=headers):
                    pass
            assert refused.value.status == status, (session, token)
        # With an API token in a header: view by default.
        async with http.ws_connect(
            f"{base}/{graphical}/display".replace("http://", "ws://"), headers=bearer("exec")
        ) as ws:
            await handshake(ws)
            await ws.send_bytes(KEY + FBUR)
            await wait_for(lambda: bytes(display.vnc.connections[0]) == FBUR, "the request only")
    assert display.vnc.connections and len(display.vnc.connections) == 1


async def test_issues_and_connections_are_audited_without_tokens(display: Display) -> None:
    session = await display.session()
    grant = await display.grant(session, "view")
    async with aiohttp.ClientSession() as http, http.ws_connect(grant["url"]) as ws:
        await handshake(ws)
        await ws.send_bytes(KEY + POINTER + FBUR)
        await wait_for(lambda: bytes(display.vnc.connections[0]) == FBUR, "the request")
    token = grant["url"].rpartition("=")[2]

    async def kinds() -> dict[str, dict[str, Any]]:
        return {e.type: e.data for e in await display.events(session) if e.type.startswith("display.")}

    async with asyncio.timeout(10):
        while "display.closed" not in (found := await kinds()):
            await asyncio.sleep(0.05)
    assert found["display.url_issued"]["by"] == "exec" and found["display.url_issued"]["mode"] == "view"
    assert found["display.url_issued"]["expires_at"] == grant["expires_at"]
    assert found["display.opened"] == {"by": "grant:exec", "mode": "view"}
    closed = found["display.closed"]
    assert closed["by"] == "grant:exec" and closed["mode"] == "view" and closed["reason"] == "client_closed"
    assert closed["dropped"] == {"KeyEvent": 1, "PointerEvent": 1}
    assert token not in str(await display.events(session))


async def test_the_assets_route_serves_novncs_modules_as_javascript(display: Display) -> None:
    async with httpx.AsyncClient(base_url=display.url) as http:
        served = {
            p: await http.get(f"/dashboard/assets/novnc/{p}")
            for p in ("core/rfb.js", "vendor/pako/lib/zlib/inflate.js")
        }
        refused = [
            await http.get(f"/dashboard/assets/novnc/{p}")
            for p in ("core/../../PINS", "core/rfb.js.map", "package.json", "core/RFB.js", "core/nothing.js")
        ]
    sums = dict(line.split()[::-1] for line in (VENDOR / "SHA256SUMS").read_text().splitlines())
    for path, answer in served.items():
        assert answer.status_code == 200, path
        assert answer.headers["content-type"] == "text/javascript; charset=utf-8", path
        assert hashlib.sha256(answer.content).hexdigest() == sums[f"novnc/{path}"], path
    assert b"export default class RFB " in served["core/rfb.js"].content
    assert [a.status_code for a in refused] == [404] * len(refused)
