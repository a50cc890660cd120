"""Computer use: a screenshot (PNG at 1280x800, and at half scale) and an input action (a move)
through the API (ticket, access route, the worker's docker exec of orch-screen through
desktop-enter, back), against the same orch-screen run by a docker exec straight on the
sandbox's daemon (aiodocker, nothing else): what the API and the route add to orch-screen's own
work."""

from __future__ import annotations

import asyncio
import os
import time

import aiodocker

from orchestrator.client import ApiError, Client
from orchestrator.names import desktop_name

from .harness import Result, Side, alternate, services
from .scenarios import delete, ready_client

GRAPHICAL_IMAGE = os.environ.get("ORCH_GRAPHICAL_IMAGE", "orchestrator/desktop-graphical:dev")
SIZE = (1280, 800)


async def screen(n: int) -> list[Result]:
    async with aiodocker.Docker() as docker:
        try:
            await docker.images.inspect(GRAPHICAL_IMAGE)
        except aiodocker.DockerError:
            print(f"  skipped: no {GRAPHICAL_IMAGE} (scripts/build-images.sh --graphical builds it)", flush=True)
            return []
    png = Result("screen: PNG 1280x800", "s", Side("project: GET /screenshot"), Side("bare: docker exec orch-screen"))
    half = Result("screen: PNG at scale 0.5", "s", Side("project: GET ?scale=0.5"), Side("bare: --size 640x400"))
    move = Result("screen: input move", "s", Side("project: POST /input"), Side("bare: docker exec orch-screen"))
    with services(ORCH_GRAPHICAL_IMAGE=GRAPHICAL_IMAGE) as svc:
        client = await ready_client(svc)
        async with client, aiodocker.Docker() as docker:
            record = await client.create(flavor="graphical", display={"width": SIZE[0], "height": SIZE[1]})
            await client.wait_ready(record.id, timeout=120)
            sid = record.id
            container = docker.containers.container(desktop_name(sid))
            sizes = await _screen_up(client, sid)
            png.notes["PNG bytes"] = sizes

            async def bare(*args: str) -> float:
                started = time.perf_counter()
                exec_ = await container.exec(["desktop-enter", "orch-screen", *args], stdin=False, tty=False)
                async with exec_.start(detach=False) as stream:
                    while await stream.read_out() is not None:
                        pass
                return time.perf_counter() - started

            async def shot(scale: float | None = None) -> float:
                started = time.perf_counter()
                await client.screenshot(sid, scale=scale)
                return time.perf_counter() - started

            async def moved() -> float:
                started = time.perf_counter()
                await client.input(sid, "move", x=400, y=300)
                return time.perf_counter() - started

            await alternate(n, shot, lambda: bare("screenshot"), png)
            await alternate(n, lambda: shot(0.5), lambda: bare("screenshot", "--size", "640x400"), half)
            await alternate(n, moved, lambda: bare("move", "400", "300"), move)
            await delete(client, sid)
    return [png, half, move]


async def _screen_up(client: Client, sid: str) -> int:
    """Wait for the display (503 display_unavailable while it starts); the first image's size."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return len((await client.screenshot(sid)).data)
        except ApiError as e:
            if e.code != "display_unavailable" or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


SCENARIOS = {"screen": screen}
DEFAULT_N = {"screen": 100}
