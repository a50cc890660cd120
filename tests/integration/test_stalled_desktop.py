"""A desktop whose own dockerd is stopped (SIGSTOP, as its tenant can do) does not hang the
worker (security review M1): a preload or a stop into it ends within its deadline, the lease is
released, and the session can be deleted."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import pytest

from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.names import LABEL_SESSION, desktop_name, volume_name
from workers.worker import SandboxWorker

from .conftest import TEST_IMAGE, adocker, docker, running_worker

# Small deadlines, so that a stalled call shows within a test's patience.
DEADLINES: dict[str, Any] = {
    "stop_timeout_s": 2,
    "docker_read_timeout_s": 3.0,
    "preload_timeout_s": 15.0,
    "operation_timeout_s": 40.0,
}


async def lease_released(sandbox: SandboxWorker, session_id: str) -> None:
    """The job ends (and releases the lease) just after the event that says how it ended."""
    async with asyncio.timeout(10):
        while await sandbox.lifecycle.locks.holder(session_id) is not None:
            await asyncio.sleep(0.02)


def stop_dockerd(host: str, session_id: str) -> None:
    """SIGSTOP the desktop's dockerd: it keeps its socket, so calls connect and then hang."""
    docker("exec", desktop_name(session_id), "pkill", "-STOP", "dockerd", host=host)


async def delete_completes(client: Client, host: str, session_id: str, after: str) -> None:
    await client.delete(session_id)
    events = await client.wait_for(session_id, {"session.deleted"}, timeout=60, after=after)
    assert events[-1].type == "session.deleted"
    assert await adocker("ps", "-aq", "--filter", f"label={LABEL_SESSION}={session_id}", host=host) == ""
    assert await adocker("volume", "ls", "-q", "--filter", f"name=^{volume_name(session_id)}$", host=host) == ""


@pytest.mark.parametrize("where", ["before_has_image", "before_copy"])
async def test_a_preload_into_a_stalled_dockerd_fails_within_its_deadline_and_delete_completes(
    client: Client, docker_settings: Settings, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    host = docker_settings.docker_host
    assert host
    async with running_worker(replace(docker_settings, **DEADLINES)) as sandbox:
        stalled: list[float] = []
        if where == "before_has_image":
            # Right after dockerd.ready, before the preload's first call into the desktop.
            def on_ready(_seconds: float) -> None:
                stalled.append(time.monotonic())
                stop_dockerd(host, record.id)

            sandbox.lifecycle.on_dockerd_ready = on_ready
        else:
            copy_into = sandbox.runtime.images.copy_into

            async def stalled_copy(session_id: str, images: list[str]) -> int:
                stalled.append(time.monotonic())
                stop_dockerd(host, session_id)
                return await copy_into(session_id, images)

            monkeypatch.setattr(sandbox.runtime.images, "copy_into", stalled_copy)
        record = await client.create(preload_images=[TEST_IMAGE])
        events = await client.wait_for(record.id, {"session.ready", "session.failed"}, timeout=120)
        ended = time.monotonic()

        failed = events[-1]
        assert failed.type == "session.failed", [e.type for e in events]
        # The read timeout ends it (preload_timeout and the operation deadline are the backstops).
        assert failed.data["data"]["code"] == "preload_failed"
        assert stalled and ended - stalled[0] < DEADLINES["preload_timeout_s"]
        print(f"{where}: failed {failed.data['data']['code']} {ended - stalled[0]:.1f} s after the SIGSTOP")
        await lease_released(sandbox, record.id)
        # Desktop removed, volume kept; and the session is deletable at once.
        assert await adocker("ps", "-aq", "--filter", f"label={LABEL_SESSION}={record.id}", host=host) == ""
        await delete_completes(client, host, record.id, after=failed.id)


async def test_a_stop_of_a_desktop_whose_dockerd_stalled_ends_within_its_deadline_and_delete_completes(
    client: Client, docker_settings: Settings
) -> None:
    host = docker_settings.docker_host
    assert host
    async with running_worker(replace(docker_settings, **DEADLINES)) as sandbox:
        record = await client.create()
        events = await client.wait_for(record.id, {"session.ready", "session.failed"}, timeout=120)
        assert events[-1].type == "session.ready"
        stop_dockerd(host, record.id)

        stalled = time.monotonic()
        await client.stop(record.id)
        events = await client.wait_for(
            record.id, {"session.stopped", "session.failed"}, timeout=120, after=events[-1].id
        )
        took = time.monotonic() - stalled
        # The inner containers' stop times out (read timeout), the desktop is stopped as it is.
        assert events[-1].type in {"session.stopped", "session.failed"}
        assert took < DEADLINES["operation_timeout_s"] + 5
        print(f"stop of a stalled desktop: {events[-1].type} in {took:.1f} s")
        await lease_released(sandbox, record.id)
        await delete_completes(client, host, record.id, after=events[-1].id)
