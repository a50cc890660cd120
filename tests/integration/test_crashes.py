"""Crash injection: the worker process is SIGKILLed at each step of create and of delete
(a test-only fault hook, ORCH_FAULT_KILL_AT, in a real worker process on the real dockerd).
After a restart, every session converges: ready with exactly one desktop and one volume,
or deleted with none."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator

import pytest

from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.states import SessionState
from workers.lifecycle import FAULT_POINTS

from .conftest import adocker, count_objects, running_worker, worker_env

CREATE_FAULTS = [p for p in FAULT_POINTS if p.startswith("create:")]
DELETE_FAULTS = [p for p in FAULT_POINTS if p.startswith("delete:")]


async def start_worker(settings: Settings, fault: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator.cli",
        "worker",
        env=worker_env(settings, ORCH_FAULT_KILL_AT=fault),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def killed_by_fault(proc: asyncio.subprocess.Process) -> None:
    code = await asyncio.wait_for(proc.wait(), 120)
    assert code == -signal.SIGKILL, f"the worker exited with {code}, not by the fault hook"


@contextlib.asynccontextmanager
async def faulty_worker(settings: Settings, fault: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A worker process that kills itself at ``fault``; never left running after the block."""
    proc = await start_worker(settings, fault)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize("fault", CREATE_FAULTS)
async def test_create_converges_after_the_worker_dies_at(client: Client, docker_settings: Settings, fault: str) -> None:
    host = docker_settings.docker_host
    assert host
    async with faulty_worker(docker_settings, fault) as proc:
        sid = (await client.create()).id
        await killed_by_fault(proc)
    async with running_worker(docker_settings):
        events = await client.wait_for(sid, {"session.ready", "session.failed"}, timeout=120)
    assert events[-1].type == "session.ready", [(e.type, e.data.get("data")) for e in events]
    assert (await client.get(sid)).state == "ready"
    assert await count_objects(host, sid) == (1, 1)
    types = [e.type for e in events]
    assert types.count("session.ready") == 1
    assert "dockerd.ready" in types


@pytest.mark.parametrize("fault", DELETE_FAULTS)
async def test_delete_converges_after_the_worker_dies_at(client: Client, docker_settings: Settings, fault: str) -> None:
    host = docker_settings.docker_host
    assert host
    async with faulty_worker(docker_settings, fault) as proc:
        sid = (await client.create()).id
        ready = await client.wait_for(sid, {"session.ready", "session.failed"}, timeout=120)
        assert ready[-1].type == "session.ready"
        await client.delete(sid)
        await killed_by_fault(proc)
    assert (await client.get(sid)).state == "deleting"
    async with running_worker(docker_settings):
        events = await client.wait_for(sid, {"session.deleted", "session.failed"}, timeout=120, after=ready[-1].id)
    assert events[-1].type == "session.deleted", [(e.type, e.data.get("data")) for e in events]
    assert await count_objects(host, sid) == (0, 0)


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_a_burst_of_creates_converges_after_the_worker_is_killed_midway(
    client: Client, docker_settings: Settings
) -> None:
    """20 creates at once; the worker is SIGKILLed from outside while they are in every
    phase at once; a new worker brings every one to ready with exactly one desktop and one
    volume, and nothing else is left on the daemon."""
    host = docker_settings.docker_host
    assert host
    label = f"label=orchestrator.sandbox={docker_settings.sandbox_id}"
    async with faulty_worker(docker_settings, "") as proc:
        async with asyncio.timeout(60):  # its start-up (privilege probe) done: it heartbeats
            while not await client.sandboxes():
                await asyncio.sleep(0.1)
        ids = [r.id for r in await asyncio.gather(*(client.create() for _ in range(20)))]
        async with asyncio.timeout(120):  # some desktops made, not all of them ready yet
            while len((await adocker("ps", "-aq", "--filter", label, host=host)).split()) < 8:
                await asyncio.sleep(0.05)
        states = [(await client.get(i)).state for i in ids]
        proc.kill()
        await proc.wait()
    assert states.count(SessionState.READY) < 20, "the kill came too late to interrupt anything"
    async with running_worker(docker_settings):
        for sid in ids:
            events = await client.wait_for(sid, {"session.ready", "session.failed"}, timeout=180)
            assert events[-1].type == "session.ready", [(e.type, e.data.get("data")) for e in events]
    assert all([await count_objects(host, sid) == (1, 1) for sid in ids])
    assert len((await adocker("ps", "-aq", "--filter", label, host=host)).split()) == 20
    assert len((await adocker("volume", "ls", "-q", "--filter", label, host=host)).split()) == 20
