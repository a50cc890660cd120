"""Fixtures that run the real API (uvicorn on a loopback port) and a real worker in the test's
event loop, each test in its own key prefix and sandbox id so nothing is shared."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import uvicorn
from litestar import Litestar

from orchestrator.api import create_app
from orchestrator.auth import hash_token
from orchestrator.client import Client
from orchestrator.config import Settings, to_env
from orchestrator.events import EventBus
from orchestrator.keys import Keys
from orchestrator.names import LABEL_SANDBOX, LABEL_SESSION, desktop_name
from tests.conftest import free_port
from workers.worker import SandboxWorker

DESKTOP_IMAGE = os.environ.get("ORCH_DESKTOP_IMAGE", "orchestrator/desktop:dev")
TEST_IMAGE = os.environ.get("ORCH_TEST_IMAGE", "orchestrator/test-busybox:dev")
SANDBOX_IMAGE = os.environ.get("ORCH_SANDBOX_IMAGE", "orchestrator/sandbox:dev")
# What runc accepts on our machines (no CAP_SYS_RESOURCE); start-dockerd remounts cgroups inside.
UNCONFINED = [
    "--security-opt",
    "seccomp=unconfined",
    "--security-opt",
    "apparmor=unconfined",
    "--security-opt",
    "systempaths=unconfined",
]
CAPS = ["--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE", *UNCONFINED]

# Test tokens, one per scope; the API is configured with their hashes only.
TOKENS = {
    scope: f"test-token-{scope.replace(':', '-')}"
    for scope in ("admin", "sessions:write", "events:read", "sessions:exec")
}
ADMIN = {"Authorization": f"Bearer {TOKENS['admin']}"}


PROJECT_ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def compose_sandbox_flags(*overlays: str) -> tuple[str, ...]:
    """`docker run` flags for the sandbox service of docker-compose.yml (+ ``overlays``)."""
    files = [arg for name in ("docker-compose.yml", *overlays) for arg in ("-f", str(PROJECT_ROOT / name))]
    out = subprocess.run(
        ["docker", "compose", *files, "config", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=PROJECT_ROOT,
    ).stdout
    service = json.loads(out)["services"]["sandbox"]
    flags = [f"--cap-drop={cap}" for cap in service.get("cap_drop", [])]
    flags += [f"--cap-add={cap}" for cap in service.get("cap_add", [])]
    if "cgroup" in service:
        flags.append(f"--cgroupns={service['cgroup']}")
    for option in service.get("security_opt", []):
        key, _, value = option.partition("=")
        # The CLI reads a seccomp file as compose does, relative to the project.
        path = PROJECT_ROOT / value if key == "seccomp" and value != "unconfined" else None
        flags.append(f"--security-opt={key}={path or value}")
    flags += [f"--sysctl={key}={value}" for key, value in service.get("sysctls", {}).items()]
    if service.get("privileged"):
        flags.append("--privileged")
    return tuple(flags)


def docker(*args: str, host: str, check: bool = True, stderr: bool = False, timeout: float = 120) -> str:
    """Run the docker CLI against ``host``; returns stdout (and stderr after it, if asked)."""
    result = subprocess.run(
        ["docker", *args],
        env={**os.environ, "DOCKER_HOST": host},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {result.stderr.strip()}")
    return (result.stdout + (result.stderr if stderr else "")).strip()


async def adocker(*args: str, host: str, check: bool = True, stderr: bool = False, timeout: float = 120) -> str:
    """``docker()`` for async tests: the CLI runs as an asyncio subprocess, so the API, workers and
    SSE streams that the test runs in its own event loop keep going meanwhile."""
    proc = await asyncio.create_subprocess_exec(
        "docker",
        *args,
        env={**os.environ, "DOCKER_HOST": host},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:  # timed out or cancelled: leave no CLI behind
            proc.kill()
            await proc.wait()
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {err.decode(errors='replace').strip()}")
    return (out.decode(errors="replace") + (err.decode(errors="replace") if stderr else "")).strip()


@pytest.fixture
def settings(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return make_settings(redis_url, tmp_path_factory)


def make_settings(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A test's settings: its own key prefix and sandbox id (also for module-scoped fixtures)."""
    tag = uuid.uuid4().hex[:8]
    return Settings(
        redis_url=redis_url,
        key_prefix=f"test-{tag}:",
        sandbox_id=f"t{tag}",
        default_sandbox=f"t{tag}",
        depth=1,
        desktop_image=DESKTOP_IMAGE,
        socket_dir=str(tmp_path_factory.mktemp("desktops")),
        heartbeat_interval_s=1.0,
        sse_keepalive_s=1.0,
        ready_timeout_s=60.0,
        stop_timeout_s=10,
        poll_delay_s=0.01,
        reconcile_interval_s=0.5,
        lock_lease_s=2.0,
        orphan_grace_s=3600.0,
        # Tests restart and kill workers on purpose: no sandbox is declared lost unless a test asks.
        lost_after_s=120.0,
        tokens=";".join(f"{scope.replace(':', '-')}:{hash_token(raw)}:{scope}" for scope, raw in TOKENS.items()),
    )


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def bus(redis: aioredis.Redis, settings: Settings) -> EventBus:
    return EventBus(redis, Keys(settings.key_prefix))


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[str]:
    """The real API on a loopback port; yields its base URL."""
    async with running_api(settings) as url:
        yield url


