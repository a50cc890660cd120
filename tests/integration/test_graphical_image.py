"""The graphical desktop image on its own, run as the worker runs a desktop (the `userns` profile's
HostConfig, a volume at /var/lib/docker, the socket directory bound at /run/orchestrator) with
plain Docker: the display comes up and says so in display.ready, a screenshot is a real PNG of
the configured size, input reaches the screen and the focused terminal, and the desktop's own
dockerd still runs on overlay2. The worker's wiring of the flavor is not here yet (docs/graphical.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiodocker
import pytest

from workers.privilege import PROBE_SLOT, PrivilegeKind, PrivilegeProfile

pytestmark = pytest.mark.docker

GRAPHICAL_IMAGE = os.environ.get("ORCH_GRAPHICAL_IMAGE", "orchestrator/desktop-graphical:dev")
SIZE = (1024, 640)
READY_S = 60


class Desktop:
    def __init__(self, name: str, host: str, sockets: Path) -> None:
        self.name, self.host, self.sockets = name, host, sockets

    def enter(self, *argv: str, stdin: bytes | None = None, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        """``docker exec DESKTOP desktop-enter ARGV``: where the user's processes run."""
        return subprocess.run(
            ["docker", "exec", "-i", self.name, "desktop-enter", *argv],
            input=stdin or b"",
            capture_output=True,
            timeout=timeout,
            env={**os.environ, "DOCKER_HOST": self.host},
        )

    def screen(self, *args: str) -> dict[str, object]:
        done = self.enter("orch-screen", *args)
        assert done.returncode == 0, done.stderr.decode()
        answer: dict[str, object] = json.loads(done.stdout)
        return answer

    def wait_ready(self) -> dict[str, object]:
        marker = self.sockets / "display.ready"
        deadline = time.monotonic() + READY_S
        while not marker.exists():
            if time.monotonic() > deadline:
                logs = self.enter("cat", "/var/log/display.log").stdout.decode(errors="replace")
                pytest.fail(f"no display.ready within {READY_S} s; display.log: {logs[-1500:]}")
            time.sleep(0.05)
        ready: dict[str, object] = json.loads(marker.read_text())
        return ready


async def _create(docker_host: str, config: dict[str, Any], name: str) -> bool:
    """Create and start the desktop as the worker does (the API, not the CLI: the HostConfig is
    the worker's own); False when the image is absent."""
    async with aiodocker.Docker(url=docker_host) as docker:
        try:
            await docker.images.inspect(GRAPHICAL_IMAGE)
        except aiodocker.DockerError:
            return False
        container = await docker.containers.create(config, name=name)
        await container.start()
        return True


async def _remove(docker_host: str, name: str, volume: str) -> None:
    async with aiodocker.Docker(url=docker_host) as docker:
        with contextlib.suppress(aiodocker.DockerError):
            await docker.containers.container(name).delete(force=True)
        with contextlib.suppress(aiodocker.DockerError):
            await (await docker.volumes.get(volume)).delete()


@pytest.fixture
def desktop(docker_host: str) -> Iterator[Desktop]:
    run = uuid.uuid4().hex[:8]
    name, volume = f"gfx-test-{run}", f"gfx-test-{run}-docker"
    sockets = Path(tempfile.mkdtemp(prefix="gfx-sockets-"))
    profile = PrivilegeProfile(PrivilegeKind.USERNS, "test")
    config = {
        "Image": GRAPHICAL_IMAGE,
        "Hostname": name,
        # What DockerDesktops.desktop_config gives (workers/runtime/desktops.py), and the flavor.
        "Env": [
            "ORCH_DEPTH=2",
            f"ORCH_SESSION={name}",
            "ORCH_EXTERNAL_SOCKET=/run/orchestrator/docker.sock",
            "ORCH_DESKTOP_FLAVOR=graphical",
            f"ORCH_DISPLAY_SIZE={SIZE[0]}x{SIZE[1]}",
            # The probe's range, never handed to a session: no real desktop shares it.
            *profile.desktop_env(PROBE_SLOT),
        ],
        "HostConfig": {
            "Binds": [f"{volume}:/var/lib/docker", f"{sockets}:/run/orchestrator"],
            **profile.host_config(),
        },
    }
    try:
        if not asyncio.run(_create(docker_host, config, name)):
            pytest.skip(f"no graphical image {GRAPHICAL_IMAGE}: scripts/build-images.sh --graphical builds it")
        yield Desktop(name, docker_host, sockets)
    finally:
        asyncio.run(_remove(docker_host, name, volume))
        shutil.rmtree(sockets, ignore_errors=True)


