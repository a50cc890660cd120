"""Computer use through the API, against a real graphical desktop (real API, worker, dockerd,
Redis): screenshots of the configured size, PNG and JPEG, scaled with headers that say so;
input that moves the pointer where it was asked, in screen and in scaled coordinates, and
types into the focused terminal; an audit event per action without the typed text; and each
bad request refused with its code, the desktop unaffected. The client and the CLI once each."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from orchestrator.client import ApiError, Client, ScreenImage
from orchestrator.config import Settings

from .conftest import (
    TEST_IMAGE,
    TOKENS,
    docker,
    make_settings,
    remove_sandbox_objects,
    require_images,
    running_api,
    running_worker,
)
from .test_cli import cli
from .test_graphical_image import png_facts

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module")]

GRAPHICAL_IMAGE = os.environ.get("ORCH_GRAPHICAL_IMAGE", "orchestrator/desktop-graphical:dev")
SIZE = (1024, 640)  # not the default (1280x800): the session's own
READY_S = 120.0
EXEC = {"Authorization": f"Bearer {TOKENS['sessions:exec']}"}


@dataclass
class Desktop:
    url: str
    sid: str
    settings: Settings
    admin: Client
    user: Client  # sessions:exec only, as an agent's token would be

    async def cursor(self) -> tuple[int, int]:
        """Where the pointer is, read inside the desktop (not through the screen's route)."""
        done = await self.admin.exec(self.sid, ["orch-screen", "cursor"])
        assert done.exit_code == 0, done
        at = json.loads(done.stdout)
        return at["x"], at["y"]


async def _screen_up(user: Client, sid: str) -> ScreenImage:
    """The first screenshot that shows something (the terminal on the background), waiting while
    the display comes up (503 display_unavailable) and the terminal maps."""
    deadline = time.monotonic() + 60
    while True:
        try:
            shot = await user.screenshot(sid)
            if png_facts(shot.data)[2] > 1:
                return shot
            seen = "a screen of one colour"
        except ApiError as e:
            if e.code != "display_unavailable":
                raise
            seen = f"{e.code}: {e.message}"
        assert time.monotonic() < deadline, f"no screen within 60 s: {seen}"
        await asyncio.sleep(0.2)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def desktop(docker_host: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Desktop]:
    host = require_images(docker_host)
    settings = make_settings(redis_url, tmp_path_factory)
    if not docker("image", "inspect", "--format", "{{.Id}}", GRAPHICAL_IMAGE, host=host, check=False):
        pytest.skip(f"no graphical image {GRAPHICAL_IMAGE}: scripts/build-images.sh --graphical builds it")
    settings = dataclasses.replace(settings, docker_host=host, graphical_image=GRAPHICAL_IMAGE)
    try:
        async with (
            running_worker(settings),
            running_api(settings) as url,
            Client(url, token=TOKENS["admin"], timeout=60) as admin,
            Client(url, token=TOKENS["sessions:exec"], timeout=60) as user,
        ):
            record = await admin.create(
                flavor="graphical", display={"width": SIZE[0], "height": SIZE[1]}, preload_images=[TEST_IMAGE]
            )
            await admin.wait_ready(record.id, timeout=READY_S)
            await _screen_up(user, record.id)
            yield Desktop(url, record.id, settings, admin, user)
    finally:
        remove_sandbox_objects(host, settings.sandbox_id)


def jpeg_size(data: bytes) -> tuple[int, int]:
    """Width and height from a baseline JPEG's SOF0 segment (what cjpeg writes)."""
    assert data[:2] == b"\xff\xd8", data[:4]
    at = 2
    while at < len(data):
        marker, length = data[at + 1], struct.unpack(">H", data[at + 2 : at + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            height, width = struct.unpack(">HH", data[at + 5 : at + 9])
            return width, height
        at += 2 + length
    raise AssertionError("no SOF segment")


async def test_screenshots_png_jpeg_and_scaled(desktop: Desktop) -> None:
    shot = await desktop.user.screenshot(desktop.sid)
    width, height, colours = png_facts(shot.data)
    assert (width, height) == SIZE and colours > 1
    assert (shot.format, shot.screen_width, shot.screen_height, shot.scale) == ("png", *SIZE, 1.0)
    assert (shot.image_width, shot.image_height) == SIZE

    jpeg = await desktop.user.screenshot(desktop.sid, format="jpeg", quality=60)
    assert jpeg.format == "jpeg" and jpeg_size(jpeg.data) == SIZE

    half = await desktop.user.screenshot(desktop.sid, scale=0.5)
    assert png_facts(half.data)[:2] == (SIZE[0] // 2, SIZE[1] // 2)
    assert (half.image_width, half.image_height, half.scale) == (SIZE[0] // 2, SIZE[1] // 2, 0.5)
    assert (half.screen_width, half.screen_height) == SIZE

    # max_width: the factor that fits, the height rounded half up (640 * 500 / 1024 = 312.5).
    fitted = await desktop.user.screenshot(desktop.sid, max_width=500, format="jpeg")
    assert jpeg_size(fitted.data) == (500, 313) == (fitted.image_width, fitted.image_height)
    assert fitted.scale == pytest.approx(500 / SIZE[0])

    # The raw response, as an agent without the client reads it.
    async with httpx.AsyncClient(base_url=desktop.url, headers=EXEC) as http:
        raw = await http.get(f"/v1/sessions/{desktop.sid}/screenshot", params={"scale": "0.25"})
    assert raw.status_code == 200 and raw.headers["content-type"] == "image/png"
    assert {k: raw.headers[f"x-{k}"] for k in ("screen-width", "screen-height", "image-width", "image-height")} == {
        "screen-width": str(SIZE[0]),
        "screen-height": str(SIZE[1]),
        "image-width": str(SIZE[0] // 4),
        "image-height": str(SIZE[1] // 4),
    }
    assert raw.headers["x-scale"] == "0.25" and raw.headers["cache-control"] == "no-store"


async def test_a_screenshot_by_the_relay_road(desktop: Desktop) -> None:
    relayed = dataclasses.replace(desktop.settings, access_route="relay")
    async with running_api(relayed) as url, Client(url, token=TOKENS["sessions:exec"]) as user:
        shot = await user.screenshot(desktop.sid, scale=0.5)
        assert png_facts(shot.data)[:2] == (SIZE[0] // 2, SIZE[1] // 2)
        done = await user.input(desktop.sid, "move", x=17, y=19)
        assert (done.x, done.y) == (17, 19)


async def test_input_moves_the_pointer_in_screen_and_scaled_coordinates(desktop: Desktop) -> None:
    user = desktop.user
    done = await user.input(desktop.sid, "move", x=321, y=234)
    assert (done.action, done.x, done.y, done.image_x) == ("move", 321, 234, None)
    assert done.duration_ms >= 0
    assert await desktop.cursor() == (321, 234)

    # On a half-size screenshot, image pixel (100, 50) shows screen pixel (201, 101).
    done = await user.input(desktop.sid, "move", x=100, y=50, scale=0.5)
    assert (done.x, done.y, done.image_x, done.image_y) == (201, 101, 100, 50)
    assert await desktop.cursor() == (201, 101)
    done = await user.input(desktop.sid, "move", x=250, y=125, image={"width": 500, "height": 313})
    assert (done.x, done.y) == (513, 256) == await desktop.cursor()  # (2 * 250 + 1) * 1024 // 1000
    assert (done.image_x, done.image_y) == (250, 125)

    # Every pointed action ends where it was asked.
    await user.input(desktop.sid, "drag", x=700, y=500, to_x=720, to_y=530)
    assert await desktop.cursor() == (720, 530)
    done = await user.input(desktop.sid, "scroll", x=900, y=600, dy=2)
    assert (done.x, done.y) == (900, 600) == await desktop.cursor()
    done = await user.input(desktop.sid, "double_click", x=1000, y=600, button="right")
    assert (done.x, done.y) == (1000, 600)


async def test_typed_text_reaches_the_focused_terminal_and_actions_are_audited(desktop: Desktop) -> None:
    user = desktop.user
    # Where the last event is, so that only this test's are read below.
    after = None
    async for event in desktop.admin.events(desktop.sid, follow=False):
        after = event.id
    secret = "echo typed-$((6*7)) > /tmp/typed"
    await user.input(desktop.sid, "click", x=200, y=150)  # the terminal (evilwm: focus follows the pointer)
    typed = await user.input(desktop.sid, "type", text=secret)
    assert (typed.action, typed.x, typed.y) == ("type", 200, 150)
    await user.input(desktop.sid, "key", keys=["Return"])
    deadline = time.monotonic() + 20
    while (done := await desktop.admin.exec(desktop.sid, ["cat", "/tmp/typed"])).exit_code != 0:
        assert time.monotonic() < deadline, f"the typed command never ran: {done.stderr}"
        await asyncio.sleep(0.1)
    assert done.stdout == "typed-42\n"
    await user.input(desktop.sid, "key", keys=["a", "ctrl+l"])

    seen: list[dict[str, object]] = []
    deadline = time.monotonic() + 10
    while len(seen) < 4:
        assert time.monotonic() < deadline, seen
        seen = [
            e.data
            async for e in desktop.admin.events(desktop.sid, after=after, follow=False)
            if e.type.startswith("input.")
        ]
    assert [e["type"] for e in seen] == ["input.click", "input.type", "input.key", "input.key"]
    click, kind, enter, keys = (e["data"] for e in seen)
    assert isinstance(click, dict) and isinstance(kind, dict) and isinstance(enter, dict) and isinstance(keys, dict)
    assert click["by"] == "sessions-exec" and (click["x"], click["y"], click["button"]) == (200, 150, "left")
    assert kind["characters"] == len(secret) and "text" not in kind
    assert enter["keys"] == ["Return"] and keys["keys"] == ["*", "ctrl+l"]  # a bare letter is text
    assert all(isinstance(e["data"], dict) and isinstance(e["data"]["duration_ms"], int) for e in seen)
    assert "typed-" not in json.dumps(seen) and "6*7" not in json.dumps(seen)


async def test_docker_run_works_in_the_desktops_terminal(desktop: Desktop) -> None:
    """The terminal's shell reaches the desktop's own dockerd: a container run from it."""
    user = desktop.user
    await user.input(desktop.sid, "click", x=200, y=150)  # into the terminal
    await user.input(desktop.sid, "key", keys=["ctrl+u"])  # whatever an earlier test left on the line
    await user.input(
        desktop.sid, "type", text=f"docker run --rm {TEST_IMAGE} busybox echo from-a-container > /tmp/docker-ran"
    )
    await user.input(desktop.sid, "key", keys=["Return"])
    deadline = time.monotonic() + 30
    while (done := await desktop.admin.exec(desktop.sid, ["cat", "/tmp/docker-ran"])).stdout != "from-a-container\n":
        assert time.monotonic() < deadline, f"docker run from the terminal never wrote its line: {done}"
        await asyncio.sleep(0.2)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"action": "move", "x": 5000, "y": 10}, 422, "out_of_screen"),
        ({"action": "click", "x": -1, "y": 10}, 422, "out_of_screen"),
        ({"action": "move", "x": 600, "y": 10, "scale": 0.5}, 422, "out_of_screen"),  # off the 512-wide image
        ({"action": "drag", "x": 1, "y": 1, "to_x": 1, "to_y": 640}, 422, "out_of_screen"),
        ({"action": "key", "keys": ["ctrl+nosuchkey"]}, 422, "unknown_key"),
        ({"action": "key", "keys": ["hyper+a"]}, 422, "unknown_key"),
        ({"action": "scroll", "x": 1, "y": 1}, 422, "bad_argument"),
        ({"action": "move", "x": 1, "y": 1, "scale": 0.5, "image": {"width": 2, "height": 2}}, 422, "bad_argument"),
        ({"action": "teleport", "x": 1, "y": 1}, 400, "invalid_request"),
        ({"action": "click", "x": 1}, 400, "invalid_request"),
        ({"action": "click", "x": 1, "y": 1, "colour": "red"}, 400, "invalid_request"),
        ({"action": "type", "text": "x" * 10_001}, 400, "invalid_request"),
        ({"action": "scroll", "x": 1, "y": 1, "dy": 101}, 400, "invalid_request"),
    ],
)
async def test_bad_input_is_refused_with_its_code_and_the_desktop_is_unaffected(
    desktop: Desktop, body: dict[str, object], status: int, code: str
) -> None:
    await desktop.user.input(desktop.sid, "move", x=55, y=66)
    async with httpx.AsyncClient(base_url=desktop.url, headers=EXEC) as http:
        answer = await http.post(f"/v1/sessions/{desktop.sid}/input", json=body)
    assert (answer.status_code, answer.json()["code"]) == (status, code), answer.text
    assert await desktop.cursor() == (55, 66)


async def test_bad_screenshots_and_sessions_without_a_screen(desktop: Desktop) -> None:
    async with httpx.AsyncClient(base_url=desktop.url, headers=EXEC) as http:
        path = f"/v1/sessions/{desktop.sid}/screenshot"
        for params, status, code in (
            ({"format": "gif"}, 400, "invalid_request"),
            ({"quality": "70"}, 400, "invalid_request"),  # png has no quality
            ({"format": "jpeg", "quality": "101"}, 400, "invalid_request"),
            ({"scale": "0"}, 400, "invalid_request"),
            ({"scale": "2"}, 400, "invalid_request"),
            ({"scale": "0.01"}, 422, "bad_argument"),
        ):
            answer = await http.get(path, params=params)
            assert (answer.status_code, answer.json()["code"]) == (status, code), (params, answer.text)
        answer = await http.get("/v1/sessions/s-no-such-session/screenshot")
        assert (answer.status_code, answer.json()["code"]) == (404, "session_not_found"), answer.text
        answer = await http.post("/v1/sessions/s-no-such-session/input", json={"action": "move", "x": 1, "y": 1})
        assert answer.status_code == 404, answer.text
        # A token without sessions:exec may not look.
        events = {"Authorization": f"Bearer {TOKENS['events:read']}"}
        assert (await http.get(path, headers=events)).status_code == 403

    # A minimal session has no screen: refused at the API, whatever its state.
    minimal = await desktop.admin.create()
    try:
        for call in (desktop.user.screenshot(minimal.id), desktop.user.input(minimal.id, "move", x=1, y=1)):
            with pytest.raises(ApiError) as refused:
                await call
            assert (refused.value.status, refused.value.code) == (409, "not_graphical")
    finally:
        await desktop.admin.delete(minimal.id)
    assert png_facts((await desktop.user.screenshot(desktop.sid)).data)[:2] == SIZE


async def test_the_cli_takes_a_screenshot_and_clicks(desktop: Desktop, tmp_path: Path) -> None:
    target = tmp_path / "screen.png"
    code, _, err = await cli(desktop.url, "sessions", "screenshot", desktop.sid, "-o", str(target), "--scale", "0.5")
    assert code == 0, err
    assert png_facts(target.read_bytes())[:2] == (SIZE[0] // 2, SIZE[1] // 2)
    assert f"{SIZE[0] // 2}x{SIZE[1] // 2} of the {SIZE[0]}x{SIZE[1]} screen, scale 0.5" in err
    code, out, err = await cli(desktop.url, "sessions", "input", desktop.sid, "click", "10", "20", "--scale", "0.5")
    assert code == 0, err
    assert json.loads(out)["x"] == 21 and json.loads(out)["image_x"] == 10
    assert await desktop.cursor() == (21, 41)
    code, _, err = await cli(desktop.url, "sessions", "input", desktop.sid, "key", "ctrl+nosuchkey")
    assert code != 0 and "unknown_key" in err


async def test_a_stopped_session_is_not_ready(desktop: Desktop) -> None:
    """Last: it stops the module's session."""
    await desktop.admin.stop(desktop.sid)
    await desktop.admin.wait_for(desktop.sid, {"session.stopped"}, timeout=60)
    for call in (desktop.user.screenshot(desktop.sid), desktop.user.input(desktop.sid, "move", x=1, y=1)):
        with pytest.raises(ApiError) as refused:
            await call
        assert (refused.value.status, refused.value.code) == (409, "session_not_ready")