@contextlib.asynccontextmanager
async def running_api(settings: Settings, app: Litestar | None = None) -> AsyncIterator[str]:
    """``app``: one built on ``create_app(settings)`` with more on it (routes a test adds)."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app or create_app(settings),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=2,
            # As `orchestrator api` serves (cli.py _serve_api).
            http="h11",
            h11_max_incomplete_event_size=settings.max_header_bytes,
            limit_concurrency=settings.max_connections,
        )
    )
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(20):
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 20)


@pytest.fixture
async def client(api: str) -> AsyncIterator[Client]:
    async with Client(api, token=TOKENS["admin"]) as c:
        yield c


@pytest.fixture
def images(docker_host: str) -> str:
    return require_images(docker_host)


def require_images(host: str) -> str:
    """``host``, once the desktop and test images are there (also for module-scoped fixtures)."""
    for image in (DESKTOP_IMAGE, TEST_IMAGE):
        if not docker("image", "inspect", "--format", "{{.Id}}", image, host=host, check=False):
            pytest.fail(f"image {image} is missing: run `make images` (scripts/build-images.sh --test)")
    return host


@pytest.fixture
def docker_settings(settings: Settings, images: str) -> Iterator[Settings]:
    """Settings for a worker on the real Docker Engine; removes whatever the test's sandbox made."""
    yield replace(settings, docker_host=images)
    remove_sandbox_objects(images, settings.sandbox_id)


def remove_sandbox_objects(host: str, sandbox_id: str) -> None:
    """Remove every container and volume labelled with ``sandbox_id``, whatever a test left."""
    label = f"label={LABEL_SANDBOX}={sandbox_id}"
    containers = docker("ps", "-aq", "--filter", label, host=host).split()
    if containers:
        docker("rm", "-f", *containers, host=host, check=False)
    volumes = docker("volume", "ls", "-q", "--filter", label, host=host).split()
    if volumes:
        docker("volume", "rm", "-f", *volumes, host=host, check=False)
    networks = docker("network", "ls", "-q", "--filter", label, host=host).split()
    if networks:  # each takes a /24 of the daemon's pool: leaking them would exhaust it
        docker("network", "rm", *networks, host=host, check=False)


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[SandboxWorker]:
    """A real worker for ``settings``' sandbox, consuming its queue in this event loop."""
    sandbox = SandboxWorker(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(sandbox.serve(stop))
    try:
        started = asyncio.create_task(sandbox.started.wait())
        await asyncio.wait({started, task}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # start-up failed: raise its error here
        assert sandbox.started.is_set(), "the worker did not finish start-up within 60 s"
        yield sandbox
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


@pytest.fixture
async def worker(docker_settings: Settings) -> AsyncIterator[SandboxWorker]:
    async with running_worker(docker_settings) as sandbox:
        yield sandbox


async def labels_of(host: str, kind: str, name: str) -> dict[str, str]:
    out = await adocker(
        kind,
        "inspect",
        "--format",
        "{{json .Labels}}" if kind == "volume" else "{{json .Config.Labels}}",
        name,
        host=host,
    )
    result: dict[str, str] = json.loads(out)
    return result


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes `orchestrator worker` (a real process) use ``settings``:
    every variable of the settings table, over this process's environment (for PATH and, when
    ``settings`` leaves it unset, DOCKER_HOST)."""
    return {**os.environ, **to_env(settings), **extra}


async def count_objects(host: str, session_id: str) -> tuple[int, int]:
    """(containers, volumes) labelled for ``session_id``."""
    label = f"label={LABEL_SESSION}={session_id}"
    containers = (await adocker("ps", "-aq", "--filter", label, host=host)).split()
    volumes = (await adocker("volume", "ls", "-q", "--filter", label, host=host)).split()
    return len(containers), len(volumes)


async def delivered_env(host: str, session_id: str) -> dict[str, str]:
    """The environment of the process the desktop's init started (start-dockerd, the parent of
    its dockerd), where the session's env is delivered; read from /proc inside the desktop."""
    script = 'pid=$(pgrep -o -x start-dockerd) && cat "/proc/$pid/environ"'
    raw = await adocker("exec", desktop_name(session_id), "sh", "-c", script, host=host)
    return dict(entry.split("=", 1) for entry in raw.split("\0") if "=" in entry)


async def desktop_json(host: str, session_id: str) -> str:
    """All of ``docker inspect`` of the session's desktop, as JSON text."""
    return await adocker("inspect", desktop_name(session_id), host=host)


async def pipe_in(host: str, chain: list[str], command: str, source: str) -> None:
    """Run ``command`` at the end of the exec ``chain`` (e.g. ["exec", "-i", box]) with ``source``,
    a shell pipeline on this machine, as its stdin: how images and files travel between levels."""
    inner = " ".join(["docker", *chain, "sh", "-c", f"'{command}'"])
    proc = await asyncio.create_subprocess_shell(
        f"{source} | {inner}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={"DOCKER_HOST": host, "PATH": "/usr/bin:/bin"},
    )
    try:
        async with asyncio.timeout(600):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise AssertionError(f"{source} | {inner} failed ({proc.returncode}): {err.decode(errors='replace').strip()}")
