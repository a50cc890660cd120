"""Self-similar nesting, four levels below the machine's daemon, identical setup at each:
machine dockerd → sandbox (sandbox image: its own dockerd + worker, depth 1) → desktop (a
session created through the API, depth 2) → a Docker-in-Docker container inside the desktop
(the desktop image again, depth 3) → a hello container (depth 4). At every dockerd level,
`docker info` must say overlay2 on extfs and the level's own address pool."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from orchestrator.client import Client
from orchestrator.config import Settings
from tests.conftest import free_port

from .conftest import CAPS, DESKTOP_IMAGE, SANDBOX_IMAGE, TEST_IMAGE, TOKENS, adocker, compose_sandbox_flags, pipe_in


async def info(host: str, *exec_chain: str) -> dict[str, object]:
    out = (
        await adocker(*exec_chain, "docker", "info", "--format", "{{json .}}", host=host)
        if exec_chain
        else await adocker("info", "--format", "{{json .}}", host=host)
    )
    data: dict[str, object] = json.loads(out)
    return data


def check_level(data: dict[str, object], depth: int) -> None:
    assert data["Driver"] == "overlay2", data["Driver"]
    status = data["DriverStatus"]  # [["Backing Filesystem", "extfs"], ...]
    assert isinstance(status, list), status
    assert dict(status)["Backing Filesystem"] == "extfs", status
    pools = data["DefaultAddressPools"]
    assert pools == [{"Base": f"10.{212 + depth}.0.0/16", "Size": 24}], pools


async def succeeds(host: str, *args: str) -> bool:
    proc = await asyncio.create_subprocess_exec(
        "docker",
        *args,
        env={"DOCKER_HOST": host, "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await proc.wait() == 0


async def wait_until(probe: list[str], host: str, timeout: float = 90) -> float:
    """Seconds until `docker <probe>` succeeds; fails the test after ``timeout``."""
    started = time.monotonic()
    async with asyncio.timeout(timeout):
        while not await succeeds(host, *probe):
            await asyncio.sleep(0.1)
    return time.monotonic() - started


@pytest.fixture
async def sandbox_stack(images: str, settings: Settings) -> AsyncIterator[tuple[str, Settings]]:
    """A Redis container and a sandbox container on a network of their own, on the machine's daemon."""
    host = images
    if not await adocker("image", "inspect", "--format", "{{.Id}}", SANDBOX_IMAGE, host=host, check=False):
        pytest.fail(f"{SANDBOX_IMAGE} is missing: run `make images`")
    tag = uuid.uuid4().hex[:8]
    net, redis_name, sandbox_name = f"orchnest{tag}", f"orchnest-redis-{tag}", f"orchnest-sandbox-{tag}"
    port = free_port()
    await adocker("network", "create", net, host=host)
    try:
        await adocker(
            "run",
            "-d",
            "--name",
            redis_name,
            "--network",
            net,
            "-p",
            f"127.0.0.1:{port}:6379",
            SANDBOX_IMAGE,
            "redis-server",
            "--protected-mode",
            "no",
            "--save",
            "",
            host=host,
        )
        sandbox_settings = replace(
            settings, redis_url=f"redis://127.0.0.1:{port}/0", sandbox_id=f"nest{tag}", default_sandbox=None
        )
        await adocker(
            "run",
            "-d",
            "--name",
            sandbox_name,
            "--network",
            net,
            *compose_sandbox_flags(),
            "-v",
            f"orchnest-{tag}:/var/lib/docker",
            "-e",
            f"REDIS_URL=redis://{redis_name}:6379/0",
            "-e",
            f"ORCH_SANDBOX_ID=nest{tag}",
            "-e",
            f"ORCH_KEY_PREFIX={settings.key_prefix}",
            "-e",
            "ORCH_DEPTH=1",
            "-e",
            "ORCH_POLL_DELAY=0.01",
            # The image the test loads into the sandbox, under whatever tag this run uses.
            "-e",
            f"ORCH_DESKTOP_IMAGE={DESKTOP_IMAGE}",
            SANDBOX_IMAGE,
            host=host,
        )
        yield sandbox_name, sandbox_settings
    finally:
        await adocker("rm", "-f", "-v", sandbox_name, redis_name, host=host, check=False)
        await adocker("volume", "rm", "-f", f"orchnest-{tag}", host=host, check=False)
        await adocker("network", "rm", net, host=host, check=False)


