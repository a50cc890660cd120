"""Access into a desktop: terminal keystroke echo, file transfer and the port proxy, through the
API by each road of the access route (direct to the worker, relayed through Redis), against the
same thing done directly on the sandbox's daemon (what the route adds)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
from collections.abc import AsyncIterator

import aiodocker
import anyio

from orchestrator.client import Client
from orchestrator.names import desktop_name

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
                started = time.perf_counter()
                check = hashlib.sha256()
                async for chunk in slow.download(record.id, "/root/payload.bin"):
                    check.update(chunk)
                if check.hexdigest() != digest:
                    raise RuntimeError("the download differs")
                return size_mb / (time.perf_counter() - started)

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


SCENARIOS = {"terminal": terminal, "files": files}
DEFAULT_N = {"terminal": 200, "files": 5}
