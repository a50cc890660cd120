"""Redis restarted (AOF on) while 20 sessions are being created: no session and no job lost,
every session ends ready, the API and the worker reconnect by themselves, and an event stream
resumed with Last-Event-ID continues with no gap."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import IO

import httpx
import pytest

from orchestrator.client import Client
from orchestrator.config import Settings
from tests.conftest import free_port

from ..integration.conftest import TOKENS, count_objects, running_api, worker_env

pytestmark = pytest.mark.slow  # a soak: `-m "not slow"` leaves it out


AOF = ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]


class RedisServer:
    """A redis-server of this test's own (AOF on), which the test may stop and start again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="orch-fault-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        server = shutil.which("redis-server")
        assert server, "redis-server is not installed"
        self.proc = subprocess.Popen(
            [server, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.dir, *AOF],
            stdout=subprocess.DEVNULL,
        )
        for _ in range(100):
            if subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True).stdout == b"PONG\n":
                return
            subprocess.run(["sleep", "0.05"])
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.terminate()  # SIGTERM: Redis flushes the AOF and exits
        self.proc.wait(timeout=30)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def worker_log(tmp_path: Path) -> Iterator[IO[bytes]]:
    path = tmp_path / "worker.log"
    with path.open("wb") as f:
        yield f
    print(path.read_text(errors="replace")[-6000:])  # shown when the test fails


@contextlib.asynccontextmanager
async def worker_process(settings: Settings, log: IO[bytes]) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "orchestrator.cli", "worker", env=worker_env(settings), stderr=log
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 60)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("outage_s", [1, 15], ids=["restarted", "unreachable-15s"])
async def test_redis_restarted_with_20_creates_in_flight(
    docker_settings: Settings, own_redis: RedisServer, worker_log: IO[bytes], outage_s: int
) -> None:
    """Redis goes away for ``outage_s``. The sandbox's liveness threshold (5 s) is shorter than
    the 15 s outage on purpose: its alive key lapses while Redis is away, and no sandbox may be
    declared lost (nor any session failed) for silence that was Redis's, not the sandbox's."""
    settings = replace(
        docker_settings, redis_url=own_redis.url, heartbeat_interval_s=1.0, lost_after_s=5.0, monitor_interval_s=0.5
    )
    host = settings.docker_host
    assert host
    async with (
        running_api(settings) as url,
        worker_process(settings, worker_log) as worker,
        Client(url, token=TOKENS["admin"]) as client,
        httpx.AsyncClient(base_url=url) as http,
    ):
        async with asyncio.timeout(60):
            while not await client.sandboxes():
                await asyncio.sleep(0.1)
        ids = [r.id for r in await asyncio.gather(*(client.create() for _ in range(20)))]
        first = await client.wait_for(ids[0], {"session.creating"}, timeout=60)

        await asyncio.to_thread(own_redis.stop)  # off the loop: the API in it keeps answering
        away = asyncio.get_running_loop().time()
        while True:  # the API says so for as long as Redis is away (the outage is the fault)
            health = await http.get("/healthz")
            assert health.status_code == 503, health.text
            if asyncio.get_running_loop().time() - away >= outage_s:
                break
            await asyncio.sleep(min(1.0, outage_s))
        assert worker.returncode is None, "the worker died while Redis was away"
        await asyncio.to_thread(own_redis.start)
        async with asyncio.timeout(30):  # the API reconnects by itself
            while (await http.get("/healthz")).status_code != 200:
                await asyncio.sleep(0.1)

        for sid in ids:
            events = await client.wait_for(sid, {"session.ready", "session.failed"}, timeout=180)
            assert events[-1].type == "session.ready", [(e.type, e.data.get("data")) for e in events]
        # Resuming the first session's stream after its earliest event: every event, in order,
        # nothing missing, nothing twice.
        resumed = await client.wait_for(ids[0], {"session.ready"}, timeout=30, after=first[0].id)
        types = [e.type for e in resumed]
        assert types[0] == "session.creating" and types[-1] == "session.ready", types
        assert len(set(e.id for e in resumed)) == len(resumed)
        assert worker.returncode is None, "the worker died instead of reconnecting"
        listed = await client.sandboxes()
        assert [s.status for s in listed] == ["available"], listed
        unavailable = [e async for e in client.events(after="0", follow=False) if e.type == "sandbox.unavailable"]
        assert not unavailable, "a Redis outage was taken for the sandbox's silence"
    assert all([await count_objects(host, sid) == (1, 1) for sid in ids])
