"""docker-compose.yml brings up a working stack: Redis, the API and a containerized worker
that drives the machine's dockerd as its sandbox, to a real dockerd.ready."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from orchestrator.auth import hash_token
from orchestrator.client import Client
from tests.conftest import free_port

from .conftest import TOKENS, docker, remove_sandbox_objects

pytestmark = pytest.mark.docker
ROOT = Path(__file__).resolve().parents[2]
SANDBOX_IMAGE = os.environ.get("ORCH_SANDBOX_IMAGE", "orchestrator/sandbox:dev")


def compose_command() -> list[str]:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` nor `docker-compose` is installed (scripts/env.sh installs it)")


@pytest.fixture
def stack(images: str) -> Iterator[tuple[str, str]]:
    if not images.startswith("unix://"):
        pytest.skip(f"the compose test mounts the daemon's unix socket; DOCKER_HOST is {images}")
    if not docker("image", "inspect", "--format", "{{.Id}}", SANDBOX_IMAGE, host=images, check=False):
        pytest.fail(f"image {SANDBOX_IMAGE} is missing: run `make images`")
    tag = uuid.uuid4().hex[:8]
    port = free_port()
    socket_dir = tempfile.mkdtemp(prefix="orch-compose-")
    env = {
        **os.environ,
        "DOCKER_HOST": images,
        "COMPOSE_PROJECT_NAME": f"orchtest{tag}",
        "ORCH_DOCKER_SOCKET": images.removeprefix("unix://"),
        "ORCH_API_PORT": str(port),
        "ORCH_SANDBOX_ID": f"c{tag}",
        "ORCH_SOCKET_DIR": socket_dir,
        "ORCH_TOKENS": f"compose:{hash_token(TOKENS['admin'])}:admin",
    }
    compose = [*compose_command(), "-f", str(ROOT / "docker-compose.yml")]
    up = subprocess.run([*compose, "up", "-d"], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stderr
        yield f"http://127.0.0.1:{port}", f"c{tag}"
    finally:
        logs = subprocess.run([*compose, "logs", "--no-color"], env=env, capture_output=True, text=True)
        print(logs.stdout[-4000:])
        subprocess.run([*compose, "down", "-v", "-t", "5"], env=env, capture_output=True, timeout=300)
        remove_sandbox_objects(images, f"c{tag}")
        shutil.rmtree(socket_dir, ignore_errors=True)


async def wait_healthy(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url) as http:
        for _ in range(300):
            try:
                if (await http.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"the composed API at {base_url} did not become healthy in 30 s")


async def test_compose_stack_runs_a_session_to_dockerd_ready(stack: tuple[str, str]) -> None:
    base_url, sandbox = stack
    await wait_healthy(base_url)
    async with Client(base_url, token=TOKENS["admin"]) as client:
        record = await client.create(labels={"via": "compose"})
        events = await client.wait_for(record["id"], {"session.ready", "session.failed"}, timeout=120)
        assert events[-1].type == "session.ready", [e.data for e in events]
        ready = next(e for e in events if e.type == "dockerd.ready")
        assert ready.data["sandbox"] == sandbox
        assert ready.data["data"]["storage_driver"] == "overlay2"
        await client.delete(record["id"])
        events = await client.wait_for(record["id"], {"session.deleted", "session.failed"}, timeout=120)
        assert events[-1].type == "session.deleted"
