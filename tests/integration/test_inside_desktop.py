"""What a session's user does inside a desktop under the default profile (`userns`, issue 15):
`docker build` with either builder, `docker-compose up` (Debian's 1.29, in the desktop image)
with service-name DNS and a published port on the desktop's localhost, DNS and outbound
connections out of the desktop's namespaces, and inner containers that outlive a stop and a
resume. Every command runs where the user's shell runs: `docker exec DESKTOP desktop-enter`
(inside the user namespace). One session serves the whole file; its images come the way a
user's do, here through `preload_images` (there is no registry)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import pytest
import pytest_asyncio

from orchestrator.client import Client
from orchestrator.names import desktop_name
from workers.worker import SandboxWorker

from .conftest import (
    TEST_IMAGE,
    TOKENS,
    adocker,
    make_settings,
    remove_sandbox_objects,
    require_images,
    running_api,
    running_worker,
)

# The module's session, worker and API live in one event loop, shared by its tests.
pytestmark = pytest.mark.asyncio(loop_scope="module")

READY = 90.0
# GET a URL from the desktop's localhost (the desktop image has python3, for docker-compose, and
# no curl): retried until it answers or the deadline passes, then fails saying what it saw.
FETCH = """
import sys, time, urllib.request
url, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while True:
    try:
        print(urllib.request.urlopen(url, timeout=2).read().decode().strip())
        break
    except OSError as e:
        if time.monotonic() > deadline:
            sys.exit(f"{url}: no answer within {sys.argv[2]} s: {e}")
        time.sleep(0.1)
"""
# Writes $2 to $1/Dockerfile and $3 to $1/$4 ... (pairs): files as arguments, no quoting games.
WRITE = 'dir=$1; shift; mkdir -p "$dir"; while [ "$#" -gt 1 ]; do printf "%s\\n" "$2" > "$dir/$1"; shift 2; done'


@dataclass
class Desktop:
    host: str
    sid: str
    client: Client
    worker: SandboxWorker

    @property
    def name(self) -> str:
        return desktop_name(self.sid)

    async def run(self, *args: str, timeout: float = 120) -> str:
        """``args`` as the desktop's user (in its namespaces); stdout."""
        return await adocker("exec", self.name, "desktop-enter", *args, host=self.host, timeout=timeout)

    async def write(self, directory: str, files: dict[str, str]) -> None:
        await self.run("sh", "-c", WRITE, "sh", directory, *(part for item in files.items() for part in item))

    async def fetch(self, url: str, timeout: float = 20) -> str:
        return await self.run("python3", "-c", FETCH, url, str(timeout), timeout=timeout + 10)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def desktop(docker_host: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Desktop]:
    host = require_images(docker_host)
    settings = replace(make_settings(redis_url, tmp_path_factory), docker_host=host)
    assert settings.privilege == "auto"  # the default, which picks userns on this machine
    try:
        async with (
            running_worker(settings) as worker,
            running_api(settings) as url,
            Client(url, token=TOKENS["admin"]) as client,
        ):
            record = await client.create(preload_images=[TEST_IMAGE])
            events = await client.wait_for(record.id, {"session.ready", "session.failed"}, timeout=READY)
            assert events[-1].type == "session.ready", [e.data for e in events]
            (started,) = [e.data["data"] for e in events if e.type == "desktop.started"]
            assert started["privilege"] == "userns", started
            yield Desktop(host, record.id, client, worker)
    finally:
        remove_sandbox_objects(host, settings.sandbox_id)


def outside_uid(uid_map: str) -> int:
    """The sandbox's uid of uid 0, from a one-line /proc/self/uid_map."""
    inside, outside, _ = (int(n) for n in uid_map.split())
    assert inside == 0, uid_map
    return outside


DOCKERFILE = f"""FROM {TEST_IMAGE}
RUN cat /proc/self/uid_map > /built-uid-map && echo built-by-run > /built
COPY greeting /greeting
CMD ["sh", "-c", "cat /built /greeting /built-uid-map"]"""