def png_facts(data: bytes) -> tuple[int, int, int]:
    """Width, height and the number of distinct pixels (RGB, 8-bit, filter 0: what orch-screen writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    width, height, bits, colour = struct.unpack(">IIBB", data[16:26])
    assert data[12:16] == b"IHDR" and (bits, colour) == (8, 2)
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    row = width * 3 + 1
    assert len(raw) == row * height
    assert all(raw[y * row] == 0 for y in range(height))
    pixels = {raw[i : i + 3] for y in range(0, height, 4) for i in range(y * row + 1, (y + 1) * row, 12)}
    return width, height, len(pixels)


def test_graphical_desktop_shows_a_screen_takes_input_and_runs_docker(desktop: Desktop) -> None:
    began = time.monotonic()
    ready = desktop.wait_ready()
    assert (ready["width"], ready["height"], ready["depth"]) == (*SIZE, 24), ready
    assert ready["display"] == ":0" and ready["vnc_port"] == 5900 and ready["restarts"] == 0
    assert isinstance(ready["since_init_ms"], int) and 0 < ready["since_init_ms"] < READY_S * 1000

    # The screenshot: a PNG of the configured size, and not one colour (the terminal is on it).
    deadline = time.monotonic() + 20
    while True:
        shot = desktop.enter("orch-screen", "screenshot")
        assert shot.returncode == 0, shot.stderr.decode()
        width, height, colours = png_facts(shot.stdout)
        if colours > 1 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (width, height) == SIZE and colours > 1, colours
    info = json.loads(shot.stderr.decode().strip().splitlines()[-1])
    assert info["width"] == SIZE[0] and info["bytes"] == len(shot.stdout)
    jpeg = desktop.enter("orch-screen", "screenshot", "--format", "jpeg", "--quality", "70")
    assert jpeg.returncode == 0 and jpeg.stdout[:2] == b"\xff\xd8", jpeg.stderr.decode()

    # The pointer goes where it was asked.
    moved = desktop.screen("move", "321", "234")
    assert (moved["x"], moved["y"]) == (321, 234)
    assert desktop.screen("cursor") == {"x": 321, "y": 234}

    # Typed text reaches the focused terminal (evilwm: focus follows the pointer; the click too).
    desktop.screen("click", "200", "150")
    desktop.screen("type", "echo typed-$((6*7)) > /tmp/typed\n")
    deadline = time.monotonic() + 15
    while (done := desktop.enter("cat", "/tmp/typed")).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert done.stdout == b"typed-42\n", done.stderr.decode()

    # Bad input is refused with a code, and the display is unaffected.
    for args, code in (
        (("move", "5000", "10"), "out_of_screen"),
        (("key", "ctrl+nosuchkey"), "unknown_key"),
        (("click", "1", "1", "--colour", "red"), "bad_argument"),
        (("teleport",), "unknown_action"),
    ):
        bad = desktop.enter("orch-screen", *args)
        assert bad.returncode == 3 and f"orch-screen: {code}: " in bad.stderr.decode(), (args, bad.stderr)
    assert desktop.screen("key", "ctrl+l", "Return")["keys"] == ["ctrl+l", "Return"]
    assert desktop.screen("geometry") == {"width": SIZE[0], "height": SIZE[1], "depth": 24, "display": ":0"}

    # The desktop's own dockerd, beside the display, on overlay2.
    deadline = time.monotonic() + 30
    while (docker := desktop.enter("docker", "info", "--format", "{{.Driver}}")).returncode != 0:
        assert time.monotonic() < deadline, docker.stderr.decode()
        time.sleep(0.2)
    assert docker.stdout.strip() == b"overlay2"

    # A crashed Xvnc comes back, and the marker says it restarted.
    assert desktop.enter("pkill", "-KILL", "-x", "Xvnc").returncode == 0
    deadline = time.monotonic() + 20
    while True:
        marker = desktop.sockets / "display.ready"
        again = json.loads(marker.read_text()) if marker.exists() else {}
        if again.get("restarts") == 1:
            break
        assert time.monotonic() < deadline, f"the display did not come back: {again}"
        time.sleep(0.1)
    assert desktop.screen("geometry")["width"] == SIZE[0]
    assert time.monotonic() - began < 60
