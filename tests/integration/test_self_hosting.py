"""The platform runs inside one of its own desktops, from the same images, differing only in
its .env: compose on the machine (sandbox at depth 1) → a session's desktop (depth 2) → the
same compose stack inside it (its Redis, API, sandbox at depth 3) → an inner session whose
desktop's dockerd (depth 4) becomes ready. The inner API is used from outside, through the
outer desktop."""

from __future__ import annotations

import asyncio
import json

import pytest

from orchestrator.auth import hash_token
from orchestrator.client import Client

from .conftest import SANDBOX_IMAGE, TOKENS, docker, pipe_in
from .test_compose import IMAGE_DIR, ROOT, compose_files, compose_stack, wait_healthy

pytestmark = pytest.mark.docker


@pytest.mark.timeout(1200)
async def test_the_stack_runs_inside_its_own_desktop(images: str) -> None:
    host = images
    with compose_stack(host, scale=1) as (url, project):
        await wait_healthy(url)
        async with Client(url, token=TOKENS["admin"]) as outer:
            async with asyncio.timeout(180):  # the sandbox starts its dockerd and loads the desktop image
                while not await outer.sandboxes():
                    await asyncio.sleep(0.5)
            record = await outer.create(labels={"role": "self-hosting"})
            await outer.wait_ready(record["id"], timeout=240)
        sandbox = docker(
            "ps",
            "-q",
            "--filter",
            f"label=com.docker.compose.project={project}",
            "--filter",
            "label=com.docker.compose.service=sandbox",
            host=host,
        )
        desktop = f"desktop-{record['id']}"
        chain = ["exec", "-i", sandbox, "docker", "exec", "-i", desktop]

        # The same images and compose files, into the outer desktop (no registry needed).
        pipe_in(host, chain, "docker load -q", f"docker save {SANDBOX_IMAGE}")
        pipe_in(
            host, chain, "mkdir -p /stack/images && cat > /stack/images/desktop.tar", f"cat {IMAGE_DIR / 'desktop.tar'}"
        )
        for name in compose_files():
            pipe_in(host, chain, f"cat > /stack/{name}", f"cat {ROOT / name}")
        # The only difference: the .env.
        dotenv = "\n".join(
            [
                "ORCH_SANDBOX_DEPTH=3",
                "ORCH_API_PORT=8080",
                "ORCH_IMAGE_DIR=/stack/images",
                f"ORCH_TOKENS=inner:{hash_token(TOKENS['admin'])}:admin",
                f"COMPOSE_FILE={':'.join(compose_files())}",
            ]
        )
        pipe_in(host, chain, "cat > /stack/.env", f"printf '%s\\n' '{dotenv}'")
        docker(*chain, "sh", "-c", "cd /stack && docker-compose -p inner up -d", host=host)

        # From outside, through the outer desktop: the inner API, with the same CLI.
        cli = [
            *chain,
            "docker",
            "run",
            "--rm",
            "--network",
            "host",
            SANDBOX_IMAGE,
            "orchestrator",
            "--api",
            "http://127.0.0.1:8080",
            "--token",
            TOKENS["admin"],
        ]
        async with asyncio.timeout(300):  # the inner API starts, the inner sandbox loads its image
            while not (listed := docker(*cli, "sandboxes", "ls", "--json", host=host, check=False)).startswith(
                "[\n  {"
            ):
                await asyncio.sleep(1)
        assert json.loads(listed)
        created = docker(*cli, "sessions", "create", "--label", "level=inner", "--wait", "--timeout", "400", host=host)
        assert "dockerd.ready" in created and "depth 4, pool 10.216.0.0/16" in created, created
        inner_id = created.split()[1]
        lines = docker(*cli, "events", "--session", inner_id, "--json", host=host).splitlines()
        events = [json.loads(line) for line in lines]
        ready = next(e for e in events if e["type"] == "dockerd.ready")
        assert ready["data"]["depth"] == 4 and ready["data"]["storage_driver"] == "overlay2"
        assert events[-1]["type"] == "session.ready"
        sandboxes = json.loads(docker(*cli, "sandboxes", "ls", "--json", host=host))
        assert [s["depth"] for s in sandboxes] == [3]
