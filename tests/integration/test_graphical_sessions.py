"""Graphical sessions through the API and a real worker (docs/graphical.md): the desktop is made
from ORCH_GRAPHICAL_IMAGE with its screen's size, its display.ready comes after dockerd.ready
and before session.ready; a minimal session gets none; a resumed graphical desktop is not
taken for ready on a stale marker, and what the session keeps survives; the desktop's own
dockerd runs nested containers as a minimal desktop's does."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.client import Client, ServerEvent
from orchestrator.config import Settings
from orchestrator.names import desktop_name
from workers.worker import SandboxWorker

from .conftest import TEST_IMAGE, TOKENS, adocker, docker, running_api, running_worker

GRAPHICAL_IMAGE = os.environ.get("ORCH_GRAPHICAL_IMAGE", "orchestrator/desktop-graphical:dev")
READY_TIMEOUT = 120.0
SCREEN = {"width": 1024, "height": 768}


def types(events: list[ServerEvent]) -> list[str]:
    return [e.type for e in events if not e.type.startswith("reconcile.")]


def data(events: list[ServerEvent], type: str) -> dict[str, object]:
    (event,) = [e for e in events if e.type == type]
    found: dict[str, object] = event.data["data"]
    return found


@pytest.fixture
def graphical_settings(docker_settings: Settings) -> Settings:
    host = docker_settings.docker_host
    assert host
    if not docker("image", "inspect", "--format", "{{.Id}}", GRAPHICAL_IMAGE, host=host, check=False):
        pytest.skip(f"no graphical image {GRAPHICAL_IMAGE}: scripts/build-images.sh --graphical builds it")
    return replace(docker_settings, graphical_image=GRAPHICAL_IMAGE)


@pytest.fixture
async def stack(graphical_settings: Settings) -> AsyncIterator[tuple[Client, SandboxWorker]]:
    async with (
        running_worker(graphical_settings) as worker,
        running_api(graphical_settings) as url,
        Client(url, token=TOKENS["admin"]) as client,
    ):
        yield client, worker


async def test_a_graphical_session_is_ready_once_its_screen_is(
    stack: tuple[Client, SandboxWorker], graphical_settings: Settings
) -> None:
    client, _ = stack
    host = graphical_settings.docker_host
    assert host
    record = await client.create(flavor="graphical", display=SCREEN)
    assert (record.spec.flavor, record.spec.display and record.spec.display.width) == ("graphical", 1024)
    minimal = await client.create()
    sid = record.id

    events = await client.wait_for(sid, {"session.ready", "session.failed"}, timeout=READY_TIMEOUT)
    seen = types(events)
    assert seen[-1] == "session.ready", [(e.type, e.data.get("data")) for e in events]
    assert seen.index("desktop.started") < seen.index("dockerd.ready") < seen.index("display.ready")
    assert seen.index("display.ready") == len(seen) - 2  # session.ready comes right after it
    screen = data(events, "display.ready")
    assert (screen["width"], screen["height"], screen["depth"], screen["display"]) == (1024, 768, 24, ":0")
    dockerd = data(events, "dockerd.ready")
    assert isinstance(screen["duration_ms"], int) and isinstance(dockerd["duration_ms"], int)
    assert screen["duration_ms"] >= dockerd["duration_ms"]  # both from the desktop's start
    assert "display" in data(events, "session.ready")["phases_ms"]  # type: ignore[operator]

    # The container: the graphical image, the flavor and its size in its Env.
    inspected = json.loads(await adocker("inspect", desktop_name(sid), host=host))[0]
    assert inspected["Config"]["Image"] == GRAPHICAL_IMAGE
    env = inspected["Config"]["Env"]
    assert "ORCH_DESKTOP_FLAVOR=graphical" in env and "ORCH_DISPLAY_SIZE=1024x768" in env
    # The screen answers where the user works, at that size.
    geometry = await client.exec(sid, ["orch-screen", "geometry"])
    assert geometry.exit_code == 0, geometry
    assert json.loads(geometry.stdout)["width"] == 1024

    # A minimal session beside it: no screen, its container as before flavors.
    events = await client.wait_for(minimal.id, {"session.ready", "session.failed"}, timeout=READY_TIMEOUT)
    assert types(events)[-1] == "session.ready"
    assert "display.ready" not in types(events)
    inspected = json.loads(await adocker("inspect", desktop_name(minimal.id), host=host))[0]
    assert inspected["Config"]["Image"] == graphical_settings.desktop_image
    assert not [v for v in inspected["Config"]["Env"] if v.startswith(("ORCH_DESKTOP_FLAVOR=", "ORCH_DISPLAY_SIZE="))]


async def test_a_resumed_graphical_desktop_waits_for_its_new_screen(
    stack: tuple[Client, SandboxWorker], graphical_settings: Settings
) -> None:
    client, _ = stack
    record = await client.create(flavor="graphical", display=SCREEN)
    sid = record.id
    await client.wait_ready(sid, timeout=READY_TIMEOUT)
    # What the session keeps is its volume: the desktop's /var/lib/docker and the user's home.
    wrote = await client.exec(sid, shell="mkdir -p ~/Documents && echo kept > ~/Documents/kept && cat ~/Documents/kept")
    assert wrote.stdout == "kept\n", wrote

    await client.stop(sid)
    stopped = await client.wait_for(sid, {"session.stopped", "session.failed"}, timeout=READY_TIMEOUT)
    assert stopped[-1].type == "session.stopped"
    # A marker a previous run left (a crash before the stop's clean-up, a restart by the
    # daemon): a display of another size, restarted often. It must never pass for the new one.
    sockets = Path(graphical_settings.socket_dir) / sid
    sockets.mkdir(parents=True, exist_ok=True)
    stale = '{"display":":0","width":640,"height":480,"depth":24,"since_init_ms":1,"start_ms":1,"restarts":99}\n'
    (sockets / "display.ready").write_text(stale)

    await client.start(sid)
    events = await client.wait_for(
        sid, {"session.ready", "session.failed"}, timeout=READY_TIMEOUT, after=stopped[-1].id
    )
    seen = types(events)
    assert seen == ["session.starting", "desktop.started", "dockerd.ready", "display.ready", "session.ready"], seen
    screen = data(events, "display.ready")
    assert (screen["width"], screen["height"], screen["restarts"]) == (1024, 768, 0)
    assert all(e.data["generation"] == 2 for e in events if e.type in seen)
    kept = await client.exec(sid, shell="cat ~/Documents/kept")
    assert kept.stdout == "kept\n", kept

    await client.delete(sid)
    await client.wait_for(sid, {"session.deleted"}, timeout=READY_TIMEOUT)


async def test_a_graphical_desktop_runs_its_own_dockerd(stack: tuple[Client, SandboxWorker]) -> None:
    client, _ = stack
    record = await client.create(flavor="graphical", preload_images=[TEST_IMAGE])
    events = await client.wait_for(record.id, {"session.ready", "session.failed"}, timeout=READY_TIMEOUT)
    seen = types(events)
    assert seen[-1] == "session.ready", [(e.type, e.data.get("data")) for e in events]
    # The screen first, then the images it asked for: ready means both.
    assert seen.index("dockerd.ready") < seen.index("display.ready") < seen.index("images.loaded")
    dockerd = data(events, "dockerd.ready")
    assert (dockerd["storage_driver"], dockerd["backing_filesystem"], dockerd["depth"]) == ("overlay2", "extfs", 2)
    ran = await client.exec(record.id, ["docker", "run", "--rm", TEST_IMAGE, "echo", "nested in a graphical desktop"])
    assert (ran.exit_code, ran.stdout) == (0, "nested in a graphical desktop\n"), ran


async def test_a_graphical_session_without_its_image_fails_alone(docker_settings: Settings) -> None:
    # Not on the daemon, and no registry to pull it from: that session fails, coded.
    settings = replace(docker_settings, graphical_image="orchestrator/no-such-graphical:missing", registry=None)
    async with (
        running_worker(settings) as worker,
        running_api(settings) as url,
        Client(url, token=TOKENS["admin"]) as client,
    ):
        record = await client.create(flavor="graphical")
        events = await client.wait_for(record.id, {"session.ready", "session.failed"}, timeout=READY_TIMEOUT)
        assert events[-1].type == "session.failed", types(events)
        assert events[-1].data["data"]["code"] == "image_missing", events[-1].data
        assert "build-images.sh --graphical" in events[-1].data["data"]["message"]
        # The worker goes on serving: a minimal session is ready next.
        minimal = await client.create()
        assert (await client.wait_ready(minimal.id, timeout=READY_TIMEOUT)).state == "ready"
        assert worker.preparation.refused is None


async def test_a_display_server_that_dies_comes_back_and_is_announced(stack: tuple[Client, SandboxWorker]) -> None:
    """start-display restarts a dead Xvnc inside the desktop; the worker's health check sees the
    marker's restarts grow and says display.restarted (the session stays ready)."""
    client, worker = stack
    record = await client.create(flavor="graphical")
    sid = record.id
    await client.wait_ready(sid, timeout=READY_TIMEOUT)
    await worker.health.check()  # the baseline: restarts 0
    last = [e async for e in client.events(sid, follow=False)][-1].id
    killed = await client.exec(sid, shell="kill -KILL $(pidof Xvnc)")
    assert killed.exit_code == 0, killed
    deadline = asyncio.get_running_loop().time() + 40
    restarted: list[ServerEvent] = []
    while not restarted:
        assert asyncio.get_running_loop().time() < deadline, "no display.restarted within 40 s"
        await worker.health.check()
        restarted = [e async for e in client.events(sid, after=last, follow=False) if e.type == "display.restarted"]
        await asyncio.sleep(0.2)
    assert restarted[0].data["data"]["restarts"] == 1
    assert (await client.get(sid)).state == "ready"
    shot = await client.exec(sid, ["orch-screen", "geometry", "--plain"])
    assert shot.exit_code == 0, shot  # the new screen answers
    await client.delete(sid)
    await client.wait_for(sid, {"session.deleted"}, timeout=READY_TIMEOUT)
