"""docker-compose.yml, run by scripts/stack.sh the way `make up` runs it, brings up a working stack:
Redis, the API, the registry (holding the images the build pushed) and two sandboxes (each its
own dockerd and worker, pulling the desktop image from the registry), to a real dockerd.ready."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from orchestrator.auth import hash_token
from orchestrator.client import Client
from orchestrator.schemas import SandboxInfo
from tests.conftest import free_port
from workers.privilege import SECCOMP_PROFILE, USERNS_CAPS

from .conftest import DESKTOP_IMAGE, SANDBOX_IMAGE, TOKENS, adocker, docker

pytestmark = pytest.mark.slow  # a soak: `-m "not slow"` leaves it out
ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "scripts" / "stack.sh"


def stack_files() -> list[Path]:
    """What a stack needs at any level: the compose files and the script that runs them."""
    return [
        ROOT / "docker-compose.yml",
        ROOT / "docker-compose.caps.yml",
        ROOT / "docker-compose.privileged.yml",
        ROOT / "deploy" / "seccomp" / "sandbox.json",
        STACK,
    ]


@dataclass(frozen=True)
class Stack:
    url: str
    project: str
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """``scripts/stack.sh ARGS`` for this stack (same files, project and .env)."""
        return subprocess.run(
            ["bash", str(STACK), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    async def arun(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """``run()`` for async tests, in a thread: the test's event loop keeps going."""
        return await asyncio.to_thread(self.run, *args, timeout=timeout)

    async def container(self, service: str) -> str:
        return await adocker(
            "ps",
            "-q",
            "--filter",
            f"label=com.docker.compose.project={self.project}",
            "--filter",
            f"label=com.docker.compose.service={service}",
            host=self.env["DOCKER_HOST"],
        )


def start_stack(host: str, scale: int, **settings: str) -> Stack:
    """``scripts/stack.sh up`` on ``host`` (a compose project of its own)."""
    for image in (SANDBOX_IMAGE, DESKTOP_IMAGE):
        if not docker("image", "inspect", "--format", "{{.Id}}", image, host=host, check=False):
            pytest.fail(f"image {image} is missing: run `make images`")
    project = f"orchtest{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {
        **os.environ,
        "DOCKER_HOST": host,
        "COMPOSE_PROJECT_NAME": project,
        "ORCH_API_PORT": str(port),
        "ORCH_REGISTRY_PORT": str(free_port()),
        "ORCH_TOKENS": f"compose:{hash_token(TOKENS['admin'])}:admin",
        **settings,
    }
    env.pop("ORCH_DEPTH", None)
    stack = Stack(f"http://127.0.0.1:{port}", project, env)
    up = stack.run("up", "--scale", str(scale), timeout=600)
    try:
        assert up.returncode == 0, up.stderr
        assert f"pushed {DESKTOP_IMAGE} to this level's registry" in up.stderr
    except BaseException:
        stop_stack(stack)
        raise
    return stack


def stop_stack(stack: Stack) -> None:
    print(stack.run("compose", "logs", "--no-color").stdout[-4000:])
    stack.run("down", "-v", "-t", "10")


@contextlib.contextmanager
def compose_stack(host: str, scale: int, **settings: str) -> Iterator[Stack]:
    stack = start_stack(host, scale, **settings)
    try:
        yield stack
    finally:
        stop_stack(stack)


@contextlib.asynccontextmanager
async def acompose_stack(host: str, scale: int, **settings: str) -> AsyncIterator[Stack]:
    """``compose_stack()`` for async tests: up and down run in a thread, off the event loop."""
    stack = await asyncio.to_thread(start_stack, host, scale, **settings)
    try:
        yield stack
    finally:
        await asyncio.to_thread(stop_stack, stack)


@pytest.fixture
def stack(images: str) -> Iterator[Stack]:
    with compose_stack(images, scale=2) as stack:
        yield stack


async def wait_healthy(url: str) -> None:
    async with httpx.AsyncClient(base_url=url) as http, asyncio.timeout(60):
        while True:
            try:
                if (await http.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)


async def wait_sandboxes(client: Client, ids: set[str] | int) -> list[SandboxInfo]:
    """Until the live sandboxes are ``ids`` (or that many): each starts its dockerd and pulls the
    desktop image from the registry first."""
    async with asyncio.timeout(180):
        while True:
            sandboxes = [s for s in await client.sandboxes() if s.status == "available"]
            found = {s.id for s in sandboxes}
            if found == ids or len(found) == ids:
                return sandboxes
            await asyncio.sleep(0.5)


