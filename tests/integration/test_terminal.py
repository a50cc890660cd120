"""Terminals in a real desktop over a WebSocket (real API, worker, dockerd, Redis), by both roads
of the access route: a PTY inside the desktop's user namespace that echoes, resizes and exits
with its code; refusals with precise close codes; the per-session limit, the idle close; a
client that goes away hangs its shell up; and each terminal is two events without its bytes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import os
import select
import signal
import struct
import sys
import termios
from collections.abc import AsyncIterator

import aiohttp
import pytest

from orchestrator.client import Client
from orchestrator.config import Settings

from .conftest import TOKENS, running_api, running_worker
from .test_exec import ready_session

pytestmark = pytest.mark.docker


def ws_url(api: str, session_id: str, token: str | None = TOKENS["sessions:exec"], **query: object) -> str:
    params = {k: str(v) for k, v in query.items()}
    if token is not None:
        params["access_token"] = token
    encoded = "&".join(f"{k}={v}" for k, v in params.items())
    return f"{api.replace('http', 'ws', 1)}/v1/sessions/{session_id}/terminal?{encoded}"


@contextlib.asynccontextmanager
async def terminal(url: str) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        yield ws


async def read_until(ws: aiohttp.ClientWebSocketResponse, needle: bytes, timeout: float = 20) -> bytes:
    seen = b""
    async with asyncio.timeout(timeout):
        while needle not in seen:
            message = await ws.receive()
            if message.type is aiohttp.WSMsgType.BINARY:
                seen += message.data
            elif message.type is not aiohttp.WSMsgType.TEXT:
                raise AssertionError(f"the terminal ended ({message.type}) before {needle!r}: {seen[-500:]!r}")
    return seen


async def ending(ws: aiohttp.ClientWebSocketResponse, timeout: float = 20) -> tuple[dict[str, object], int | None]:
    """The last text message and the close code."""
    last: dict[str, object] = {}
    async with asyncio.timeout(timeout):
        while True:
            message = await ws.receive()
            if message.type is aiohttp.WSMsgType.TEXT:
                last = json.loads(message.data)
            elif message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return last, ws.close_code


@pytest.mark.parametrize("route", ["direct", "relay"])
async def test_a_terminal_echoes_resizes_and_exits_with_its_code(route: str, docker_settings: Settings) -> None:
    settings = dataclasses.replace(docker_settings, access_route=route)
    async with (
        running_worker(settings),
        running_api(settings) as api,
        Client(api, token=TOKENS["admin"]) as admin,
        ready_session(admin) as sid,
    ):
        async with terminal(ws_url(api, sid, cols=100, rows=30)) as ws:
            await ws.send_bytes(b"echo marker-$((6*7)); id -u; cat /proc/self/uid_map\r")
            seen = await read_until(ws, b"marker-42")
            seen += await read_until(ws, b"65536")  # the uid map: inside the user namespace
            assert b"\r\n0\r\n" in seen, seen[-300:]
            await ws.send_bytes(b"stty size\r")
            await read_until(ws, b"30 100")
            await ws.send_str(json.dumps({"type": "resize", "cols": 120, "rows": 40}))
            await ws.send_bytes(b"stty size\r")
            await read_until(ws, b"40 120")
            await ws.send_bytes(b"docker info --format '{{.Driver}}'\r")
            await read_until(ws, b"overlay2", timeout=30)
            await ws.send_bytes(b"exit 5\r")
            last, code = await ending(ws)
        assert last == {"type": "exit", "exit_code": 5} and code == 1000, (last, code)
        opened = [e async for e in admin.events(sid, follow=False) if e.type.startswith("terminal.")]
        types = [e.type for e in opened]
        assert types == ["terminal.opened", "terminal.closed"], types
        first = opened[0].data["data"]
        assert first["by"] == "sessions-exec" and first["cols"] == 100, first
        closed = opened[1].data["data"]
        assert closed["exit_code"] == 5 and closed["reason"] == "exited"
        assert isinstance(closed["bytes_in"], int) and closed["bytes_in"] > 0
        assert "marker" not in json.dumps([e.data for e in opened])  # never the content
        # The road it took, counted on the API's /metrics.
        headers = {"Authorization": f"Bearer {TOKENS['admin']}"}
        async with aiohttp.ClientSession() as http, http.get(f"{api}/metrics", headers=headers) as r:
            metrics = await r.text()
        assert f'orchestrator_access_opened_total{{road="{route}"}} 1.0' in metrics, metrics[-800:]


async def test_terminal_refusals_limits_idle_and_hang_up(docker_settings: Settings) -> None:
    settings = dataclasses.replace(docker_settings, terminal_max_per_session=1, terminal_idle_s=1.5)
    async with running_worker(settings), running_api(settings) as api, Client(api, token=TOKENS["admin"]) as admin:
        async with terminal(ws_url(api, "no-such-session", token=None)) as ws:
            last, code = await ending(ws)
            assert (last.get("code"), code) == ("unauthorized", 4401), (last, code)
        async with terminal(ws_url(api, "no-such-session", token=TOKENS["sessions:write"])) as ws:
            last, code = await ending(ws)
            assert code == 4403, (last, code)
        async with terminal(ws_url(api, "no-such-session")) as ws:
            last, code = await ending(ws)
            assert (last.get("code"), code) == ("session_not_found", 4404), (last, code)

        async with ready_session(admin) as sid:
            # A browser follows an exec's output with the token in the URL (EventSource sends no
            # header); no other route takes it there.
            done = await admin.exec(sid, ["echo", "from-a-browser"])
            async with aiohttp.ClientSession() as http:
                url = f"{api}/v1/sessions/{sid}/execs/{done.id}/output"
                async with http.get(url, params={"access_token": TOKENS["sessions:exec"]}) as response:
                    assert response.status == 200 and "from-a-browser" in await response.text()
                async with http.get(f"{api}/v1/sessions/{sid}", params={"access_token": TOKENS["admin"]}) as response:
                    assert response.status == 401
            async with terminal(ws_url(api, sid, cols=0)) as ws:
                last, code = await ending(ws)
                assert (last.get("code"), code) == ("invalid_request", 4400), (last, code)
            async with terminal(ws_url(api, sid)) as first:
                await first.send_bytes(b"sleep 4242 & echo started-bg\r")
                await read_until(first, b"started-bg")
                async with terminal(ws_url(api, sid)) as second:
                    last, code = await ending(second)
                    assert (last.get("code"), code) == ("too_many_terminals", 4429), (last, code)
            # The client went away: its shell and what it started are hung up.
            async with asyncio.timeout(20):
                while (await admin.exec(sid, shell="pgrep -c -f '[s]leep 4242' || true")).stdout.strip() != "0":
                    await asyncio.sleep(0.2)
            # Idle: no byte either way for ORCH_TERMINAL_IDLE closes it (and frees its slot).
            async with terminal(ws_url(api, sid)) as idle:
                last, code = await ending(idle, timeout=20)
                assert (last.get("code"), code) == ("idle_timeout", 4408), (last, code)
            async with terminal(ws_url(api, sid)) as again:
                await again.send_bytes(b"echo slot-$((1+1))\r")
                await read_until(again, b"slot-2")


async def test_the_cli_shell_under_a_pseudo_terminal(api: str, client: Client, worker: object) -> None:
    """`orchestrator sessions shell ID` in a real pseudo-terminal: raw mode, the window's size
    at the start and after a change (SIGWINCH), and the shell's exit code as its own."""
    async with ready_session(client) as sid:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "orchestrator.cli",
            "--api",
            api,
            "sessions",
            "shell",
            sid,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={**env, "ORCH_TOKEN": TOKENS["sessions:exec"]},
        )
        os.close(slave)
        seen = bytearray()

        async def until(needle: bytes) -> None:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(30):
                while needle not in seen:
                    chunk = await loop.run_in_executor(None, _read_some, master)
                    if not chunk:
                        raise AssertionError(f"the shell ended before {needle!r}: {bytes(seen[-400:])!r}")
                    seen.extend(chunk)

        try:
            await until(b"# ")  # the desktop's root prompt: the CLI is in raw mode by now
            os.write(master, b"stty size; echo cli-$((20+3))\r")
            await until(b"cli-23")
            assert b"33 111" in seen, bytes(seen[-400:])
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 44, 123, 0, 0))
            proc.send_signal(signal.SIGWINCH)
            # The signal and the keystrokes reach the CLI by two paths: the first `stty size`
            # may overtake the resize, so ask until the new size shows (or the wait fails).
            async with asyncio.timeout(30):
                while b"44 123" not in seen:
                    os.write(master, b"stty size\r")
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1):
                            await until(b"44 123")
            os.write(master, b"exit 7\r")
            assert await asyncio.wait_for(proc.wait(), 30) == 7
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            os.close(master)


def _read_some(fd: int) -> bytes:
    ready, _, _ = select.select([fd], [], [], 1.0)
    if not ready:
        return b"\0"  # nothing yet: not the end (a NUL is never looked for)
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: every slave end is closed
        return b""
