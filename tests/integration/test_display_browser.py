"""A graphical session's screen in the dashboard, in a real headless browser (Debian's chromium
driven by Playwright, as tests/integration/test_dashboard.py launches it): noVNC, served by the
API, draws the desktop; in control mode a click into the terminal and typed text run a command
(its effect checked through the exec API); in view mode the same input changes nothing, and at
the RFB level a pointer event never reaches Xvnc while the pixel requests after it do."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import httpx
import pytest

from orchestrator.api_display import VNC_PORT
from orchestrator.client import Client
from orchestrator.config import Settings

from .conftest import TOKENS, docker, running_worker
from .test_dashboard import chromium, dashboard_page, violations

if TYPE_CHECKING:
    from playwright.async_api import Page

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]
GRAPHICAL_IMAGE = os.environ.get("ORCH_GRAPHICAL_IMAGE", "orchestrator/desktop-graphical:dev")
SCREENSHOT = ROOT / "build" / "dashboard-graphical.png"
ADMIN = {"Authorization": f"Bearer {TOKENS['admin']}"}
# How many distinct colours the canvas has (a sample of its pixels): more than one once drawn.
CANVAS_COLOURS = """() => {
  const c = document.querySelector('#screen canvas');
  if (!c || !c.width) return 0;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const seen = new Set();
  for (let i = 0; i < d.length; i += 4 * 101) seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
  return seen.size;
}"""
CANVAS_BOX = """() => {
  const c = document.querySelector('#screen canvas');
  const r = c.getBoundingClientRect();
  return [r.x, r.y, r.width, r.height, c.width, c.height];
}"""

Run = Callable[[str], Awaitable[tuple[int, str]]]


@dataclass
class Graphical:
    api: str
    session: str
    run: Run  # a shell command in the desktop, as its user, with the display's DISPLAY
    client: Client

    async def shell_vars(self, command: str) -> dict[str, int]:
        code, out = await self.run(f"DISPLAY=:0 {command}")
        assert code == 0, out
        return {k: int(v) for k, _, v in (line.partition("=") for line in out.split()) if v.lstrip("-").isdigit()}

    async def pointer(self) -> tuple[int, int]:
        found = await self.shell_vars("xdotool getmouselocation --shell")
        return found["X"], found["Y"]

    async def terminal_centre(self) -> tuple[int, int]:
        """The middle of the xterm window, in screen pixels (evilwm places it on its own)."""
        found = await self.shell_vars("xdotool search --sync --class xterm getwindowgeometry --shell")
        return found["X"] + found["WIDTH"] // 2, found["Y"] + found["HEIGHT"] // 2

    async def display_closed(self, mode: str) -> dict[str, Any]:
        """The display.closed event of a ``mode`` connection (waited for: it follows the close)."""
        async with asyncio.timeout(20):
            while True:
                for event in [e async for e in self.client.events(self.session, follow=False)]:
                    if event.data["type"] == "display.closed" and event.data["data"]["mode"] == mode:
                        found: dict[str, Any] = event.data["data"]
                        return found
                await asyncio.sleep(0.1)


@pytest.fixture
async def graphical(api: str, client: Client, docker_settings: Settings) -> AsyncIterator[Graphical]:
    """A graphical session through the API and a real worker, ready (its display up)."""
    host = docker_settings.docker_host
    assert host
    if not docker("image", "inspect", "--format", "{{.Id}}", GRAPHICAL_IMAGE, host=host, check=False):
        pytest.fail(f"no graphical image {GRAPHICAL_IMAGE}: scripts/build-images.sh --graphical builds it")
    async with running_worker(replace(docker_settings, graphical_image=GRAPHICAL_IMAGE)):
        record = await client.create(labels={"test": "display"}, flavor="graphical")
        await client.wait_ready(record.id, timeout=120)

        async def run(command: str) -> tuple[int, str]:
            done = await client.exec(record.id, ["sh", "-c", command])
            return done.exit_code or 0, (done.stdout or "") + (done.stderr or "")

        yield Graphical(api, record.id, run, client)


async def open_screen(page: Page, mode: str) -> None:
    await page.wait_for_selector("#screen-panel:not([hidden])", timeout=20_000)
    await page.select_option("#screen-mode", mode)
    await page.click("#screen-open")
    await page.wait_for_selector("#screen:is([data-state='open'], [data-state='closed'])", timeout=20_000)
    status = await page.inner_text("#screen-status")
    assert await page.get_attribute("#screen", "data-state") == "open", status
    async with asyncio.timeout(20):  # the first update drawn
        while await page.evaluate(CANVAS_COLOURS) < 2:
            await asyncio.sleep(0.1)


async def click_at(page: Page, x: int, y: int) -> None:
    """Click the screen's pixel (x, y), wherever the scaled canvas is on the page."""
    left, top, width, height, cw, ch = await page.evaluate(CANVAS_BOX)
    await page.mouse.click(left + (x + 0.5) * width / cw, top + (y + 0.5) * height / ch)