@pytest.mark.parametrize("buildkit", ["0", "1"], ids=["legacy-builder", "buildkit"])
async def test_docker_build_runs_its_steps_in_the_namespace_on_overlay2(desktop: Desktop, buildkit: str) -> None:
    base = outside_uid(await desktop.run("cat", "/proc/self/uid_map"))
    assert base >= 100_000
    context, tag = f"/tmp/build-{buildkit}", f"built:{buildkit}"
    greeting = f"greeting-{uuid.uuid4().hex}"  # from this run's context, never from a cache
    await desktop.write(context, {"Dockerfile": DOCKERFILE, "greeting": greeting})
    await desktop.run("env", f"DOCKER_BUILDKIT={buildkit}", "docker", "build", "-q", "-t", tag, context)

    built, copied, uid_map = (await desktop.run("docker", "run", "--rm", tag)).splitlines()
    assert (built, copied) == ("built-by-run", greeting)
    # The RUN step ran in the desktop's user namespace: its root was the desktop's, not the machine's.
    assert outside_uid(uid_map) == base
    # Its layers are overlay2 layers, like every image of the desktop's dockerd.
    assert await desktop.run("docker", "image", "inspect", "--format", "{{.GraphDriver.Name}}", tag) == "overlay2"


COMPOSE = f"""services:
  web:
    image: {TEST_IMAGE}
    init: true
    command: ["sh", "-c", "mkdir -p /www && echo hello-from-web > /www/index.html && exec httpd -f -p 80 -h /www"]
  front:
    image: {TEST_IMAGE}
    init: true
    depends_on: [web]
    ports: ["8081:80"]
    # Serves what it fetched from web by its service name (retried: web takes a moment).
    command: ["sh", "-c", "mkdir -p /www && until wget -qO /www/index.html http://web/; do sleep 0.1; done && exec httpd -f -p 80 -h /www"]"""  # noqa: E501


async def test_compose_up_with_service_names_and_a_port_on_the_desktops_localhost(desktop: Desktop) -> None:
    await desktop.write("/tmp/app", {"compose.yml": COMPOSE})
    await desktop.run("docker-compose", "-f", "/tmp/app/compose.yml", "-p", "app", "up", "-d")
    # front answers on the desktop's localhost with what it got from http://web/.
    assert await desktop.fetch("http://127.0.0.1:8081/") == "hello-from-web"
    services = await desktop.run("docker-compose", "-f", "/tmp/app/compose.yml", "-p", "app", "ps", "--services")
    assert sorted(services.split()) == ["front", "web"]
    await desktop.run("docker-compose", "-f", "/tmp/app/compose.yml", "-p", "app", "down")
    assert await desktop.run("docker", "ps", "-aq", "--filter", "label=com.docker.compose.project=app") == ""


async def test_dns_and_outbound_connections_leave_the_desktops_namespaces(desktop: Desktop) -> None:
    """Out of the namespaces (veth, NAT) and of the desktop: to a server on the machine, at the
    desktops' gateway (nothing else is a permitted target here; the harness runs no firewall,
    which would drop it: tests/integration/test_firewall.py). Names through Docker's resolver
    of the desktops' network (the DNAT to the desktop's 127.0.0.11)."""
    host = desktop.host
    fields = await adocker(
        "inspect",
        "--format",
        "{{range $name, $net := .NetworkSettings.Networks}}{{$name}} {{$net.IPAddress}} {{$net.Gateway}}{{end}}",
        desktop.name,
        host=host,
    )
    network, desktop_ip, gateway = fields.split()
    peers: list[str] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peername")[0])
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 19\r\n\r\nhello-from-outside\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, gateway, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        # The desktop's user: its own name resolves (the machine's Docker DNS), the server answers.
        assert (await desktop.run("getent", "hosts", desktop.name)).split() == [desktop_ip, desktop.name]
        assert await desktop.fetch(f"http://{gateway}:{port}/") == "hello-from-outside"
        # A container of the desktop's dockerd on a network of its own (as compose makes them):
        # its dockerd's resolver forwards to the desktop's, and its packets leave two NATs.
        await desktop.run("docker", "network", "create", "outbound")
        try:
            inner = ["docker", "run", "--rm", "--network", "outbound", TEST_IMAGE]
            # A dotted name (<container>.<network>, which Docker's resolver answers too): an
            # embedded resolver never forwards a single-label name when ndots is set, as the
            # desktop's resolv.conf has it (Docker's rule, at any depth and under any profile).
            resolved = await desktop.run(*inner, "busybox", "nslookup", "-type=a", f"{desktop.name}.{network}")
            assert f"Address: {desktop_ip}" in resolved, resolved
            assert await desktop.run(*inner, "wget", "-qO-", f"http://{gateway}:{port}/") == "hello-from-outside"
        finally:
            await desktop.run("docker", "network", "rm", "outbound")
    finally:
        server.close()
        await server.wait_closed()
    # Both arrived from the desktop's own address: NATed out of its namespaces.
    assert peers == [desktop_ip, desktop_ip]


