"""Harness: a real Redis server per test run, started here; the project's Docker Engine from
DOCKER_HOST (``make test`` starts it with scripts/env.sh and builds the images)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Iterator
from typing import TypeVar

import pytest

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def awaited(reply: Awaitable[T] | T) -> T:
    """The reply of a ``redis.asyncio`` command, typed: redis-py annotates each command once for
    both clients, as ``Awaitable[T] | T``, which mypy refuses to await."""
    if not isinstance(reply, Awaitable):
        raise TypeError(f"not the reply of a redis.asyncio command: {reply!r}")
    return await reply


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed: run `make test` (scripts/env.sh installs it)")
    workdir = tempfile.mkdtemp(prefix="orch-test-redis-")
    port = free_port()
    proc = subprocess.Popen(
        [
            server,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            workdir,
            "--save",
            "",
            "--appendonly",
            "yes",
            "--daemonize",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"redis-server did not start on port {port} (exit {proc.poll()})")
        time.sleep(0.02)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(workdir, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``docker`` every test whose fixtures reach ``docker_host`` (directly or through
    ``images``, ``docker_settings``, ``worker``...), so ``-m "not docker"`` is exactly the tests
    that run without a Docker Engine."""
    for item in items:
        if isinstance(item, pytest.Function) and "docker_host" in item.fixturenames:
            item.add_marker(pytest.mark.docker)


@pytest.fixture(scope="session")
def docker_host() -> str:
    """The Docker Engine under test; skips (or fails, under `make test`) when there is none."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    probe = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"],
        env={**os.environ, "DOCKER_HOST": host},
        capture_output=True,
        text=True,
        timeout=20,
    )
    if probe.returncode != 0:
        reason = f"no Docker Engine answers at {host}: run `make test`, which starts one"
        if os.environ.get("ORCH_REQUIRE_DOCKER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return host
