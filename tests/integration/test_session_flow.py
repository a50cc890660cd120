"""A real session end to end: real API, real worker, real Docker Engine, real Redis."""

from __future__ import annotations

import json

import pytest

from orchestrator.client import Client, ServerEvent
from orchestrator.config import Settings
from orchestrator.names import (
    LABEL_GENERATION,
    LABEL_ROLE,
    LABEL_SANDBOX,
    LABEL_SESSION,
    desktop_name,
    volume_name,
)
from workers.worker import SandboxWorker

from .conftest import CAPS, TEST_IMAGE, adocker, labels_of

READY_TIMEOUT = 90.0


def types(events: list[ServerEvent]) -> list[str]:
    return [e.type for e in events]


async def test_create_reaches_dockerd_ready_and_runs_nested_containers(
    client: Client, worker: SandboxWorker, docker_settings: Settings
) -> None:
    host = docker_settings.docker_host
    assert host
    record = await client.create(labels={"purpose": "test"})
    assert record.state == "pending"
    assert record.sandbox == docker_settings.sandbox_id
    sid = record.id

    events = await client.wait_for(sid, {"session.ready", "session.failed"}, timeout=READY_TIMEOUT)
    assert types(events) == [
        "session.pending",
        "session.creating",
        "volume.created",
        "session.starting",
        "desktop.started",
        "dockerd.ready",
        "session.ready",
    ], [e.data for e in events]
    # The default profile (auto) is the user-namespaced one on this machine: what all this ran under.
    assert events[4].data["data"]["privilege"] == "userns", events[4].data
    ready = events[5].data
    assert ready["session"] == sid and ready["generation"] == 1
    data = ready["data"]
    assert data["storage_driver"] == "overlay2"
    assert data["backing_filesystem"] == "extfs"
    assert data["depth"] == 2
    assert data["address_pool"] == "10.214.0.0/16"
    assert data["duration_ms"] > 0
    assert data["server_version"]
    # Where the time went: every phase, adding up to no more than the total.
    phases = events[6].data["data"]["phases_ms"]
    assert set(phases) == {"queue", "prepare", "volume", "create", "start", "dockerd", "total"}, phases
    assert all(v >= 0 for v in phases.values()) and phases["dockerd"] > 0
    assert sum(v for k, v in phases.items() if k != "total") <= phases["total"] + 5

    # Deterministic names and labels on what was made.
    container_labels = await labels_of(host, "container", desktop_name(sid))
    assert container_labels[LABEL_SESSION] == sid
    assert container_labels[LABEL_GENERATION] == "1"
    assert container_labels[LABEL_SANDBOX] == docker_settings.sandbox_id
    assert container_labels[LABEL_ROLE] == "desktop"
    assert (await labels_of(host, "volume", volume_name(sid)))[LABEL_SESSION] == sid

    # Inside the desktop: its own dockerd, overlay2 on the volume's ext4, not vfs.
    info = json.loads(await adocker("exec", desktop_name(sid), "docker", "info", "--format", "{{json .}}", host=host))
    assert info["Driver"] == "overlay2"
    assert dict(info["DriverStatus"])["Backing Filesystem"] == "extfs"

    # An image from the sandbox's daemon, loaded through the desktop's socket, runs inside it.
    moved = await worker.runtime.images.copy_into(sid, [TEST_IMAGE])
    assert moved > 100_000
    out = await adocker(
        "exec",
        desktop_name(sid),
        "docker",
        "run",
        "--rm",
        TEST_IMAGE,
        "echo",
        "hello from depth 3",
        host=host,
    )
    assert out == "hello from depth 3"

    assert (await client.get(sid)).state == "ready"


async def test_stop_then_start_keeps_the_inner_images_and_the_home(
    client: Client, worker: SandboxWorker, docker_settings: Settings
) -> None:
    host = docker_settings.docker_host
    assert host
    sid = (await client.create("keep-me")).id
    await client.wait_for(sid, {"session.ready"}, timeout=READY_TIMEOUT)
    await worker.runtime.images.copy_into(sid, [TEST_IMAGE])
    # The user's files: the home is on the session's volume too (desktop-init binds it).
    wrote = await client.exec(sid, shell="mkdir -p ~/work && echo notes > ~/work/notes.txt && echo $HOME")
    assert (wrote.exit_code, wrote.stdout) == (0, "/root\n"), wrote

    stopping = await client.stop(sid)
    assert stopping.state == "stopping"
    events = await client.wait_for(sid, {"session.stopped", "session.failed"}, timeout=READY_TIMEOUT)
    assert events[-1].type == "session.stopped"
    assert await adocker("ps", "-aq", "--filter", f"name=^{desktop_name(sid)}$", host=host) == ""
    assert await adocker("volume", "ls", "-q", "--filter", f"name=^{volume_name(sid)}$", host=host) == volume_name(sid)

    last = events[-1].id
    started = await client.start(sid)
    assert started.state == "starting"
    assert started.generation == 2
    events = await client.wait_for(sid, {"session.ready", "session.failed"}, timeout=READY_TIMEOUT, after=last)
    # A reconcile pass may land between the start's transition and its job's pickup and run
    # the start itself (reconcile.resumed; fenced, so once): the lifecycle's events are the same.
    events = [e for e in events if not e.type.startswith("reconcile.")]
    assert types(events) == ["session.starting", "desktop.started", "dockerd.ready", "session.ready"]
    assert all(e.data["generation"] == 2 for e in events)
    assert (await labels_of(host, "container", desktop_name(sid)))[LABEL_GENERATION] == "2"

    images = await adocker(
        "exec", desktop_name(sid), "docker", "images", "--format", "{{.Repository}}:{{.Tag}}", host=host
    )
    assert TEST_IMAGE in images.split()
    out = await adocker("exec", desktop_name(sid), "docker", "run", "--rm", TEST_IMAGE, "echo", "still here", host=host)
    assert out == "still here"
    kept = await client.exec(sid, shell="cat ~/work/notes.txt && test -f ~/.bashrc")
    assert (kept.exit_code, kept.stdout) == (0, "notes\n"), kept  # and the image's own files, seeded once


