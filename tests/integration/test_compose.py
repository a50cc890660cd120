"""docker-compose.yml brings up a working stack: Redis, the API and two sandboxes (each its own
dockerd and worker, loading the desktop image from build/images), to a real dockerd.ready."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from orchestrator.auth import hash_token
from orchestrator.client import Client
from tests.conftest import free_port
from workers.privilege import missing_capabilities, read_bounding_set

from .conftest import SANDBOX_IMAGE, TOKENS, docker

pytestmark = pytest.mark.docker
ROOT = Path(__file__).resolve().parents[2]
IMAGE_DIR = ROOT / "build" / "images"


def compose_command() -> list[str]:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` nor `docker-compose` is installed (scripts/env.sh installs it)")


@contextlib.contextmanager
def compose_stack(host: str, scale: int) -> Iterator[tuple[str, str]]:
    """Bring docker-compose.yml up on ``host`` (a project of its own); yields (API URL, project)."""
    if not docker("image", "inspect", "--format", "{{.Id}}", SANDBOX_IMAGE, host=host, check=False):
        pytest.fail(f"image {SANDBOX_IMAGE} is missing: run `make images`")
    if not (IMAGE_DIR / "desktop.tar").is_file():
        pytest.fail(f"{IMAGE_DIR}/desktop.tar is missing: run `make images`")
    project = f"orchtest{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {
        **os.environ,
        "DOCKER_HOST": host,
        "COMPOSE_PROJECT_NAME": project,
        "COMPOSE_FILE": ":".join(str(ROOT / f) for f in compose_files()),
        "ORCH_API_PORT": str(port),
        "ORCH_IMAGE_DIR": str(IMAGE_DIR),
        "ORCH_TOKENS": f"compose:{hash_token(TOKENS['admin'])}:admin",
    }
    compose = compose_command()
    up = subprocess.run(
        [*compose, "up", "-d", "--scale", f"sandbox={scale}"], env=env, capture_output=True, text=True, timeout=300
    )
    try:
        assert up.returncode == 0, up.stderr
        yield f"http://127.0.0.1:{port}", project
    finally:
        logs = subprocess.run([*compose, "logs", "--no-color"], env=env, capture_output=True, text=True)
        print(logs.stdout[-4000:])
        subprocess.run([*compose, "down", "-v", "-t", "10"], env=env, capture_output=True, timeout=300)


def compose_files() -> list[str]:
    files = ["docker-compose.yml"]
    if missing_capabilities(*read_bounding_set()):  # this machine refuses --privileged
        files.append("docker-compose.caps.yml")
    return files


@pytest.fixture
def stack(images: str) -> Iterator[str]:
    with compose_stack(images, scale=2) as (url, _):
        yield url


async def wait_healthy(url: str) -> None:
    async with httpx.AsyncClient(base_url=url) as http, asyncio.timeout(60):
        while True:
            try:
                if (await http.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)


async def test_compose_stack_scales_sandboxes_and_runs_a_session(stack: str) -> None:
    await wait_healthy(stack)
    async with Client(stack, token=TOKENS["admin"]) as client:
        async with asyncio.timeout(180):  # each sandbox starts its dockerd and loads the desktop image
            while len(sandboxes := await client.sandboxes()) < 2:
                await asyncio.sleep(0.5)
        assert len({s["id"] for s in sandboxes}) == 2
        assert all(s["depth"] == 1 and s["address_pool"] == "10.213.0.0/16" for s in sandboxes)
        record = await client.create(labels={"via": "compose"})
        assert record["sandbox"] in {s["id"] for s in sandboxes}
        events = await client.wait_for(record["id"], {"session.ready", "session.failed"}, timeout=180)
        assert events[-1].type == "session.ready", [e.data for e in events]
        ready = next(e for e in events if e.type == "dockerd.ready").data["data"]
        assert ready["storage_driver"] == "overlay2" and ready["backing_filesystem"] == "extfs"
        assert ready["depth"] == 2 and ready["address_pool"] == "10.214.0.0/16"
        await client.delete(record["id"])
        events = await client.wait_for(
            record["id"], {"session.deleted", "session.failed"}, timeout=120, after=events[-1].id
        )
        assert events[-1].type == "session.deleted"