async def file_in_desktop(screen: Graphical, path: str) -> str | None:
    code, out = await screen.run(f"cat {path}")
    return out if code == 0 else None


async def test_the_screen_shows_the_desktop_and_control_runs_a_typed_command(graphical: Graphical) -> None:
    async with chromium() as browser:
        page = await dashboard_page(browser, graphical.api, f"#session={graphical.session}")
        await open_screen(page, "control")
        assert await page.get_attribute("#screen", "data-mode") == "control"
        width, height = (await page.evaluate(CANVAS_BOX))[4:]
        assert (width, height) == (1280, 800)  # the default display, scaled to fit the panel
        box = await page.evaluate(CANVAS_BOX)
        assert box[2] <= 1280 and box[2] < width, box

        await click_at(page, *await graphical.terminal_centre())
        await page.keyboard.type("echo hi > /tmp/from-vnc")
        await page.keyboard.press("Enter")
        async with asyncio.timeout(20):
            while await file_in_desktop(graphical, "/tmp/from-vnc") != "hi\n":
                await asyncio.sleep(0.2)
        await page.keyboard.type("ls -l /tmp/from-vnc; cat /tmp/from-vnc")
        await page.keyboard.press("Enter")
        for kind in ("display.url_issued", "display.opened"):
            await page.wait_for_selector(f"#session-events li[data-type='{kind}']", timeout=10_000)
        SCREENSHOT.parent.mkdir(exist_ok=True)
        # The page down to the screen's bottom (docs/dashboard-graphical.png is one of these).
        bottom = await page.evaluate(
            "() => document.querySelector('#screen-panel').getBoundingClientRect().bottom + window.scrollY"
        )
        await page.screenshot(
            path=str(SCREENSHOT), full_page=True, clip={"x": 0, "y": 0, "width": 1280, "height": bottom + 16}
        )
        await page.click("#screen-open")
        await page.wait_for_selector("#screen[data-state='idle']", state="attached")
        closed = await graphical.display_closed("control")
        assert closed["reason"] == "client_closed" and closed["bytes_in"] > 0 and closed["bytes_out"] > 0
        assert await violations(page) == []


async def test_a_view_only_screen_takes_no_input_even_from_a_client_that_sends_it(graphical: Graphical) -> None:
    before = await graphical.pointer()
    target = await graphical.terminal_centre()
    if abs(target[0] - before[0]) + abs(target[1] - before[1]) < 20:
        target = (target[0] + 100, target[1] + 50)
    async with chromium() as browser:
        page = await dashboard_page(browser, graphical.api, f"#session={graphical.session}")
        await open_screen(page, "view")
        # noVNC itself sends nothing in view mode: make it send, to see the API drop it.
        await page.evaluate("() => { page.screen.rfb.viewOnly = false; page.screen.rfb.focus(); }")
        await click_at(page, *target)
        await page.keyboard.type("echo hi > /tmp/from-view")
        await page.keyboard.press("Enter")
        await page.click("#screen-open")
        await page.wait_for_selector("#screen[data-state='idle']", state="attached")
        closed = await graphical.display_closed("view")
        assert await violations(page) == []
    # The input reached the API, which dropped it: the desktop saw neither pointer nor keys.
    # (noVNC sends keys as QEMU extended key events once Xvnc says it takes them, as TigerVNC does.)
    dropped = closed["dropped"]
    keys = dropped.get("KeyEvent", 0) + dropped.get("QemuKeyEvent", 0)
    assert dropped.get("PointerEvent", 0) >= 2 and keys >= 2 * len("echo hi > /tmp/from-view"), closed
    assert "violation" not in closed
    assert await file_in_desktop(graphical, "/tmp/from-view") is None
    assert await graphical.pointer() == before