async def test_delete_leaves_no_container_volume_or_record(
    client: Client, worker: SandboxWorker, docker_settings: Settings
) -> None:
    host = docker_settings.docker_host
    assert host
    sid = (await client.create()).id
    await client.wait_for(sid, {"session.ready"}, timeout=READY_TIMEOUT)

    deleting = await client.delete(sid)
    assert deleting.state == "deleting"
    events = await client.wait_for(sid, {"session.deleted", "session.failed"}, timeout=READY_TIMEOUT)
    assert events[-1].type == "session.deleted"

    assert await adocker("ps", "-aq", "--filter", f"label={LABEL_SESSION}={sid}", host=host) == ""
    assert await adocker("volume", "ls", "-q", "--filter", f"label={LABEL_SESSION}={sid}", host=host) == ""
    assert await worker.store.get(sid) is None
    assert sid not in [s.id for s in await client.list()]
    with pytest.raises(Exception, match="session_not_found"):
        await client.get(sid)


async def test_delete_while_creating_converges_to_nothing(
    client: Client, worker: SandboxWorker, docker_settings: Settings
) -> None:
    host = docker_settings.docker_host
    assert host
    sid = (await client.create()).id
    await client.wait_for(sid, {"desktop.started"}, timeout=READY_TIMEOUT)
    await client.delete(sid)
    events = await client.wait_for(sid, {"session.deleted"}, timeout=READY_TIMEOUT)
    assert "session.ready" not in types(events)
    assert await adocker("ps", "-aq", "--filter", f"label={LABEL_SESSION}={sid}", host=host) == ""
    assert await adocker("volume", "ls", "-q", "--filter", f"label={LABEL_SESSION}={sid}", host=host) == ""


async def test_desktop_refuses_to_start_without_a_volume(docker_settings: Settings) -> None:
    """start-dockerd must not run dockerd on the container's overlay root (it would fall back to vfs)."""
    host = docker_settings.docker_host
    assert host
    name = f"{docker_settings.sandbox_id}-novolume"
    await adocker(
        "create",
        "--name",
        name,
        "--label",
        f"{LABEL_SANDBOX}={docker_settings.sandbox_id}",
        *CAPS,
        docker_settings.desktop_image,
        host=host,
    )
    await adocker("start", name, host=host)
    status = await adocker("wait", name, host=host)
    assert status == "1"
    logs = await adocker("logs", name, host=host, stderr=True)
    assert "/var/lib/docker is not a mount point" in logs


async def test_a_home_that_is_no_directory_on_the_volume_is_refused_not_followed(docker_settings: Settings) -> None:
    """The volume's home directory is the desktop user's to write: one they replaced with a
    symlink (say, to /etc) must not be bound over /root by the next start's root."""
    host = docker_settings.docker_host
    assert host
    name = f"{docker_settings.sandbox_id}-badhome"
    await adocker("volume", "create", name, host=host)
    try:
        await adocker(
            "run",
            "--rm",
            "-v",
            f"{name}:/d",
            TEST_IMAGE,
            "busybox",
            "ln",
            "-s",
            "/etc",
            "/d/.orchestrator-home",
            host=host,
        )
        await adocker(
            "create", "--name", name, "-v", f"{name}:/var/lib/docker", *CAPS, docker_settings.desktop_image, host=host
        )
        await adocker("start", name, host=host)
        assert await adocker("wait", name, host=host) == "1"
        logs = await adocker("logs", name, host=host, stderr=True)
        assert "/var/lib/docker/.orchestrator-home is not a directory" in logs, logs
    finally:
        await adocker("rm", "-f", name, host=host)
        await adocker("volume", "rm", "-f", name, host=host)