async def test_four_levels_deep_with_identical_setup_at_each(images: str, sandbox_stack: tuple[str, Settings]) -> None:
    from .conftest import running_api

    host = images
    sandbox, sandbox_settings = sandbox_stack
    timings: dict[str, float] = {}

    # Level 1: the sandbox's own dockerd, then the images its desktops need (no registry here).
    timings["sandbox dockerd ready"] = await wait_until(["exec", sandbox, "docker", "version"], host)
    check_level(await info(host, "exec", sandbox), 1)
    t = time.monotonic()
    for image in (DESKTOP_IMAGE, TEST_IMAGE):
        await pipe_in(host, ["exec", "-i", sandbox], "docker load -q", f"docker save {image}")
    timings["images into the sandbox"] = time.monotonic() - t

    # Level 2: a session through the API, placed on that sandbox by its worker's heartbeat.
    async with running_api(sandbox_settings) as base_url, Client(base_url, token=TOKENS["admin"]) as client:
        t = time.monotonic()
        async with asyncio.timeout(60):
            while not [s for s in await client.sandboxes() if s.id == sandbox_settings.sandbox_id]:
                await asyncio.sleep(0.1)
        record = await client.create(sandbox=sandbox_settings.sandbox_id)
        events = await client.wait_for(record.id, {"session.ready", "session.failed"}, timeout=120)
        assert events[-1].type == "session.ready", events[-1].data["data"]
        timings["session ready (POST to session.ready)"] = time.monotonic() - t
        ready = next(e for e in events if e.type == "dockerd.ready").data["data"]
        assert ready["depth"] == 2 and ready["address_pool"] == "10.214.0.0/16"
        heartbeat = next(s for s in await client.sandboxes() if s.id == sandbox_settings.sandbox_id)
        assert heartbeat.depth == 1 and heartbeat.address_pool == "10.213.0.0/16"
        # The sandbox's worker runs the default (auto): the desktop at depth 2 is user-namespaced,
        # so levels 3 and 4 run inside its namespace.
        started = next(e for e in events if e.type == "desktop.started").data["data"]
        assert started["privilege"] == "userns" and heartbeat.privilege.startswith("userns"), started
    desktop = f"desktop-{record.id}"
    in_desktop = ["exec", sandbox, "docker", "exec", desktop]
    check_level(await info(host, *in_desktop), 2)

    # Level 3: Docker-in-Docker inside the desktop: the desktop image again, same recipe.
    t = time.monotonic()
    for image in (DESKTOP_IMAGE, TEST_IMAGE):
        await adocker(
            "exec", sandbox, "sh", "-c", f"docker save {image} | docker exec -i {desktop} docker load -q", host=host
        )
    timings["images into the desktop"] = time.monotonic() - t
    await adocker(
        *in_desktop,
        "docker",
        "run",
        "-d",
        "--name",
        "dind",
        *CAPS,
        "-v",
        "dind-data:/var/lib/docker",
        "-e",
        "ORCH_DEPTH=3",
        DESKTOP_IMAGE,
        host=host,
    )
    timings["level-3 dockerd ready"] = await wait_until(
        [*in_desktop, "docker", "exec", "dind", "docker", "version"], host
    )
    in_dind = [*in_desktop, "docker", "exec", "dind"]
    check_level(await info(host, *in_dind), 3)

    # Level 4: a container of the level-3 daemon prints hello.
    await adocker(*in_desktop, "sh", "-c", f"docker save {TEST_IMAGE} | docker exec -i dind docker load -q", host=host)
    out = await adocker(*in_dind, "docker", "run", "--rm", TEST_IMAGE, "echo", "hello from depth 4", host=host)
    assert out == "hello from depth 4"
    print("\nnesting timings (s): " + ", ".join(f"{k}: {v:.1f}" for k, v in timings.items()))


# The worker, not `python3 -m workers.firewall` (sandbox-init loads the rules with it first).
WORKER_PROCESS = "python.* -m workers$"


async def test_the_sandbox_restarts_a_crashed_worker_and_dockerd(
    images: str, sandbox_stack: tuple[str, Settings]
) -> None:
    host = images
    sandbox, _ = sandbox_stack
    # `orchestrator worker` replaces itself with `python3 -m workers` (same pid).
    await wait_until(["exec", sandbox, "pgrep", "-f", WORKER_PROCESS], host)
    worker_pid = await adocker("exec", sandbox, "pgrep", "-f", WORKER_PROCESS, host=host)
    await adocker("exec", sandbox, "kill", "-KILL", worker_pid, host=host)
    await wait_until(["exec", sandbox, "sh", "-c", f"pgrep -f '{WORKER_PROCESS}' | grep -vx {worker_pid}"], host)

    dockerd_pid = await adocker("exec", sandbox, "pgrep", "-x", "dockerd", host=host)
    await adocker("exec", sandbox, "kill", "-KILL", dockerd_pid, host=host)
    await wait_until(["exec", sandbox, "sh", "-c", f"pgrep -x dockerd | grep -vx {dockerd_pid}"], host)
    await wait_until(["exec", sandbox, "docker", "version"], host)
    logs = await adocker("logs", sandbox, host=host, stderr=True)
    assert "the worker exited with status" in logs
    dockerd_log = await adocker("exec", sandbox, "cat", "/var/log/dockerd.log", host=host)
    assert "dockerd exited with status" in dockerd_log
