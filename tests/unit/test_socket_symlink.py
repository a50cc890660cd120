"""H1 (e3): a desktop owns its end of the per-session socket directory, so root in it can
replace ``docker.sock`` with a symlink that the worker would resolve in *its* mount namespace,
e.g. to the sandbox's own dockerd. The worker reaches nothing then: the health probe says
unhealthy and a stop touches no container. A recording daemon on a real unix socket stands in
for the sandbox's dockerd (pointing a real desktop at the project's engine would stop every
container on it). The guard: workers/runtime/inner.py ``pinned_socket``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from workers.privilege import PrivilegeKind, PrivilegeProfile
from workers.runtime.desktops import socket_path
from workers.runtime.engine import DesktopRuntime


@dataclass
class RecordingDaemon:
    """Answers like a dockerd with two running containers; keeps every request it gets."""

    path: str
    requests: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(f"{request.method} {request.path}")
        if request.path.endswith("/_ping"):
            return web.Response(text="OK")
        if request.path.endswith("/version"):
            return web.json_response({"ApiVersion": "1.41", "Version": "20.10.24"})
        if request.path.endswith("/containers/json"):
            return web.json_response([{"Id": "desktop-of-tenant-b"}, {"Id": "desktop-of-tenant-c"}])
        return web.Response(status=204)


@contextlib.asynccontextmanager
async def listening(path: str) -> AsyncIterator[RecordingDaemon]:
    daemon = RecordingDaemon(path)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", daemon.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, path).start()
    try:
        yield daemon
    finally:
        await runner.cleanup()


@pytest.fixture
async def sandbox_daemon(tmp_path: Path) -> AsyncIterator[RecordingDaemon]:
    async with listening(str(tmp_path / "sandbox-docker.sock")) as daemon:
        yield daemon


@pytest.fixture
async def runtime(tmp_path: Path, sandbox_daemon: RecordingDaemon) -> AsyncIterator[DesktopRuntime]:
    rt = DesktopRuntime(
        docker_host=f"unix://{sandbox_daemon.path}",
        image="orchestrator/desktop:dev",
        sandbox_id="sb",
        depth=1,
        socket_dir=str(tmp_path / "desktops"),
        profile=PrivilegeProfile(PrivilegeKind.CAPS, "test"),
    )
    yield rt
    await rt.close()


async def test_a_socket_listening_in_the_session_dir_is_reached(runtime: DesktopRuntime) -> None:
    # The control: a daemon listening at the session's own path (as the desktop's dockerd
    # does) is reached, so the guard below is not "never connect".
    path = socket_path(runtime.desktops.socket_dir, "s-honest")
    os.makedirs(os.path.dirname(path))
    async with listening(path) as own:
        assert await runtime.inner.answers("s-honest")
        assert await runtime.inner.stop_containers("s-honest", 1) == 2
    assert own.requests[0] == "GET /_ping"


async def test_a_symlinked_socket_reaches_nothing(runtime: DesktopRuntime, sandbox_daemon: RecordingDaemon) -> None:
    path = socket_path(runtime.desktops.socket_dir, "s-attacker")
    os.makedirs(os.path.dirname(path))
    # Root in the desktop: ln -sf /var/run/docker.sock /run/orchestrator/docker.sock
    os.symlink(sandbox_daemon.path, path)
    assert not await runtime.inner.answers("s-attacker")
    assert await runtime.inner.stop_containers("s-attacker", 1) == 0
    assert sandbox_daemon.requests == []


def make(kind: str, path: str) -> None:
    if kind == "directory":
        os.mkdir(path)
    elif kind == "fifo":
        os.mkfifo(path)  # an open() of it would block: O_PATH never does
    else:
        Path(path).write_text("GET / HTTP/1.0\r\n")


@pytest.mark.parametrize("kind", ["directory", "fifo", "regular file"])
async def test_anything_but_a_socket_at_the_path_is_refused_without_a_connect(
    runtime: DesktopRuntime, kind: str
) -> None:
    path = socket_path(runtime.desktops.socket_dir, "s-odd")
    os.makedirs(os.path.dirname(path))
    make(kind, path)
    assert not await runtime.inner.answers("s-odd")
    assert await runtime.inner.stop_containers("s-odd", 1) == 0