async def test_compose_stack_scales_sandboxes_and_runs_a_session(stack: Stack) -> None:
    # The host runs compose v2 (scripts/env.sh installs it); v1 runs inside a desktop in the
    # self-hosting test (Debian 12's docker-compose, in the desktop image).
    version = (await stack.arun("compose", "version")).stdout
    assert "version 2." in version, f"stack.sh did not use compose v2 ({version}): scripts/env.sh installs it"
    await wait_healthy(stack.url)
    async with Client(stack.url, token=TOKENS["admin"]) as client:
        sandboxes = await wait_sandboxes(client, 2)
        assert all(s.depth == 1 and s.address_pool == "10.213.0.0/16" for s in sandboxes)
        record = await client.create(labels={"via": "compose"})
        assert record.sandbox in {s.id for s in sandboxes}
        events = await client.wait_for(record.id, {"session.ready", "session.failed"}, timeout=180)
        assert events[-1].type == "session.ready", [e.data for e in events]
        # The sandbox's own desktops are user-namespaced, under a least-privilege sandbox.
        (started,) = [e.data["data"] for e in events if e.type == "desktop.started"]
        assert (started["privilege"], started["unsafe"]) == ("userns", False), started
        await assert_least_privilege(stack)
        ready = next(e for e in events if e.type == "dockerd.ready").data["data"]
        assert ready["storage_driver"] == "overlay2" and ready["backing_filesystem"] == "extfs"
        assert ready["depth"] == 2 and ready["address_pool"] == "10.214.0.0/16"
        await assert_desktop_isolated(stack, record.sandbox, record.id)
        await assert_access_works(client, record.id)
        await client.delete(record.id)
        events = await client.wait_for(
            record.id, {"session.deleted", "session.failed"}, timeout=120, after=events[-1].id
        )
        assert events[-1].type == "session.deleted"

        # The desktop image came through the registry (the sandboxes' daemons started empty).
        for box in (await stack.container("sandbox")).split():
            pulled = await adocker(
                "exec", box, "docker", "images", "-q", f"registry:5000/{DESKTOP_IMAGE}", host=stack.env["DOCKER_HOST"]
            )
            assert pulled, f"sandbox {box} did not pull {DESKTOP_IMAGE} from the registry"

        # Recreated containers (a new image, changed settings) are the same sandboxes: the id
        # lives on the dockerd volume compose keeps, so queues and sessions carry over.
        ids = {s.id for s in sandboxes}
        recreate = await stack.arun(
            "compose", "up", "-d", "--no-deps", "--force-recreate", "--scale", "sandbox=2", "sandbox"
        )
        assert recreate.returncode == 0, recreate.stderr
        await wait_sandboxes(client, ids)
        record = await client.create(labels={"via": "compose", "after": "recreate"})
        assert record.sandbox in ids
        assert (await client.wait_ready(record.id, timeout=180)).state == "ready"


async def assert_access_works(client: Client, session_id: str) -> None:
    """The API reaches the desktop through its sandbox's worker (the direct road, compose's
    network): a file up and down, a terminal that runs a command."""
    payload = os.urandom(3 * 2**20)
    written = await client.upload(session_id, "/root/through-compose.bin", payload)
    assert written["bytes"] == len(payload)
    assert b"".join([c async for c in client.download(session_id, "/root/through-compose.bin")]) == payload
    async with client.terminal(session_id) as term:
        await term.send(b"echo via-$((40+2)); exit 3\r")
        seen = b"".join([chunk async for chunk in term])
    assert b"via-42" in seen and term.exit_code == 3, (seen[-300:], term.exit_code)


async def assert_least_privilege(stack: Stack) -> None:
    """docker-compose.yml's sandboxes: not privileged, the userns desktops' 17 capabilities and
    no other, a private cgroup namespace, the project's seccomp profile, Docker's masked paths,
    and sandbox-init saying so."""
    host = stack.env["DOCKER_HOST"]
    for box in (await stack.container("sandbox")).split():
        config = json.loads(await adocker("inspect", "--format", "{{json .HostConfig}}", box, host=host))
        assert config["Privileged"] is False
        assert (config["CapDrop"], sorted(config["CapAdd"])) == (["ALL"], sorted(USERNS_CAPS)), config["CapAdd"]
        assert config["CgroupnsMode"] == "private"
        assert json.loads(config["SecurityOpt"][0].removeprefix("seccomp=")) == json.loads(SECCOMP_PROFILE)
        # Docker's default masked and read-only paths, kept.
        assert {"/proc/kcore", "/proc/keys", "/proc/timer_list"} <= set(config["MaskedPaths"]), config["MaskedPaths"]
        assert {"/proc/sys", "/proc/sysrq-trigger"} <= set(config["ReadonlyPaths"]), config["ReadonlyPaths"]
        status = await adocker("exec", box, "grep", "^Cap", "/proc/1/status", host=host)
        assert "CapBnd:\t00000000a82c35fb" in status, status
        logs = await adocker("logs", box, host=host, stderr=True)
        assert "privilege: least (17 capabilities, private cgroup namespace)" in logs, logs[-2000:]


async def assert_desktop_isolated(stack: Stack, sandbox_id: str, session_id: str) -> None:
    """The sandbox's firewall (workers/firewall.py): from inside the desktop, Redis, the API,
    the registry and the sandbox's own ports (the worker's metrics) do not answer, while the
    same probe from the sandbox itself reaches them (so the probe is not what fails)."""
    host = stack.env["DOCKER_HOST"]
    boxes = {
        await adocker("exec", c, "cat", "/var/lib/docker/orchestrator/sandbox-id", host=host): c
        for c in (await stack.container("sandbox")).split()
    }
    box = boxes[sandbox_id]

    async def address(container: str) -> str:
        return (
            await adocker(
                "inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", container, host=host
            )
        ).split()[0]

    targets = {
        "redis": (await address(await stack.container("redis")), 6379),
        "api": (await address(await stack.container("api")), 8080),
        "registry": (await address(await stack.container("registry")), 5000),
        "the sandbox's metrics": (await address(box), 9100),
        "the worker's access port": (await address(box), 9200),
    }
    for name, (ip, port) in targets.items():
        probe = f"timeout 3 bash -c 'exec 3<>/dev/tcp/{ip}/{port}' && echo open || echo closed"
        from_sandbox = await adocker("exec", box, "bash", "-c", probe, host=host)
        assert from_sandbox == "open", f"{name} at {ip}:{port} does not answer even from the sandbox"
        from_desktop = await adocker(
            "exec", box, "docker", "exec", f"desktop-{session_id}", "bash", "-c", probe, host=host
        )
        assert from_desktop == "closed", f"the desktop reaches {name} at {ip}:{port}"