class Rfb:
    """A bare RFB 3.8 client over the display WebSocket (what noVNC does, by hand)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.buffer = bytearray()

    async def read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            message = await asyncio.wait_for(self.ws.receive(), 20)
            assert message.type is aiohttp.WSMsgType.BINARY, message
            self.buffer += message.data
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def handshake(self) -> tuple[int, int]:
        assert await self.read(12) == b"RFB 003.008\n"
        await self.ws.send_bytes(b"RFB 003.008\n")
        offered = await self.read((await self.read(1))[0])
        # Only security type 1, None: the desktop's Xvnc has no password (docs/graphical.md).
        assert list(offered) == [1], offered
        await self.ws.send_bytes(b"\x01")
        assert await self.read(4) == b"\0\0\0\0"
        await self.ws.send_bytes(b"\x01")
        width, height = struct.unpack("!HH", await self.read(4))
        await self.read(16)
        await self.read(struct.unpack("!I", await self.read(4))[0])
        return width, height

    async def pointer_then_update(self, x: int, y: int) -> None:
        """A pointer event, then a full update asked for and its first bytes read: the server
        handles a connection's messages in order, so it has handled the pointer event by then."""
        await self.ws.send_bytes(struct.pack("!BBHH", 5, 0, x, y) + struct.pack("!BBHHHH", 3, 0, 0, 0, 16, 16))
        assert (await self.read(1)) == b"\x00"  # FramebufferUpdate


async def display_url(http: httpx.AsyncClient, api: str, session: str, mode: str) -> str:
    answer = await http.post(f"{api}/v1/sessions/{session}/display/url", json={"mode": mode}, headers=ADMIN)
    assert answer.status_code == 201, answer.text
    url: str = answer.json()["url"]
    return url


async def test_at_the_rfb_level_view_drops_the_pointer_and_control_moves_it(graphical: Graphical) -> None:
    before = await graphical.pointer()
    target = (before[0] // 2 + 7, before[1] // 2 + 9)
    async with httpx.AsyncClient() as http, aiohttp.ClientSession() as session:
        view = await display_url(http, graphical.api, graphical.session, "view")
        async with session.ws_connect(view) as ws:
            rfb = Rfb(ws)
            assert await rfb.handshake() == (1280, 800)
            await rfb.pointer_then_update(*target)
        assert await graphical.pointer() == before

        control = await display_url(http, graphical.api, graphical.session, "control")
        async with session.ws_connect(control) as ws:
            rfb = Rfb(ws)
            await rfb.handshake()
            await rfb.pointer_then_update(*target)
        async with asyncio.timeout(10):
            while await graphical.pointer() != target:
                await asyncio.sleep(0.1)

        # A display token opens no port road, not even to the VNC port itself.
        token = (await display_url(http, graphical.api, graphical.session, "view")).rpartition("display_token=")[2]
        answer = await http.get(f"{graphical.api}/v1/sessions/{graphical.session}/ports/{VNC_PORT}/?port_token={token}")
        assert answer.status_code == 401 and answer.json()["code"] == "invalid_port_token"
        # Nor does an API token reach Xvnc through the port road: it speaks HTTP, Xvnc does not.
        answer = await http.get(f"{graphical.api}/v1/sessions/{graphical.session}/ports/{VNC_PORT}/", headers=ADMIN)
        assert answer.status_code == 502, answer.text


async def test_a_minimal_sessions_display_is_409_not_graphical(api: str, client: Client) -> None:
    record = await client.create(labels={"test": "display-minimal"})  # no worker needed: refused first
    async with httpx.AsyncClient() as http, aiohttp.ClientSession() as session:
        answer = await http.post(f"{api}/v1/sessions/{record.id}/display/url", json={"mode": "view"}, headers=ADMIN)
        assert answer.status_code == 409 and answer.json()["code"] == "not_graphical"
        url = f"{api}/v1/sessions/{record.id}/display".replace("http://", "ws://")
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with session.ws_connect(url, headers=ADMIN):
                pass
        assert refused.value.status == 409
