"""Networking inside desktops: service-name DNS (what compose relies on), `-p` publishing on the
desktop's localhost, and no way from one session's desktop to another's containers."""

from __future__ import annotations

import asyncio

from orchestrator.client import Client
from orchestrator.config import Settings
from workers.worker import SandboxWorker

from .conftest import TEST_IMAGE, adocker

SERVE = "busybox mkdir -p /www && echo hello-from-{name} > /www/index.html && exec busybox httpd -f -p 80 -h /www"


async def ready_desktop(client: Client, worker: SandboxWorker) -> str:
    record = await client.create()
    await client.wait_ready(record.id, timeout=90)
    await worker.runtime.images.copy_into(record.id, [TEST_IMAGE])
    return f"desktop-{record.id}"


async def in_desktop(host: str, desktop: str, *args: str, check: bool = True) -> str:
    return await adocker("exec", desktop, *args, host=host, check=check)


async def serve(host: str, desktop: str, name: str, *options: str) -> None:
    """A tiny web server in ``desktop``'s own dockerd answering hello-from-<name>."""
    await in_desktop(host, desktop, "docker", "run", "-d", *options, TEST_IMAGE, "sh", "-c", SERVE.format(name=name))


async def fetch_until(host: str, desktop: str, *wget: str, timeout: float = 20) -> str:
    """Run wget in a throwaway container in ``desktop`` until it answers (servers take a moment)."""
    async with asyncio.timeout(timeout):
        while True:
            out = await in_desktop(host, desktop, "docker", "run", "--rm", *wget, check=False)
            if out.startswith("hello-from-"):
                return out
            await asyncio.sleep(0.2)


async def test_service_names_resolve_and_published_ports_answer_on_localhost(
    client: Client, worker: SandboxWorker, docker_settings: Settings
) -> None:
    host = docker_settings.docker_host
    assert host
    desktop = await ready_desktop(client, worker)
    await in_desktop(host, desktop, "docker", "network", "create", "app")
    await serve(host, desktop, "web", "--name", "web", "--network", "app")
    # Like a compose stack: another container on the network reaches it by its service name.
    out = await fetch_until(host, desktop, "--network", "app", TEST_IMAGE, "wget", "-qO-", "http://web/")
    assert out == "hello-from-web"
    # The inner networks come from the desktop's own pool (depth 2).
    subnet = await in_desktop(
        host, desktop, "docker", "network", "inspect", "app", "--format", "{{(index .IPAM.Config 0).Subnet}}"
    )
    assert subnet.startswith("10.214.")

    await serve(host, desktop, "published", "-p", "8000:80")
    out = await fetch_until(host, desktop, "--network", "host", TEST_IMAGE, "wget", "-qO-", "http://localhost:8000/")
    assert out == "hello-from-published"


async def test_one_sessions_desktop_cannot_reach_anothers(
    client: Client, worker: SandboxWorker, docker_settings: Settings
) -> None:
    host = docker_settings.docker_host
    assert host
    a, b = await ready_desktop(client, worker), await ready_desktop(client, worker)
    await serve(host, a, "a", "-p", "8000:80")
    await fetch_until(host, a, "--network", "host", TEST_IMAGE, "wget", "-qO-", "http://localhost:8000/")
    a_ip = await adocker(
        "inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", a, host=host
    )
    assert a_ip

    # busybox's `wget -T` crashes in this static build, so the wait is bounded from outside; the
    # same command is first shown to work inside a, so a failure from b means isolation.
    async def fetch(desktop: str, url: str) -> str:
        wget = ["docker", "run", "--rm", "--network", "host", TEST_IMAGE, "wget", "-qO-", url]
        try:
            return await adocker("exec", desktop, *wget, host=host, check=False, timeout=10)
        except TimeoutError:
            return "(no answer within 10 s)"

    assert await fetch(a, "http://localhost:8000/") == "hello-from-a"
    # From b: neither a's desktop address nor a's inner container network is reachable.
    for target in (f"http://{a_ip}:8000/", "http://10.214.0.2/"):
        assert "hello-from-a" not in await fetch(b, target), target
