"""The sandbox's disk on the real Docker Engine: the worker measures its dockerd's data root
(what desktops fill) for the free-disk watermark, and a desktop writing into its bind-mounted
/run/orchestrator fills a small tmpfs (sandbox_image/sandbox-init.sh), never the sandbox's disk."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time
import uuid
from collections.abc import AsyncIterator

import aiodocker
import pytest

from orchestrator.client import ApiError, Client
from orchestrator.config import Settings
from orchestrator.placement import low_disk
from tests.fakes import FakeRuntime
from workers.disk import DiskGauge
from workers.privilege import PrivilegeKind, PrivilegeProfile
from workers.runtime.desktops import DockerDesktops

from .conftest import SANDBOX_IMAGE, TEST_IMAGE, adocker, compose_sandbox_flags, pipe_in, running_worker

SOCKET_DIR = "/run/orchestrator/desktops"
TMPFS_BYTES = 4 * 2**20  # sandbox-init.sh's size=4m


async def test_the_gauge_measures_the_dockerd_data_root(docker_host: str) -> None:
    root = (await adocker("info", "--format", "{{.DockerRootDir}}", host=docker_host)).strip()
    async with aiodocker.Docker(url=docker_host) as docker:
        desktops = DockerDesktops(
            docker,
            image="unused",
            sandbox_id="disk-probe",
            depth=1,
            socket_dir="/nonexistent",
            profile=PrivilegeProfile(PrivilegeKind.CAPS, "test"),
        )
        assert await desktops.data_root() == root
        gauge = DiskGauge(desktops, min_free_mb=2048)
        assert await gauge.path() == root  # this machine's daemon: its data root is here
        free = await gauge.free_bytes()
    # The same filesystem as shutil says (give or take what others wrote meanwhile).
    assert abs(free - shutil.disk_usage(root).free) < 512 * 2**20
    # Nothing to measure there: the fake's data root is not a directory of this machine.
    fake = FakeRuntime()
    fake.data_root_dir = "/nonexistent/docker"
    assert await DiskGauge(fake, 0).path() == "/"


async def test_a_worker_below_its_watermark_gets_no_new_session(docker_settings: Settings, client: Client) -> None:
    """The whole path: the worker measures, its heartbeat says so, the API's placement skips it."""
    huge_mb = 2**30  # 1 PiB: no disk here has that much free
    settings = dataclasses.replace(docker_settings, min_free_disk_mb=huge_mb)
    async with running_worker(settings) as worker:
        info = await worker.heartbeat.beat()
        root = await worker.disk.path()
        assert settings.docker_host is not None
        assert root == (await adocker("info", "--format", "{{.DockerRootDir}}", host=settings.docker_host)).strip()
        assert info.min_free_disk_bytes == huge_mb * 2**20
        assert abs(info.free_disk_bytes - shutil.disk_usage(root).free) < 512 * 2**20
        with pytest.raises(ApiError) as refused:
            await client.create("too-little-disk")
        assert refused.value.status == 503 and refused.value.code == "no_capacity", refused.value
        assert f"{settings.sandbox_id}: " in refused.value.message and "below its watermark of 1048576.0 GiB" in (
            refused.value.message
        )
        # The watermark off (0): the next heartbeat puts the sandbox back into placement.
        worker.disk.floor_bytes = 0
        info = await worker.heartbeat.beat()
        assert info.min_free_disk_bytes == 0 and low_disk(info) is None
        listed = {s.id: s for s in await client.sandboxes()}
        assert low_disk(listed[settings.sandbox_id]) is None


async def until(check: list[str], host: str, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not await adocker(*check, host=host, check=False):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(0.2)


@pytest.fixture
async def sandbox(images: str) -> AsyncIterator[str]:
    """A sandbox container as compose runs one (sandbox-init: its dockerd, then a worker that
    finds no Redis here and keeps restarting, which this test does not need)."""
    host = images
    if not await adocker("image", "inspect", "--format", "{{.Id}}", SANDBOX_IMAGE, host=host, check=False):
        pytest.fail(f"{SANDBOX_IMAGE} is missing: run `make images`")
    tag = uuid.uuid4().hex[:8]
    name, volume = f"orchdisk-{tag}", f"orchdisk-{tag}"
    try:
        await adocker(
            "run",
            "-d",
            "--name",
            name,
            "--label",
            "orchestrator.role=test-sandbox",
            *compose_sandbox_flags(),
            "-v",
            f"{volume}:/var/lib/docker",
            "-e",
            "REDIS_URL=redis://127.0.0.1:1/0",
            "-e",
            f"ORCH_SANDBOX_ID=disk{tag}",
            SANDBOX_IMAGE,
            host=host,
        )
        # `docker version` prints its client half even with no daemon: wait on its exit status.
        await until(
            ["exec", name, "sh", "-c", "docker version >/dev/null 2>&1 && echo up"], host, "the sandbox's dockerd"
        )
        yield name
    finally:
        await adocker("rm", "-f", "-v", name, host=host, check=False)
        await adocker("volume", "rm", "-f", volume, host=host, check=False)


async def test_a_desktop_fills_its_socket_directory_tmpfs_not_the_sandbox_disk(images: str, sandbox: str) -> None:
    host = images
    mounts = await adocker("exec", sandbox, "sh", "-c", f"grep ' {SOCKET_DIR} ' /proc/mounts", host=host, check=False)
    assert mounts.split()[2:3] == ["tmpfs"], f"{SOCKET_DIR} is not a tmpfs in the sandbox: {mounts!r}"
    assert "size=4096k" in mounts and "noexec" in mounts, mounts
    # A desktop's view: its directory bind-mounted at /run/orchestrator in a container of the
    # sandbox's dockerd (the test image stands in for the desktop image: same mount).
    await pipe_in(host, ["exec", "-i", sandbox], "docker load -q", f"docker save {TEST_IMAGE}")
    await adocker("exec", sandbox, "mkdir", "-p", f"{SOCKET_DIR}/s1", host=host)
    out = await adocker(
        "exec",
        sandbox,
        "docker",
        "run",
        "--rm",
        "-v",
        f"{SOCKET_DIR}/s1:/run/orchestrator",
        TEST_IMAGE,
        "sh",
        "-c",
        "dd if=/dev/zero of=/run/orchestrator/fill bs=1048576 count=64; echo rc=$?",
        host=host,
        stderr=True,
    )
    assert "No space left on device" in out and "rc=1" in out, out
    written = int(await adocker("exec", sandbox, "stat", "-c", "%s", f"{SOCKET_DIR}/s1/fill", host=host))
    assert 0 < written <= TMPFS_BYTES, written
    # The sandbox's disk did not take it: the file is on the tmpfs (the machine's free space is
    # no measure here: anything else on the machine writes to it meanwhile).
    fs = await adocker("exec", sandbox, "stat", "-f", "-c", "%T", f"{SOCKET_DIR}/s1/fill", host=host)
    assert fs == "tmpfs", fs
