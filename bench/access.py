"""Access into a desktop: terminal keystroke echo, file transfer and the port proxy, through the
API by each road of the access route (direct to the worker, relayed through Redis), against the
same thing done directly on the sandbox's daemon (what the route adds)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator

import aiodocker
import anyio
import httpx

from orchestrator.client import Client
from orchestrator.names import desktop_name
from workers.runtime.netns import DesktopPorts

from .harness import Result, Side, alternate, services
from .scenarios import delete, ready_client

ROADS = ("direct", "relay")


async def terminal(n: int) -> list[Result]:
    """One keystroke → its echo, in `cat` under a TTY (the kernel's line discipline echoes, so
    nothing but the route is measured): through the API's WebSocket, against a docker exec with
    a TTY attached directly on the sandbox's daemon."""
    return [await _terminal(road, n) for road in ROADS]


async def _terminal(road: str, n: int) -> Result:
    result = Result(f"terminal echo ({road})", "s", Side("project: WebSocket keystroke"), Side("bare: docker attach"))
    with services(ORCH_ACCESS_ROUTE=road) as svc:
        client = await ready_client(svc)
        async with client, aiodocker.Docker() as docker:
            record = await client.create()
            await client.wait_ready(record.id, timeout=120)
            run = await docker.containers.container(desktop_name(record.id)).exec(
                ["desktop-enter", "cat"], stdin=True, tty=True
            )
            async with client.terminal(record.id) as term, run.start(detach=False) as stream:
                screen = aiter(term)
                await term.send(b"exec cat\r")
                seen = b""
                while b"exec cat\r\n" not in seen:
                    seen += await anext(screen)

                async def project() -> float:
                    started = time.perf_counter()
                    await term.send(b"x")
                    while b"x" not in await anext(screen):
                        pass
                    return time.perf_counter() - started

                async def bare() -> float:
                    started = time.perf_counter()
                    await stream.write_in(b"x")
                    while True:
                        message = await stream.read_out()
                        if message is None:
                            raise RuntimeError("the bare terminal ended")
                        if b"x" in message.data:
                            return time.perf_counter() - started

                await alternate(n, project, bare, result)
            await delete(client, record.id)
    p50s = [sorted(side.values)[len(side.values) // 2] for side in (result.project, result.baseline)]
    result.notes["added at p50"] = f"{(p50s[0] - p50s[1]) * 1000:.2f} ms (goal <= 5 ms)"

    return result


async def _chunks(path: str) -> AsyncIterator[bytes]:
    with open(path, "rb") as source:  # noqa: ASYNC230 (a benchmark: the disk is not the subject)
        while chunk := source.read(1 << 20):
            yield chunk


async def _docker_cp(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec("docker", "cp", *args, stdout=asyncio.subprocess.DEVNULL)
    if await proc.wait() != 0:
        raise RuntimeError(f"docker cp {args} failed")


async def files(n: int, size_mb: int = 100) -> list[Result]:
    """A ``size_mb`` MB file up and down through the API (PUT / GET .../files), in MB/s,
    against `docker cp` into and out of the same desktop on the sandbox's daemon."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "payload.bin")
        payload = os.urandom(size_mb << 20)
        await anyio.Path(source).write_bytes(payload)
        digest = hashlib.sha256(payload).hexdigest()
        del payload
        return [r for road in ROADS for r in await _files(road, n, size_mb, tmp, source, digest)]


async def _files(road: str, n: int, size_mb: int, tmp: str, source: str, digest: str) -> list[Result]:
    up = Result(f"file upload ({road})", "MB/s", Side("project: PUT /files"), Side("bare: docker cp in"))
    down = Result(f"file download ({road})", "MB/s", Side("project: GET /files"), Side("bare: docker cp out"))
    with services(ORCH_ACCESS_ROUTE=road) as svc:
        client = await ready_client(svc)
        async with client, Client(svc.url, token=svc.token, timeout=300) as slow:
            record = await client.create()
            await client.wait_ready(record.id, timeout=120)
            desktop = desktop_name(record.id)

            async def put_project() -> float:
                started = time.perf_counter()
                await slow.upload(record.id, "/root/payload.bin", _chunks(source))
                return size_mb / (time.perf_counter() - started)

            async def put_bare() -> float:
                started = time.perf_counter()
                await _docker_cp(source, f"{desktop}:/tmp/payload.bin")
                return size_mb / (time.perf_counter() - started)

            async def get_project() -> float:
                # Into a file, as `docker cp` out writes one; checked after the clock stops.
                back = os.path.join(tmp, "back-api.bin")
                started = time.perf_counter()
                with open(back, "wb") as out:  # noqa: ASYNC230 (as docker cp's own write)
                    async for chunk in slow.download(record.id, "/root/payload.bin"):
                        out.write(chunk)
                elapsed = time.perf_counter() - started
                if hashlib.sha256(await anyio.Path(back).read_bytes()).hexdigest() != digest:
                    raise RuntimeError("the download differs")
                return size_mb / elapsed

            async def get_bare() -> float:
                started = time.perf_counter()
                await _docker_cp(f"{desktop}:/tmp/payload.bin", os.path.join(tmp, "back.bin"))
                return size_mb / (time.perf_counter() - started)

            await alternate(n, put_project, put_bare, up)
            await alternate(n, get_project, get_bare, down)
            await delete(client, record.id)
    for result in (up, down):
        result.notes["goal"] = "project >= 0.8x docker cp (ratio is project/baseline: higher is better)"
    return [up, down]


# The upstream: a small asyncio HTTP/1.1 server on the desktop's loopback (python3 is in the
# desktop image), with keep-alive as HTTP/1.1 servers have it (http.server's listen backlog of
# 5 would drop connections under concurrency, and it closes after every answer).
UPSTREAM = """
import asyncio
async def serve(reader, writer):
    while True:
        close = False
        line = await reader.readline()
        if not line:
            break
        while line not in (b"\\r\\n", b""):
            close = close or line.lower().startswith(b"connection: close")
            line = await reader.readline()
        writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 6\\r\\n\\r\\nhello\\n")
        await writer.drain()
        if close:
            break
    writer.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 8123, backlog=1024)
    await server.serve_forever()
asyncio.run(main())
"""


class KeepAliveGet:
    """The same minimal HTTP/1.1 client on both sides of the comparison: GETs one after another
    on one kept connection (a Content-Length body), so the client costs each side the same."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
        self.reader, self.writer, self.request = reader, writer, request

    async def get(self) -> float:
        started = time.perf_counter()
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"unexpected answer: {head[:200]!r}")
        length = next(
            int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")) if k.lower() == b"content-length"
        )
        await self.reader.readexactly(length)
        return time.perf_counter() - started

    def close(self) -> None:
        self.writer.close()


async def ports(n: int, concurrency: int = 8) -> list[Result]:
    """GET / of a keep-alive server on the desktop's 127.0.0.1: through the API's port proxy by
    each road, against the same GET from the sandbox on a connection made into the desktop's
    network namespace, with the same client (kept connections on both sides: the proxy keeps
    its own to the desktop, orchestrator/port_pool.py). Latency one at a time, then requests
    per second with ``concurrency`` connections at once."""
    return [r for road in ROADS for r in await _ports(road, n, concurrency)]


async def _ports(road: str, n: int, concurrency: int) -> list[Result]:
    latency = Result(f"port GET ({road})", "s", Side("project: API /ports/8123/"), Side("bare: from the sandbox"))
    rate = Result(f"port req/s ({road}, {concurrency})", "req/s", Side("project: API"), Side("bare: sandbox"))
    with services(ORCH_ACCESS_ROUTE=road) as svc:
        client = await ready_client(svc)
        async with client, aiodocker.Docker() as docker, httpx.AsyncClient(timeout=30) as http:
            record = await client.create()
            await client.wait_ready(record.id, timeout=120)
            desktop = docker.containers.container(desktop_name(record.id))
            serve = await desktop.exec(["desktop-enter", "python3", "-c", UPSTREAM])
            await serve.start(detach=True)
            path = f"/v1/sessions/{record.id}/ports/8123/"
            headers = {"Authorization": f"Bearer {svc.token}"}
            for _ in range(100):  # until it listens
                if (await http.get(svc.url + path, headers=headers)).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            api_host, api_port = svc.url.removeprefix("http://").rsplit(":", 1)
            through_api = f"GET {path} HTTP/1.1\r\nHost: {api_host}\r\nAuthorization: Bearer {svc.token}\r\n\r\n"
            direct = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8123\r\n\r\n"
            ports = DesktopPorts(docker)

            async def connect_project() -> KeepAliveGet:
                return KeepAliveGet(*await asyncio.open_connection(api_host, int(api_port)), through_api.encode())

            async def connect_bare() -> KeepAliveGet:
                return KeepAliveGet(*await ports.open(record.id, 8123, timeout_s=10), direct)

            project_one, bare_one = await connect_project(), await connect_bare()
            project_many = [await connect_project() for _ in range(concurrency)]
            bare_many = [await connect_bare() for _ in range(concurrency)]

            async def ten(conn: KeepAliveGet) -> None:
                for _ in range(10):
                    await conn.get()

            async def rate_of(conns: list[KeepAliveGet]) -> float:
                started = time.perf_counter()
                await asyncio.gather(*(ten(c) for c in conns))
                return len(conns) * 10 / (time.perf_counter() - started)

            async def project_rate() -> float:
                return await rate_of(project_many)

            async def bare_rate() -> float:
                return await rate_of(bare_many)

            await alternate(n, project_one.get, bare_one.get, latency)
            await alternate(max(3, n // 20), project_rate, bare_rate, rate)
            for conn in [project_one, bare_one, *project_many, *bare_many]:
                conn.close()
            await delete(client, record.id)
    p50s = [statistics.median(side.values) for side in (latency.project, latency.baseline)]
    latency.notes["added at p50"] = f"{(p50s[0] - p50s[1]) * 1000:.2f} ms (goal <= 3 ms)"
    rate.notes["goal"] = "project >= 0.8x (ratio is project/baseline: higher is better)"
    return [latency, rate]


SCENARIOS = {"terminal": terminal, "files": files, "ports": ports}
DEFAULT_N = {"terminal": 200, "files": 5, "ports": 200}