KEEPER = (
    "mkdir -p /www && { [ -f /www/index.html ] || echo {token} > /www/index.html; }"
    " && echo started >> /data/starts && exec httpd -f -p 80 -h /www"
)


async def keeper(desktop: Desktop, name: str, restart: str, port: int) -> tuple[str, str]:
    """A web server of the desktop's dockerd that says what it wrote in its writable layer at
    its first start, and counts its starts on a volume; (its id, that token)."""
    token = f"{name}-{uuid.uuid4().hex}"
    container = await desktop.run(
        "docker", "run", "-d", "--name", name, "--init", "--restart", restart, "-p", f"{port}:80",
        "-v", f"{name}-data:/data", TEST_IMAGE, "sh", "-c", KEEPER.replace("{token}", token),
    )  # fmt: skip
    assert await desktop.fetch(f"http://127.0.0.1:{port}/") == token
    return container, token


async def stop_and_resume(desktop: Desktop) -> None:
    client, sid = desktop.client, desktop.sid
    generation = (await client.get(sid)).generation
    before = [e async for e in client.events(sid, follow=False)]
    await client.stop(sid)
    events = await client.wait_for(
        sid, {"session.stopped", "session.failed"}, timeout=READY, after=before[-1].id if before else None
    )
    assert events[-1].type == "session.stopped", [e.data for e in events]
    await client.start(sid)
    events = await client.wait_for(sid, {"session.ready", "session.failed"}, timeout=READY, after=events[-1].id)
    assert events[-1].type == "session.ready", [e.data for e in events]
    (started,) = [e.data for e in events if e.type == "desktop.started"]
    assert (started["generation"], started["data"]["privilege"]) == (generation + 1, "userns"), started


async def test_inner_containers_images_and_volumes_outlive_stop_and_resume(desktop: Desktop) -> None:
    kept, token = await keeper(desktop, "keeper", "always", 8090)
    parked = await desktop.run("docker", "create", "--name", "parked", TEST_IMAGE, "true")
    await stop_and_resume(desktop)

    # The same containers (ids); the running one started again by the desktop's dockerd, with
    # its writable layer (the token of its first start) and its volume (two starts counted),
    # its published port answering on the desktop's localhost again.
    listed = await desktop.run("docker", "ps", "-a", "--no-trunc", "--format", "{{.ID}} {{.Names}} {{.State}}")
    states = dict(line.split(" ", 1) for line in listed.splitlines())
    assert (states.get(kept), states.get(parked)) == ("keeper running", "parked created"), listed
    assert await desktop.fetch("http://127.0.0.1:8090/") == token
    assert (await desktop.run("docker", "exec", "keeper", "cat", "/data/starts")).split() == ["started", "started"]
    assert TEST_IMAGE in (await desktop.run("docker", "images", "--format", "{{.Repository}}:{{.Tag}}")).split()


async def test_unless_stopped_containers_come_back_after_resume(desktop: Desktop) -> None:
    kept, token = await keeper(desktop, "unless", "unless-stopped", 8091)
    await stop_and_resume(desktop)
    state = await desktop.run("docker", "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", kept)
    assert state == "running 0", state
    assert await desktop.fetch("http://127.0.0.1:8091/") == token


async def test_the_desktops_root_has_a_home_of_its_own(desktop: Desktop) -> None:
    """/root is handed to the namespaces' root at the first start: its shells and the docker
    CLI (~/.docker) can write there, and docker warns about nothing."""
    owner = await desktop.run("sh", "-c", "touch /root/.written && mkdir -p /root/.docker && stat -c %u /root")
    assert owner.strip() == "0", owner  # the namespaces' root
    both = await adocker("exec", desktop.name, "desktop-enter", "docker", "info", host=desktop.host, stderr=True)
    assert "config.json" not in both and "WARNING: Error loading" not in both, both
