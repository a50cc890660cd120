"""Files and ports of a desktop at the worker's level (workers/runtime/files.py, netns.py),
without the API: what the route adds is measured by the API's own rows. Baselines: `docker cp`
into and out of the same desktop container (the issue's), and for ports a connection to the
same server from the desktop's own side (a process already in its network namespace)."""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator

import aiodocker

from orchestrator.names import desktop_name
from workers.runtime.files import DesktopFiles
from workers.runtime.netns import open_desktop_port

from .harness import Result, Side, alternate, services
from .scenarios import delete, ready_client

SIZE = 100_000_000
CHUNK = 1 << 20


async def files(n: int) -> list[Result]:
    """A 100 MB file up and down: DesktopFiles (docker exec of desktop-enter, streamed) against
    `docker cp` (the daemon's archive API) of the same file, alternately."""
    up = Result("files: 100 MB upload", "s", Side("worker: DesktopFiles.write"), Side("bare: docker cp in"))
    down = Result("files: 100 MB download", "s", Side("worker: DesktopFiles.read"), Side("bare: docker cp out"))
    with services() as svc, tempfile.TemporaryDirectory(prefix="orch-bench-files-") as scratch:
        source, sink = os.path.join(scratch, "source.bin"), os.path.join(scratch, "sink.bin")
        with open(source, "wb") as f:  # noqa: ASYNC230  # set-up, not measured
            f.write(os.urandom(SIZE))
        client = await ready_client(svc)
        async with client, aiodocker.Docker() as docker:
            record = await client.create()
            await client.wait_ready(record.id, timeout=120)
            sid, name = record.id, desktop_name(record.id)
            desktop_files = DesktopFiles(docker)

            async def from_disk() -> AsyncIterator[bytes]:
                loop = asyncio.get_running_loop()
                with open(source, "rb") as f:  # noqa: ASYNC230  # read a chunk at a time, off the loop
                    while chunk := await loop.run_in_executor(None, f.read, CHUNK):
                        yield chunk

            async def write() -> float:
                started = time.perf_counter()
                await desktop_files.write(sid, "/tmp/bench.bin", from_disk(), tar=False)
                return time.perf_counter() - started

            async def cp_in() -> float:
                started = time.perf_counter()
                await _docker("cp", source, f"{name}:/tmp/cp.bin")
                return time.perf_counter() - started

            async def read() -> float:
                started = time.perf_counter()
                got = await desktop_files.read(sid, "/tmp/bench.bin")
                with open(sink, "wb") as f:  # noqa: ASYNC230  # as an HTTP response would: written on
                    async for chunk in got.chunks:
                        f.write(chunk)
                return time.perf_counter() - started

            async def cp_out() -> float:
                started = time.perf_counter()
                await _docker("cp", f"{name}:/tmp/cp.bin", sink)
                return time.perf_counter() - started

            await alternate(n, write, cp_in, up)
            await alternate(n, read, cp_out, down)
            for result in (up, down):
                result.notes["MB/s at p50 (project, baseline)"] = [
                    round(SIZE / 1e6 / statistics.median(side.values)) if side.values else None
                    for side in (result.project, result.baseline)
                ]

            connect = await _ports(n, docker, sid, name)
            await delete(client, record.id)
    return [up, down, connect]


async def _ports(n: int, docker: aiodocker.Docker, sid: str, name: str) -> Result:
    connect = Result("ports: connect + GET", "s", Side("worker: open_desktop_port"), Side("bare: python client inside"))
    # A server on the desktop's loopback only, reached through its network namespace.
    await _docker("exec", "-d", name, "desktop-enter", "python3", "-m", "http.server", "--bind", "127.0.0.1", "8765")

    async def get_via_netns() -> float:
        started = time.perf_counter()
        reader, writer = await open_desktop_port(docker, sid, 8765, timeout_s=5)
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        await reader.read()
        writer.close()
        return time.perf_counter() - started

    probe = (
        "import socket,time\nt=time.perf_counter()\ns=socket.create_connection(('127.0.0.1',8765))\n"
        "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\nwhile s.recv(65536): pass\nprint(time.perf_counter()-t)"
    )

    async def get_inside() -> float:
        proc = await asyncio.create_subprocess_exec(
            "docker", "exec", name, "desktop-enter", "python3", "-c", probe, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
        return float(out)

    for _ in range(100):  # the server's start
        try:
            await get_via_netns()
            break
        except Exception:
            await asyncio.sleep(0.1)
    await alternate(max(n, 20), get_via_netns, get_inside, connect)
    return connect


async def _docker(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec("docker", *args, stdout=asyncio.subprocess.DEVNULL)
    if await proc.wait() != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed")
