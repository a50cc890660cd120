"""200 create → ready → delete cycles, 8 at a time, on one sandbox: nothing is left over
(containers, volumes, networks, Redis keys beyond the documented, capped retention) and the
memory of the API and of the worker (real processes) stays flat."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from asyncio.subprocess import Process
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from orchestrator.auth import hash_token
from orchestrator.client import Client
from orchestrator.config import Settings
from tests.conftest import free_port

from ..integration.conftest import TOKENS, adocker, worker_env

pytestmark = pytest.mark.slow  # a soak: `-m "not slow"` leaves it out

CYCLES, CONCURRENCY, WARM_UP = 200, 8, 40


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


@contextlib.asynccontextmanager
async def processes(settings: Settings) -> AsyncIterator[tuple[str, Process, Process]]:
    """The API and the worker as real processes (their RSS is what is measured)."""
    port = free_port()
    env = worker_env(
        settings,
        ORCH_TOKENS=f"leak:{hash_token(TOKENS['admin'])}:admin",
        ORCH_API_PORT=str(port),
        ORCH_DEFAULT_SANDBOX=settings.sandbox_id,
    )
    quiet = asyncio.subprocess.DEVNULL
    api = await asyncio.create_subprocess_exec(sys.executable, "-m", "orchestrator.cli", "api", env=env, stderr=quiet)
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "orchestrator.cli", "worker", env=env, stderr=quiet
    )
    try:
        yield f"http://127.0.0.1:{port}", api, worker
    finally:
        for proc in (worker, api):
            if proc.returncode is None:
                proc.terminate()
        for proc in (worker, api):
            await asyncio.wait_for(proc.wait(), 60)


async def until(check: Callable[[], Awaitable[object]], timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not await check():
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"{what}: not within {timeout:g} s") from None


@pytest.mark.timeout(900)
async def test_200_cycles_leave_nothing_behind_and_memory_flat(docker_settings: Settings) -> None:
    settings = replace(docker_settings, heartbeat_interval_s=1.0)
    host = settings.docker_host
    assert host
    memory: dict[str, list[float]] = {"api": [], "worker": []}
    async with processes(settings) as (url, api, worker), Client(url, token=TOKENS["admin"], timeout=60) as client:

        async def api_up() -> bool:
            try:
                return any(s.status == "available" for s in await client.sandboxes())
            except Exception:
                return False

        await until(api_up, 90, "the API and the worker's first heartbeat")
        done = 0
        gate = asyncio.Semaphore(CONCURRENCY)

        async def cycle(i: int) -> None:
            nonlocal done
            async with gate:
                record = await client.create(labels={"cycle": str(i)})
                ready = await client.wait_for(record.id, {"session.ready", "session.failed"}, timeout=180)
                assert ready[-1].type == "session.ready", [(e.type, e.data.get("data")) for e in ready]
                await client.delete(record.id)
                gone = await client.wait_for(record.id, {"session.deleted"}, timeout=120, after=ready[-1].id)
                assert gone[-1].type == "session.deleted"
                done += 1
                if done in (WARM_UP, CYCLES):
                    memory["api"].append(rss_mb(api.pid))
                    memory["worker"].append(rss_mb(worker.pid))

        started = asyncio.get_running_loop().time()
        await asyncio.gather(*(cycle(i) for i in range(CYCLES)))
        seconds = asyncio.get_running_loop().time() - started
        print(
            f"{CYCLES} cycles in {seconds:.0f} s; RSS after {WARM_UP} and {CYCLES} cycles:"
            f" API {memory['api'][0]:.1f} → {memory['api'][1]:.1f} MB,"
            f" worker {memory['worker'][0]:.1f} → {memory['worker'][1]:.1f} MB"
        )
        assert await client.list() == []
        sandbox = (await client.sandboxes())[0]
        assert sandbox.placed == 0, sandbox

    label = f"label=orchestrator.sandbox={settings.sandbox_id}"
    assert await adocker("ps", "-aq", "--filter", label, host=host) == ""
    assert await adocker("volume", "ls", "-q", "--filter", label, host=host) == ""
    networks = (await adocker("network", "ls", "--format", "{{.Name}}", "--filter", label, host=host)).split()
    assert len(networks) <= 1, f"one network per sandbox is expected, found {networks}"

    # Redis: only the documented, bounded retention is left (README: events; tombstones).
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        prefix = settings.key_prefix
        keys = sorted([k.decode() async for k in redis.scan_iter(match=f"{prefix}*")])
        streams = [k for k in keys if k.startswith(f"{prefix}events:session:")]
        assert len(streams) == CYCLES  # each deleted session's stream, kept for an hour
        for key in streams[:: CYCLES // 10]:
            assert 0 < await redis.ttl(key) <= 3600, key
        # Each deleted session's tombstone (the reconciler's evidence), kept ORCH_TOMBSTONE_TTL.
        tombstones = [k for k in keys if k.startswith(f"{prefix}session-deleted:")]
        assert len(tombstones) == CYCLES
        for key in tombstones[:: CYCLES // 10]:
            assert 0 < await redis.ttl(key) <= settings.tombstone_ttl_s, key
        rest = set(keys) - set(streams) - set(tombstones)
        sid = settings.sandbox_id
        # And the streams consumer groups live on (empty: handled entries are deleted).
        fixed = (
            "events",
            "sandboxes",
            f"sandbox:{sid}",
            f"sandbox-alive:{sid}",
            f"exec-jobs:{sid}",
            f"access-requests:{sid}",
            "commands",
        )
        allowed = {f"{prefix}{k}" for k in fixed}
        assert rest <= allowed, f"left over: {sorted(rest - allowed)}"
        for stream in (f"{prefix}exec-jobs:{sid}", f"{prefix}access-requests:{sid}", f"{prefix}commands"):
            assert await redis.xlen(stream) == 0, stream
        assert [k async for k in redis.scan_iter(match="arq:*")] == []
    finally:
        await redis.aclose()
    # Flat: growth after warm-up well under what 160 leaked sessions would show.
    for role, (before, after) in memory.items():
        assert after - before < 15, f"{role} RSS grew {after - before:.1f} MB over {CYCLES - WARM_UP} cycles"
