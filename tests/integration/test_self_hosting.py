"""The platform runs inside one of its own desktops, from the same images, differing only in
its .env: compose on the machine (sandbox at depth 1) → a session's desktop (depth 2) → the
same compose stack inside it (its Redis, API, sandbox at depth 3) → an inner session whose
desktop's dockerd (depth 4) becomes ready. The inner API is used from outside, through the
outer desktop."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from orchestrator.auth import hash_token
from orchestrator.client import Client

from .conftest import DESKTOP_IMAGE, SANDBOX_IMAGE, TOKENS, adocker, pipe_in
from .test_compose import ROOT, acompose_stack, stack_files, wait_healthy, wait_sandboxes

pytestmark = pytest.mark.slow  # a soak: `-m "not slow"` leaves it out


@pytest.mark.timeout(1200)
async def test_the_stack_runs_inside_its_own_desktop(images: str) -> None:
    host = images
    began = time.monotonic()

    def mark(step: str) -> None:  # the time each level took, for the record (pytest -s)
        print(f"self-hosting: {step} at +{time.monotonic() - began:.1f} s")

    async with acompose_stack(host, scale=1) as stack:
        mark("outer stack up (registry, push, compose up)")
        await wait_healthy(stack.url)
        async with Client(stack.url, token=TOKENS["admin"]) as outer:
            await wait_sandboxes(outer, 1)
            mark("outer sandbox (depth 1) reporting, desktop image pulled")
            # The platform's images, into the outer desktop the way any image gets there: the
            # sandbox pulls them from its level's registry and copies them in before session.ready.
            record = await outer.create(labels={"role": "self-hosting"}, preload_images=[DESKTOP_IMAGE, SANDBOX_IMAGE])
            events = await outer.wait_for(record.id, {"session.ready", "session.failed"}, timeout=400)
            assert events[-1].type == "session.ready", [e.data for e in events]
            loaded = next(e.data["data"] for e in events if e.type == "images.loaded")
            assert set(loaded["images"]) == {DESKTOP_IMAGE, SANDBOX_IMAGE} and loaded["bytes"] > 100_000_000
            mark(f"outer session (depth 2) ready; preload {loaded['bytes'] / 1e6:.0f} MB in {loaded['seconds']} s")
        desktop = f"desktop-{record.id}"
        chain = ["exec", "-i", await stack.container("sandbox"), "docker", "exec", "-i", desktop]

        # The same compose files and script; the only difference is the .env.
        for path in stack_files():
            target = f"/stack/{path.relative_to(ROOT)}"
            await pipe_in(host, chain, f"mkdir -p {target.rsplit('/', 1)[0]} && cat > {target}", f"cat {path}")
        dotenv = "\n".join(
            [
                "ORCH_SANDBOX_DEPTH=3",
                "ORCH_API_PORT=8080",
                f"ORCH_TOKENS=inner:{hash_token(TOKENS['admin'])}:admin",
                # The images this test preloaded, whatever their tags.
                f"ORCH_DESKTOP_IMAGE={DESKTOP_IMAGE}",
                f"ORCH_SANDBOX_IMAGE={SANDBOX_IMAGE}",
            ]
        )
        await pipe_in(host, chain, "cat > /stack/.env", f"printf '%s\\n' '{dotenv}'")
        inner_up = await adocker(*chain, "bash", "/stack/scripts/stack.sh", "up", host=host, stderr=True, timeout=600)
        # Inside the desktop: Debian 12's compose v1 (the host test covers v2), this level's own
        # registry, and docker-compose.yml's least-privilege sandbox (without `cgroup: private`,
        # which v1 cannot say: the desktop's cgroup namespace is its own already).
        assert "docker-compose version 1." in await adocker(*chain, "docker-compose", "version", host=host)
        assert "UNSAFE" not in inner_up, inner_up
        assert f"pushed {SANDBOX_IMAGE} to this level's registry" in inner_up, inner_up
        mark("inner stack up inside the desktop (registry, push, compose up)")
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
            while not (listed := await adocker(*cli, "sandboxes", "ls", "--json", host=host, check=False)).startswith(
                "[\n  {"
            ):
                await asyncio.sleep(1)
        assert json.loads(listed)
        mark("inner sandbox (depth 3) reporting, desktop image pulled from the inner registry")
        # Least privilege there too, confined by the desktop's user namespace (sandbox-init says so).
        inner_box = await adocker(
            *chain, "docker", "ps", "-q", "--filter", "label=com.docker.compose.service=sandbox", host=host
        )
        inner_log = await adocker(*chain, "docker", "logs", inner_box, host=host, stderr=True)
        assert "privilege: in a user namespace of its own" in inner_log, inner_log[-3000:]
        config = json.loads(
            await adocker(*chain, "docker", "inspect", "--format", "{{json .HostConfig}}", inner_box, host=host)
        )
        assert config["Privileged"] is False and config["CapDrop"] == ["ALL"], config
        created = await adocker(
            *cli, "sessions", "create", "--label", "level=inner", "--wait", "--timeout", "400", host=host
        )
        assert "dockerd.ready" in created and "depth 4, pool 10.216.0.0/16" in created, created
        inner_id = created.split()[1]
        lines = (await adocker(*cli, "events", "--session", inner_id, "--json", host=host)).splitlines()
        inner_events = [json.loads(line) for line in lines]
        ready = next(e for e in inner_events if e["type"] == "dockerd.ready")
        assert ready["data"]["depth"] == 4 and ready["data"]["storage_driver"] == "overlay2"
        assert inner_events[-1]["type"] == "session.ready"
        sandboxes = json.loads(await adocker(*cli, "sandboxes", "ls", "--json", host=host))
        assert [s["depth"] for s in sandboxes] == [3]
        mark(f"inner session's dockerd (depth 4) ready, {ready['data']['duration_ms']} ms after its desktop started")
        # Into the inner session, through the inner API (its access route at depth 3): a command,
        # and a file up and back with the same CLI.
        ran = await adocker(*cli, "sessions", "exec", inner_id, "--", "sh", "-c", "echo inner-$((2*21))", host=host)
        assert ran.strip() == "inner-42", ran
        script = (
            f"orchestrator --api http://127.0.0.1:8080 --token {TOKENS['admin']} sessions cp"
            f" /etc/os-release {inner_id}:/root/ && orchestrator --api http://127.0.0.1:8080"
            f" --token {TOKENS['admin']} sessions cp {inner_id}:/root/os-release /tmp/back && cmp /etc/os-release"
            " /tmp/back && echo same"
        )
        copied = await adocker(*cli[: cli.index("orchestrator")], "sh", "-c", script, host=host)
        assert copied.strip().endswith("same"), copied
        mark("exec and files in the inner session through the inner API")
